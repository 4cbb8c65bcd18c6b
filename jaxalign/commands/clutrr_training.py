"""`jaxalign clutrr train-teacher | distill | eval`: the structured-distillation trainers on the command line.

    jaxalign clutrr train-teacher --config jaxalign/configs/clutrr_teacher.py --workdir runs/teacher
    jaxalign clutrr distill --config jaxalign/configs/clutrr_distill.py:variant=kd_contrastive \
        --workdir runs/student --config.distill.teacher_workdir=runs/teacher
    jaxalign clutrr eval --checkpoint runs/student --csv 1.4_test.csv

Training commands read the config's CSV files (`data.train`, `data.test`), or with
`--config.data.prepared_dir=DIR` the data set `jaxalign prepare-data clutrr` wrote there (it prints that override):
the same rows, no CSV parsed. They resume from the latest checkpoint in --workdir, write config.json, metrics.jsonl,
checkpoints, the final model (model/: the best validation evaluation's when the config holds out validation rows,
see `jaxalign.programs.clutrr_trainer`) and eval.json, and print a JSON summary (with the run's process_count and
device_count; under a launcher every process prints the same summary and process 0 writes the files). `eval`
accepts any CSV in the released format (for example a file written by `jaxalign clutrr generate`) and prints
JSON with the accuracy overall, per noise task, per k and per (task, k); for a teacher, also the number of rows
whose file labels their noise edges (`rows_noise_labelled`; files of the reference generator do) and the accuracy
with those labels replaced by 'unlabelled' (`accuracy_noise_unlabelled`, null when no row labels its noise).
Bad input (a missing data file, as when the configs' default ../shared/data/clutrr is not there, or a malformed
row: file, row and field) is one error line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from jaxalign.commands import common

_CONFIG_HELP = ("config file and optional variant, e.g. jaxalign/configs/clutrr_distill.py:variant=kd,quick "
                "(the file's docstring lists its variants)")
_OVERRIDE_HELP = ("any config field may follow as --config.a.b=value (typed after the default), e.g. "
                  "--config.steps=500 --config.data.train=data.zip:1.2,1.3_train.csv")


def _summary(result: dict) -> dict:
    """The headline numbers of a run: steps, time, processes and devices, last training metrics, test accuracy."""
    return {key: result.get(key) for key in ("workdir", "role", "model_kind", "steps", "train_seconds",
                                             "process_count", "device_count", "final_metrics",
                                             "train_stories_truncated", "best_step", "best_valid_accuracy",
                                             "stopped_at", "test_accuracy", "test_accuracy_noise_unlabelled")
            if key in result}


def _input_errors() -> tuple[type[Exception], ...]:
    """What bad input raises: a missing file or folder (the message names it and, for the configs' default data,
    how to point at data) and a malformed CLUTRR row (file, row and field)."""
    from jaxalign.clutrr import reader

    return FileNotFoundError, reader.ClutrrFormatError


def _reported(command: str, run) -> int:
    """Runs `run()` and prints its JSON; bad input is one error line (exit code 2), not a traceback."""
    try:
        output = run()
    except _input_errors() as error:
        print(f"jaxalign clutrr {command}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(output, indent=1, default=str))
    return 0


def _train_teacher(args: argparse.Namespace) -> int:
    from jaxalign.configs.base import load_config
    from jaxalign.programs import clutrr_trainer as trainer

    return _reported("train-teacher", lambda: _summary(
        trainer.train_teacher(load_config(args.config, args.overrides), args.workdir)))


def _distill(args: argparse.Namespace) -> int:
    from jaxalign.configs.base import load_config
    from jaxalign.programs import clutrr_trainer as trainer

    return _reported("distill", lambda: _summary(
        trainer.train_student(load_config(args.config, args.overrides), args.workdir)))


def _eval(args: argparse.Namespace) -> int:
    return _reported("eval", lambda: _evaluation(args))


def _evaluation(args: argparse.Namespace) -> dict:
    from jaxalign.clutrr import reader
    from jaxalign.distill import evaluate

    model = evaluate.load_model(args.checkpoint)
    files, skipped = {}, {}
    for path in args.csv:
        read_report = reader.ReadReport()
        rows = reader.read_csv(path, skip_bad=args.skip_bad, report=read_report)
        if not rows:
            raise SystemExit(f"{path}: no usable rows ({read_report.rows_skipped} skipped); nothing to evaluate")
        files[path], skipped[path] = rows, read_report.rows_skipped
    # A teacher's reports also hold rows_noise_labelled and accuracy_noise_unlabelled (None: no labelled noise).
    reports = evaluate.evaluate_files(model, files, batch_size=args.batch_size)
    for path, report in reports.items():
        report["rows_skipped"] = skipped[path]
    import jax

    header = {"checkpoint": args.checkpoint, "role": model.role, "model": model.kind,
              "process_count": jax.process_count(), "device_count": jax.device_count()}
    if len(args.csv) == 1:
        (path, report), = reports.items()
        return {**header, "csv": path, **report}
    return {**header, "files": reports}


def add_training_commands(clutrr_subparsers: argparse._SubParsersAction) -> None:
    """Adds train-teacher, distill and eval under `jaxalign clutrr`."""
    for name, func, summary, description in (
        ("train-teacher", _train_teacher, "pretrain the GNN teacher on story graphs",
         "Trains (or resumes) the edge-type-aware GNN teacher on the symbolic graphs of a CLUTRR training CSV "
         "(noise edges, which the released files leave unlabelled, get a dedicated 'unlabelled' edge type), "
         "then evaluates it on the config's test files. Writes checkpoints, metrics.jsonl, config.json, model/ "
         "and eval.json in --workdir and prints a JSON summary."),
        ("distill", _distill, "train a text student, optionally distilled from a trained teacher",
         "Trains (or resumes) a BiLSTM, transformer, BERT or BERT-LSTM student (--config.model.kind; BERT "
         "fine-tunes --config.model.bert_folder, default all-MiniLM-L6-v2) over anonymised stories with CE + "
         "alpha * KD + beta * contrastive (InfoNCE) alignment to a frozen teacher "
         "(--config.distill.teacher_workdir; alpha = beta = 0 trains the student alone), then evaluates it on "
         "the config's test files."),
    ):
        common.add_config_command(clutrr_subparsers, name, func, summary, description, config_help=_CONFIG_HELP,
                               override_help=_OVERRIDE_HELP, workdir_help="run directory (checkpoints, metrics, model/)")

    evaluate = clutrr_subparsers.add_parser(
        "eval", help="accuracy of a trained teacher or student on CSV files, as JSON",
        description="Loads the model of a finished train-teacher / distill run (its workdir or model/ folder) "
                    "and prints JSON with accuracy overall, per noise task, per k and per (task, k), plus counts "
                    "of truncated stories and of answers outside the model's labels (counted as wrong). For a "
                    "teacher on a file whose rows label their noise edges (the reference generator's files), "
                    "also the accuracy with those labels replaced by 'unlabelled' (accuracy_noise_unlabelled; "
                    "null for files without labelled noise) and the count of such rows (rows_noise_labelled).")
    evaluate.add_argument("--checkpoint", required=True, help="workdir of a finished run, or its model/ folder")
    evaluate.add_argument("--csv", required=True, action="append",
                          help="CSV in the released CLUTRR format (repeat for several files)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (default 64)")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip malformed rows (counted in the output)")
    evaluate.set_defaults(func=_eval)
