"""The `jaxalign` command line.

Each feature keeps its subcommands next to its code, in a module with one function
`add_commands(subparsers)` that adds its parsers and sets `func` (called with the parsed args, returns an exit
code). This file only collects them, so `jaxalign --help` lists every command and importing one feature never
imports another. Command modules import their heavy dependencies
inside the command functions, so `jaxalign --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "jaxalign.io.commands",          # hf-verify, hf-export
    "jaxalign.memory.commands",      # build-memory, search-memory
    "jaxalign.clutrr.commands",      # clutrr generate / solve / train-teacher / distill / eval
    "jaxalign.align.commands",       # train, eval, demo
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


CONFIG_OVERRIDE_PREFIX = "--config."


def add_config_command(subparsers: argparse._SubParsersAction, name: str, func, summary: str, description: str, *,
                       config_help: str, override_help: str, workdir_help: str) -> argparse.ArgumentParser:
    """Adds a command that runs from an ml_collections config: `--config FILE[:variant] --workdir DIR` plus any
    `--config.a.b=value` overrides (collected by `main` into `args.overrides`)."""
    parser = subparsers.add_parser(name, help=summary, description=description, epilog=override_help)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--workdir", required=True, help=workdir_help)
    parser.set_defaults(func=func, overrides=[], accepts_config_overrides=True)
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
    # The one place a run starts: join the launcher's processes (if any) before anything touches the devices.
    from jaxalign import distributed

    distributed.initialize_from_environment()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
