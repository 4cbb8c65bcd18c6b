"""`jaxalign score BENCHMARK --predictions FILE --questions FILE [--annotations FILE]`: a benchmark's official
scoring of a model's answers file, printed as one JSON object (see `jaxalign.evaluate.benchmarks`)."""
from __future__ import annotations

import argparse
import json
import sys

BENCHMARK_NAMES = ("vqav2", "textvqa", "gqa", "scienceqa", "pope", "mme", "mmmu")

_DESCRIPTION = """\
Scores a model's answers to one of the standard VLM benchmarks by the benchmark's published rules and prints one
JSON object. Its top-level keys are the headline metrics: `accuracy` for every benchmark (a fraction in [0, 1]),
plus `precision`, `recall`, `f1` and `yes_ratio` for POPE and `perception` and `cognition` (MME's summed task
scores, in points) for MME; `questions` and `missing_answers` (questions with no answer or a blank one: scored
wrong, never skipped); per-type, per-split or per-task breakdowns under their own keys.

The predictions file is JSON lines, one {"question_id": ..., "text": "the model's answer"} a question, as LLaVA's
model_vqa_loader.py writes it (TextVQA and MME also use its "prompt" field).

benchmarks and their question files:
  vqav2      --questions v2_OpenEnded_mscoco_<split>_questions.json --annotations v2_mscoco_<split>_annotations.json
             (official soft accuracy, answers normalised as vqaEval.py / EvalAI)
  textvqa    --questions TextVQA_0.5.1_val.json (or the VQA layout with --annotations)
  gqa        --questions testdev_balanced_questions.json (exact match after LLaVA's normalisation)
  scienceqa  --questions problems.json [--annotations pid_splits.json] [--split test], or llava_test_CQM-A.json
             (`accuracy` is ScienceQA-IMG: the questions with an image; all questions under `all_questions`)
  pope       --questions coco_pope_<split>.json (JSON lines with label; several files if their ids differ)
  mme        --questions MME_Benchmark_release_version/ (or eval_tool task files <task>.txt, or llava_mme.jsonl
             with --annotations MME_Benchmark_release_version/)
  mmmu       --questions MMMU validation records (id, question_type, options, answer), or TinyLLaVA's
             anns_for_eval.json [--annotations answer_dict_val.json]

Exit codes: 0 scored; 2 bad input (a missing file, a line that is not JSON, a question id that the questions do
not have), with one error line naming the file and line."""

_EXAMPLE = """\
example:
  jaxalign score pope --predictions answers/pope_random.jsonl --questions pope/coco/coco_pope_random.json
  jaxalign score vqav2 --predictions answers/vqav2_val.jsonl \\
      --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json"""


def score(args: argparse.Namespace) -> int:
    """Runs `jaxalign score`: prints the metrics as JSON (exit 0) or one error line to stderr (exit 2)."""
    from jaxalign.evaluate.benchmarks import files, scoring

    try:
        result = scoring.score_files(args.benchmark, args.predictions, args.questions, args.annotations,
                                     split=args.split)
    except files.BenchmarkInputError as error:
        print(f"jaxalign score {args.benchmark}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score", help="Score a model's answers to a VLM benchmark (VQAv2, TextVQA, GQA, ScienceQA, POPE, MME, MMMU).",
        description=_DESCRIPTION, epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=BENCHMARK_NAMES, metavar="BENCHMARK",
                        help="one of: " + ", ".join(BENCHMARK_NAMES))
    parser.add_argument("--predictions", required=True, metavar="FILE",
                        help="the model's answers: JSON lines with question_id and text")
    parser.add_argument("--questions", required=True, nargs="+", metavar="FILE",
                        help="the benchmark's question file (a folder for MME; several files only for POPE and MME)")
    parser.add_argument("--annotations", default=None, metavar="FILE",
                        help="the answers kept apart from the questions: VQA annotations JSON, ScienceQA "
                             "pid_splits.json, MME release folder for llava_mme.jsonl, MMMU answer_dict_val.json")
    parser.add_argument("--split", default="test",
                        help="ScienceQA split of problems.json to score (default test)")
    parser.set_defaults(func=score)
