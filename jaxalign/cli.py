"""The `jaxalign` command line: the one entry point of every run.

Layout: the library (models, memory, align, distill, clutrr, data, train, io, evaluate, configs) holds no
command-line code; `jaxalign.programs` wires the library into whole runs (the trainers, the demo, where a run
starts); `jaxalign.commands` holds one module per group of subcommands, each with `add_commands(subparsers)`
that adds its parsers and sets `func` (called with the parsed args, returns an exit code). This file collects
them, so `jaxalign --help` lists every command, and calls `jaxalign.programs.startup.start()` (join the
launcher's processes, logging, compilation cache) before running one. Command modules import their heavy
dependencies inside the command functions where they can, so `jaxalign --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from jaxalign.commands.common import CONFIG_OVERRIDE_PREFIX

COMMAND_MODULES = (
    "jaxalign.commands.hf",          # hf-verify, hf-export
    "jaxalign.commands.memory",      # build-memory, search-memory
    "jaxalign.commands.clutrr",      # clutrr generate / solve / train-teacher / distill / eval
    "jaxalign.commands.prepare_data",  # prepare-data (the tfds data sets training reads, written once)
    "jaxalign.commands.align",       # train, eval
    "jaxalign.commands.predict",     # predict (one image, one question, with the retrieved neighbours)
    "jaxalign.commands.demo",        # demo
    "jaxalign.commands.score",       # score (standard VLM benchmarks' official scoring)
    "jaxalign.commands.eval_suite",  # eval-suite (answer and score every benchmark of a LLaVA eval folder)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxalign",
        description="Retrieval-augmented alignment of lightweight vision-language models (TinyAlign) and "
                    "structured knowledge distillation (CLUTRR), in JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `jaxalign COMMAND --help` for the options of one command.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses `argv` and runs the chosen command.

    Commands that read an ml_collections config set `accepts_config_overrides=True` in their defaults: they
    receive any `--config.a.b=value` arguments (big_vision's convention) as `args.overrides`; every other
    unknown argument is an error, as usual.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "accepts_config_overrides", False):
        args.overrides = [item for item in unknown if item.startswith(CONFIG_OVERRIDE_PREFIX)]
        unknown = [item for item in unknown if not item.startswith(CONFIG_OVERRIDE_PREFIX)]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}"
                     + ("; config overrides look like --config.train.batch_size=64"
                        if getattr(args, "accepts_config_overrides", False) else ""))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # The one place a run starts: join the launcher's processes (if any) before anything touches the devices,
    # then logging and the compilation cache.
    from jaxalign.programs import startup

    startup.start()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
