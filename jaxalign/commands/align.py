"""`jaxalign train` and `jaxalign eval`: TinyAlign stages from a config file (and `jaxalign demo` when present).

    jaxalign train --config jaxalign/configs/tinyalign_tiny.py:stage=1 --workdir /tmp/tiny/stage1
    jaxalign train --config jaxalign/configs/tinyalign_qwen2.py:stage=2 --workdir runs/s2 \\
        --config.model.init_from=runs/s1 --config.train.batch_size=64
    jaxalign eval --config jaxalign/configs/tinyalign_tiny.py:stage=2 --workdir /tmp/tiny/stage2

Both print a JSON summary on stdout (the full results are in <workdir>/results.json after training), with
`process_count` and `device_count`: where the run ran. Under a launcher (`launch/local.sh 2 4 jaxalign train
...`) every process runs the command and prints the same summary; process 0 alone writes the files.
"""
from __future__ import annotations

import argparse
import json

from jaxalign.commands import common

_CONFIG_HELP = ("config file and optional variant, e.g. jaxalign/configs/tinyalign_tiny.py:stage=2,retrieval=off "
                "(the file's docstring lists its variants)")
_OVERRIDE_HELP = ("any config field may follow as --config.a.b=value (typed after the default), e.g. "
                  "--config.train.batch_size=64 --config.retrieval.k=10")


def _load(args: argparse.Namespace):
    from jaxalign.configs.base import load_config

    return load_config(args.config, args.overrides)


def _summary(results: dict) -> dict:
    """The headline numbers of a run (no long histories)."""
    evaluation = results.get("eval", {})
    vqa = evaluation.get("vqa", {})
    return {key: value for key, value in {
        "workdir": results.get("workdir"), "stage": results.get("stage"), "control": results.get("control"),
        "mode": results.get("mode"), "steps": results.get("steps"),
        "process_count": results.get("process_count"), "device_count": results.get("device_count"),
        "train_loss_first": results.get("train_loss_first"), "train_loss_last": results.get("train_loss_last"),
        "seconds_per_step": results.get("seconds_per_step"), "eval_loss": evaluation.get("loss"),
        "eval_perplexity": evaluation.get("perplexity"), "vqa_accuracy": vqa.get("accuracy"),
        "vqa_per_type": {kind: row["accuracy"] for kind, row in vqa.get("per_type", {}).items()} or None,
        "retrieval_precision": {name: {field: row.get("precision") for field, row in result.get("fields", {}).items()}
                                for name, result in (evaluation.get("retrieval_precision") or {}).items()
                                if result} or None,
        "memory": results.get("memory") or None,
    }.items() if value is not None}


def train_command(args: argparse.Namespace) -> int:
    from jaxalign.programs import tinyalign_trainer as trainer

    results = trainer.train_and_evaluate(_load(args), args.workdir)
    print(json.dumps(_summary(results), indent=1, default=str))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from jaxalign.programs import tinyalign_trainer as trainer

    results = trainer.evaluate_checkpoint(_load(args), args.workdir)
    print(json.dumps({"workdir": results["workdir"], "restored_params": results["restored_params"],
                      **_summary(results)}, indent=1, default=str))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    for name, func, summary, description in (
        ("train", train_command, "train (or resume) one TinyAlign stage, then evaluate it",
         "Trains one TinyAlign stage from a config (stage 1: connectors on captions; stage 2: connectors + LM on "
         "instructions / questions), resuming from the latest checkpoint in --workdir when there is one. Builds "
         "(or reuses) the memory bank in <workdir>/memory, writes checkpoints, metrics.jsonl, TensorBoard events, "
         "config.json and results.json, evaluates at the end and prints a JSON summary."),
        ("eval", eval_command, "evaluate the latest checkpoint of a TinyAlign run",
         "Evaluates the latest checkpoint in --workdir with the same config it was trained with: eval loss, "
         "perplexity and VQA accuracy per question type (greedy generation with the KV cache, retrieval at "
         "prefill). Prints a JSON summary."),
    ):
        common.add_config_command(subparsers, name, func, summary, description, config_help=_CONFIG_HELP,
                               override_help=_OVERRIDE_HELP, workdir_help="run directory (checkpoints, metrics, results)")
