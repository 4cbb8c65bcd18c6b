"""`jaxalign demo --out DIR`: the command around `jaxalign.programs.demo` (options, checks, the printed table).

    jaxalign demo --out runs/demo            # about 5 minutes on a 2-core CPU (towers cached after the first)
    jaxalign demo --out /tmp/q --quick       # a smoke test of every part
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from jaxalign.programs import demo


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="the README's demo: baseline vs TinyAlign vs within-group shuffle vs oracle on easy-vqa, over seeds",
        description=(demo.__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(parser)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `jaxalign demo` options to `parser` and sets `func=run_demo`."""
    parser.add_argument("--out", required=True, help="output folder: results.json, PNG plots and every run's "
                        "workdir (runs/<method>/stage1, stage2_<percent>_seed<seed>)")
    parser.add_argument("--quick", action="store_true", help="a few steps of every method at 100%% of the data over 2 "
                        "seeds: a smoke test whose numbers "
                        "mean nothing (its time goes to compiling the programs, which later runs take from the "
                        "persistent compilation cache)")
    parser.add_argument("--cache", default=None, help="cache root for the pretrained demo towers (default "
                        "$JAXALIGN_CACHE or ~/.cache/jaxalign)")
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs found in --out instead of "
                        "reusing them (the towers stay cached; delete the cache folder to pretrain them again)")
    parser.add_argument("--train-questions", type=int, default=None, help="stage-2 training questions at 100%% "
                        "(default 3000 of 38,575)")
    parser.add_argument("--eval-questions", type=int, default=None, help="test questions scored per seed (default "
                        "600 of 9,673)")
    parser.add_argument("--seeds", type=_int_tuple, default=None, help="comma-separated stage-2 seeds (default "
                        "0,1,2; the comparisons are paired by seed, so give at least 2)")
    parser.add_argument("--methods", type=_name_tuple, default=None, help="comma-separated methods, from "
                        + ", ".join(method.name for method in demo.METHODS) + " (default: "
                        + ",".join(demo.DEFAULT_METHODS) + ")")
    parser.add_argument("--bank", choices=demo.BANKS, default=None, help="the retrieval memory: image_captions "
                        "(default: training images keyed by their embedding, captions as values) or answers (the "
                        "training questions keyed by image and text, answers as values)")
    parser.add_argument("--key-encoder", choices=demo.KEY_ENCODERS, default=None, help="what the image_captions "
                        "bank is keyed by: silhouette (default: the image's hand-made shape outline and colour) or "
                        "towers (the frozen ViT's mean patch embedding)")
    parser.add_argument("--stage2-steps", type=int, default=None, help="stage-2 steps at 100%% of the data "
                        "(default 200; a fraction f trains f times as many; 600 is where retrieval shows "
                        "its effect: 15-25 minutes on 2 cores, by machine)")
    parser.add_argument("--eval-loss", action="store_true", help="also report the loss on the test questions")
    parser.add_argument("--distillation", choices=("auto", "on", "off"), default="auto", help="also run the small "
                        "CLUTRR structured-distillation job on generated data (GNN teacher, BiLSTM student alone "
                        "and with KD + contrastive, one seed; about 2 minutes) and print their accuracy per test "
                        "file beside the most frequent answer; 'auto' runs it except with --quick")
    parser.set_defaults(func=run_demo)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def _name_tuple(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    known = {method.name for method in demo.METHODS}
    if unknown := [name for name in names if name not in known]:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; choose from {sorted(known)}")
    return names


def run_demo(args: argparse.Namespace) -> int:
    """The `jaxalign demo` command: runs everything, prints the table, writes results and plots."""
    settings = demo.demo_settings(quick=args.quick)
    overrides = {name: value for name, value in (("train_questions", args.train_questions),
                                                 ("eval_questions", args.eval_questions),
                                                 ("stage2_steps", args.stage2_steps), ("seeds", args.seeds),
                                                 ("methods", args.methods), ("bank", args.bank),
                                                 ("key_encoder", args.key_encoder)) if value is not None}
    if args.eval_loss:
        overrides["eval_loss"] = True
    settings = dataclasses.replace(settings, **overrides)
    if not 0 < settings.train_questions <= demo.TRAIN_QUESTIONS_TOTAL:
        print(f"--train-questions must be in 1..{demo.TRAIN_QUESTIONS_TOTAL}", file=sys.stderr)
        return 2
    if not 0 < settings.eval_questions <= demo.TEST_QUESTIONS_TOTAL:
        print(f"--eval-questions must be in 1..{demo.TEST_QUESTIONS_TOTAL}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = demo.run_all(args.out, settings, args.cache, fresh=args.fresh)
    distillation = None
    if args.distillation == "on" or (args.distillation == "auto" and not args.quick):
        distillation = demo.run_distillation(args.out)
    whole_seconds = time.perf_counter() - start
    print("\n" + demo.format_table(results))
    if distillation is not None:
        print("\n" + demo.format_distillation_table(distillation))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, " + ", ".join(
        os.path.basename(path) for path in results["plots"].values()))
    clutrr = f", CLUTRR part {whole_seconds - results['wall_seconds']:.1f} s" if distillation is not None else ""
    towers = results["towers"]
    print(f"demo wall time {whole_seconds:.1f} s: TinyAlign part {results['wall_seconds']} s (towers "
          f"{towers['seconds']} s, {'reused from the cache' if towers['reused'] else 'pretrained'}){clutrr}; "
          f"load average {results['environment']['load_average']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxalign demo", description=(demo.__doc__ or "").split("\n\n")[0])
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
