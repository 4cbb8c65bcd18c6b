"""`jaxalign clutrr ...` commands: generate a data set, solve a CSV with the symbolic solver; the training commands
(train-teacher, distill, eval) are added from `jaxalign.commands.clutrr_training` under the same parser."""
from __future__ import annotations

import argparse
import json
import os

from jaxalign.commands import clutrr_training



def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 2,3, got {text!r}") from None


def _generate(args: argparse.Namespace) -> int:
    from jaxalign.clutrr import generator
    written = generator.generate_dataset(
        args.out_dir, args.train_ks, args.test_ks, args.tasks, args.rows_per_file, args.seed,
        train_rows_per_k=args.train_rows_per_k, holdout_fraction=args.holdout_fraction)
    print(json.dumps({"out_dir": os.fspath(args.out_dir), "files": sorted(written)}, indent=2))
    return 0


def _solve(args: argparse.Namespace) -> int:
    from jaxalign.clutrr import reader, solver
    report = reader.ReadReport()
    # Released files and the reference generator's files alike; the solver reads only the k path labels.
    rows = reader.read_csv(args.csv, skip_bad=args.skip_bad, report=report)
    result = solver.agreement(rows)
    output = {"csv": os.fspath(args.csv), **result.as_dict(), "rows_skipped": report.rows_skipped,
              "skipped": report.problems[:20], "rows_noise_labelled": sum(row.noise_labelled for row in rows)}
    print(json.dumps(output, indent=2))
    return 0 if result.agree_unambiguous == result.unambiguous and not result.unsolvable else 1


def add_clutrr_parser(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Adds the `clutrr` command and returns its sub-subparsers, for other modules to extend."""
    parser = subparsers.add_parser(
        "clutrr", help="CLUTRR kinship benchmark: generate data, solve, train and distill.",
        description="CLUTRR (Sinha et al., 2019): kinship reasoning over short stories. Subcommands generate "
                    "data sets in the released CSV format and check labels with the symbolic solver.")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    return parser.add_subparsers(dest="clutrr_command", metavar="SUBCOMMAND")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    clutrr_subparsers = add_clutrr_parser(subparsers)

    generate = clutrr_subparsers.add_parser(
        "generate", help="Write a generated data set folder in the released CSV format.",
        description="Generates train and test CSV files named like the released ones (<task>.<k>_test.csv, "
                    "<task>.<k1>,<task>.<k2>_train.csv) plus config.json, reproducibly from --seed.")
    generate.add_argument("--out-dir", required=True, help="folder to write (created if missing)")
    generate.add_argument("--train-ks", type=_int_list, default=[2, 3], help="training path lengths (default 2,3)")
    generate.add_argument("--test-ks", type=_int_list, default=list(range(2, 11)),
                          help="test path lengths (default 2,...,10)")
    generate.add_argument("--tasks", type=_int_list, default=[1],
                          help="noise tasks: 1 clean, 2 supporting, 3 irrelevant, 4 disconnected (default 1)")
    generate.add_argument("--rows-per-file", type=int, default=100, help="rows per test file (default 100)")
    generate.add_argument("--train-rows-per-k", type=int, default=None,
                          help="training rows per path length (default: --rows-per-file)")
    generate.add_argument("--holdout-fraction", type=float, default=0.2,
                          help="fraction of patterns at training lengths k >= 3 kept for testing (default 0.2)")
    generate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    generate.set_defaults(func=_generate)

    solve = clutrr_subparsers.add_parser(
        "solve", help="Label a CSV with the symbolic solver and compare with its labels.",
        description="Reads a CSV in the released format, derives each row's label from its path by the "
                    "composition rules (all bracketings), and prints JSON: rows, agreement on unambiguous rows, "
                    "ambiguous and unsolvable counts. Exit code 1 when an unambiguous row disagrees.")
    solve.add_argument("--csv", required=True, help="CSV file in the released CLUTRR format")
    solve.add_argument("--skip-bad", action="store_true", help="skip malformed rows (counted in the output)")
    solve.set_defaults(func=_solve)

    clutrr_training.add_training_commands(clutrr_subparsers)
