"""`jaxalign eval-suite`: a trained run answers every benchmark of a LLaVA evaluation folder; the answers are written
in the benchmarks' formats, scored, and summed up in one table (`jaxalign.programs.eval_suite`).

    jaxalign eval-suite --workdir runs/s2 --data playground/data/eval
    jaxalign eval-suite --workdir runs/s2 --data playground/data/eval --benchmarks pope textvqa --out /tmp/suite
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from jaxalign.evaluate.benchmarks.eval_folder import LAYOUTS  # plain data, cheap to import

BENCHMARK_NAMES = tuple(LAYOUTS)

_DESCRIPTION = """\
Loads a trained TinyAlign run from its workdir, asks it every question of every benchmark found in DIR, laid out
as LLaVA's evaluation folder (./playground/data/eval; TinyLLaVA Factory's $EVAL_DIR), writes the answers in LLaVA's
answers-file format (JSON lines with question_id, prompt, text, answer_id, model_id, metadata) plus each
benchmark's own result file, scores them with the scorers of `jaxalign score`, and prints one table.

Answers are generated as `jaxalign eval` generates them: retrieval from the run's memory bank at prefill, batched
greedy decoding with the KV cache, each benchmark's prompt instruction.

benchmark  DIR/...                                         scored with                       also written
vqav2      vqav2/llava_vqav2_mscoco_test-dev2015.jsonl,    (test-dev answers are not         answers_upload.json
           test2015/                                       public: only with
                                                           v2_OpenEnded_mscoco_test-dev2015_questions.json +
                                                           v2_mscoco_test-dev2015_annotations.json)
gqa        gqa/llava_gqa_testdev_balanced.jsonl,           gqa/data/testdev_balanced_        testdev_balanced_
           gqa/data/images/ (or gqa/images/)               questions.json (or gqa/...)       predictions.json
textvqa    textvqa/llava_textvqa_val_v051_ocr.jsonl,       textvqa/TextVQA_0.5.1_val.json
           train_images/
scienceqa  scienceqa/llava_test_CQM-A.json, images/test/   problems.json + pid_splits.json
                                                           (or llava_test_CQM-A.json)
pope       pope/llava_pope_test.jsonl, val2014/            pope/coco/coco_pope_<split>.json  coco_pope_<split>_
                                                                                             answers.jsonl
mme        MME/llava_mme.jsonl,                            MME_Benchmark_release_version/
           MME_Benchmark_release_version/
mmvet      mm-vet/llava-mm-vet.jsonl, images/              (an LLM judge: answers only)      results.json
mmmu       MMMU/anns_for_eval.json, all_images/            MMMU/eval/answer_dict_val.json    output.json

A benchmark whose files are missing is skipped (or left unscored) with the reason in the table and in
results.json, never silently; a question whose image is missing or unreadable is a bad row, counted with its id
and scored as unanswered.

Exit codes: 0 ran (whatever was skipped); 2 bad arguments (no such folder, no trained run in the workdir, none of
the benchmarks in DIR), with one error line."""

_EPILOG = """\
Outputs go to --out (default RUN/eval_suite/): <benchmark>/answers.jsonl, the files above, and results.json with
every benchmark's scores, bad rows and skips. The saved config can be adjusted as in `jaxalign eval`, e.g.
--config.mesh='(-1, 1, 1)' on another machine.

example:
  jaxalign eval-suite --workdir runs/qwen2_s2 --data ./playground/data/eval --batch-size 64"""


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def headline(name: str, scores: dict[str, Any]) -> str:
    """The benchmark's headline metrics in a few characters: percentages, MME's points."""
    if name == "pope":
        return f"acc {_percent(scores['accuracy'])}  F1 {_percent(scores['f1'])}  yes {_percent(scores['yes_ratio'])}"
    if name == "mme":
        return f"perception {scores['perception']:.1f}  cognition {scores['cognition']:.1f}"
    return f"accuracy {_percent(scores['accuracy'])}"


def format_table(summary: dict[str, Any]) -> str:
    """One row a benchmark: questions, answered, bad rows, headline scores and status (with the reason of a skip)."""
    header = ("benchmark", "questions", "answered", "bad rows", "score", "status")
    rows = []
    for name, result in summary["benchmarks"].items():
        bad = result.get("bad_rows", {})
        counts = ", ".join(f"{reason} {count}" for reason, count in bad.get("counts", {}).items())
        bad_text = f"{sum(bad.get('counts', {}).values())}" + (f" ({counts})" if counts else "") if bad else ""
        score = headline(name, result["scores"]) if "scores" in result else ""
        status = result["status"] + (f": {result['reason']}" if result.get("reason") else "")
        if result.get("unscored_splits"):
            status += "; unscored splits: " + ", ".join(f"{split} ({why})"
                                                       for split, why in result["unscored_splits"].items())
        rows.append((name, str(result.get("questions", "")), str(result.get("answered", "")), bad_text, score, status))
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
             for row in [header, *rows]]
    lines.insert(1, "-" * max(len(line) for line in lines[:1]))
    return "\n".join(lines + ["", f"answers and results.json in {summary['out']}"])


def eval_suite_command(args: argparse.Namespace) -> int:
    """Runs `jaxalign eval-suite`: prints the table (exit 0) or one error line to stderr (exit 2)."""
    from jaxalign.programs import eval_suite

    try:
        summary = eval_suite.run_suite(args.workdir, args.data, out_dir=args.out, benchmarks=args.benchmarks,
                                       overrides=args.overrides, batch_size=args.batch_size,
                                       max_new_tokens=args.max_new_tokens,
                                       progress=False if args.no_progress else None)
    except eval_suite.SuiteError as error:
        print(f"jaxalign eval-suite: error: {error}", file=sys.stderr)
        return 2
    print(format_table(summary))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-suite", help="answer and score every standard benchmark of a LLaVA evaluation folder with a trained run",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, metavar="RUN",
                        help="the workdir of a `jaxalign train` run (config.json, checkpoints/, memory/)")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="LLaVA's evaluation folder (DIR/pope, DIR/textvqa, ...)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="a local folder for the answers and results.json (default RUN/eval_suite)")
    parser.add_argument("--benchmarks", nargs="+", choices=BENCHMARK_NAMES, default=None, metavar="NAME",
                        help="only these benchmarks (default all: " + " ".join(BENCHMARK_NAMES) + ")")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="questions a generation batch, over all devices (default config.eval.batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="longest answer in tokens (default config.eval.max_new_tokens)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=eval_suite_command, overrides=[], accepts_config_overrides=True)
