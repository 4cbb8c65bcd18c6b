"""What every command module shares: the `--config FILE[:variant] --workdir DIR [--config.a.b=value ...]` form.

Command modules (`jaxalign.commands.*`) import this and the programs (`jaxalign.programs`) or the library; nothing
in the library or the programs imports a command module.
"""
from __future__ import annotations

import argparse

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
