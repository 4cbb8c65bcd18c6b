"""The `jaxalign` command line.

Each feature keeps its subcommands next to its code, in a module with one function
`add_commands(subparsers)` that adds its parsers and sets `func` (called with the parsed args, returns an exit
code). This file only collects them, so `jaxalign --help` lists every command and importing one feature never
imports another. A command module is imported only when listed in `COMMAND_MODULES`.
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
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # a real missing dependency inside the module: say so
                raise
            continue
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
