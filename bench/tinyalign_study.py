"""The fuller TinyAlign study behind the demo: every control, k in {1, 3, 10}, enough seeds and test questions for a
standard error of at most 0.02 on a colour or shape cell.

    python bench/tinyalign_study.py --out runs/study                      # the whole grid (hours on 2 CPU cores)
    python bench/tinyalign_study.py --out runs/study --k 3 --seeds 0,1,2  # one column of it
    python bench/tinyalign_study.py --out runs/study600 --k 3 --seeds 0,1,2 --eval-questions 600 \
        --methods baseline,tinyalign,shuffle_within_group,oracle --stage2-steps 600 --fractions 1.0
                                                        # stage 2 long enough for the LM to read its context

Each k is one `jaxalign.programs.demo.run_all` (the demo's runs: towers, stage 1 per method, stage 2 per seed at
100% and 40% of the data) with the methods baseline, tinyalign, shuffle_within_group, oracle and constant; runs
already finished in --out are reused, so the study can be stopped and continued. It prints, per k, the mean ±
std over seeds of every run, the paired differences with their standard errors (`*` beyond twice it), the
retrieval precision of the values the LM reads, and the standard error of each colour / shape cell mean against
the 0.02 target, and writes <out>/study.json.

Sizing the target: a cell's accuracy over n_q test questions of that type has a sampling std of about
sqrt(p (1 - p) / n_q) per seed (0.044 for p = 0.5 and the ~130 colour questions of 1,000), and seeds add their
own variance; the SE of the mean over S seeds is std_over_seeds / sqrt(S). `--eval-questions 2000 --seeds 0..7`
reaches about 0.02 when the seed-to-seed std is 0.05; the printed SE column says whether it did.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxalign.evaluate import seed_stats  # noqa: E402
from jaxalign.programs import demo, startup  # noqa: E402

STUDY_METHODS = ("baseline", "tinyalign", "shuffle_within_group", "oracle", "constant")
TARGET_SE = 0.02


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of every run (reused when finished) and study.json")
    parser.add_argument("--k", default="1,3,10", help="retrieved neighbours, comma-separated (default 1,3,10)")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="stage-2 seeds (default 0..7)")
    parser.add_argument("--eval-questions", type=int, default=2000, help="test questions per run (default 2000)")
    parser.add_argument("--methods", default=",".join(STUDY_METHODS), help="comma-separated methods")
    parser.add_argument("--bank", choices=demo.BANKS, default="image_captions")
    parser.add_argument("--key-encoder", choices=demo.KEY_ENCODERS, default="silhouette",
                        help="what the image_captions bank is keyed by (default silhouette, the demo's)")
    parser.add_argument("--stage2-steps", type=int, default=None,
                        help="stage-2 steps at 100%% of the data (default: the demo's; the LM learns to read the "
                             "retrieved tokens only after several hundred steps, bench/RESULTS.md)")
    parser.add_argument("--fractions", default=None, help="data fractions, comma-separated (default: the demo's)")
    parser.add_argument("--cache", default=None, help="tower cache root (default $JAXALIGN_CACHE)")
    return parser.parse_args(argv)


def cell_errors(results: dict) -> dict:
    """{run: {type: SE of the mean over seeds}} for the colour and shape cells."""
    errors = {}
    for name in results["mean"]:
        errors[name] = {}
        for kind in ("color", "shape"):
            values = [run["per_type"].get(kind) for run in results["runs"] if run["name"] == name]
            errors[name][kind] = seed_stats.summarise(values)["se"]
    return errors


def main(argv=None) -> int:
    args = parse_args(argv)
    startup.start()
    study = {"args": vars(args), "by_k": {}}
    started = time.perf_counter()
    for k in (int(part) for part in args.k.split(",")):
        settings = dataclasses.replace(
            demo.demo_settings(), k=k, seeds=tuple(int(part) for part in args.seeds.split(",")),
            eval_questions=args.eval_questions, methods=tuple(args.methods.split(",")), bank=args.bank,
            key_encoder=args.key_encoder)
        if args.stage2_steps:
            settings = dataclasses.replace(settings, stage2_steps=args.stage2_steps)
        if args.fractions:
            settings = dataclasses.replace(settings, fractions=tuple(float(part) for part in args.fractions.split(",")))
        results = demo.run_all(os.path.join(args.out, f"k{k}"), settings, args.cache)
        errors = cell_errors(results)
        study["by_k"][k] = {key: results[key] for key in ("seeds", "mean", "std", "comparisons", "claims")}
        study["by_k"][k]["cell_se"] = errors
        study["by_k"][k]["retrieval_precision"] = {
            run["name"]: run["retrieval_precision"] for run in results["runs"] if run["seed"] == settings.seeds[0]}
        print(f"\n######## k = {k}\n" + demo.format_table(results))
        worst = max((se for row in errors.values() for se in row.values() if se is not None), default=None)
        print(f"largest SE of a colour / shape cell mean: {worst if worst is None else round(worst, 4)} "
              f"(target {TARGET_SE}: {'met' if worst is not None and worst <= TARGET_SE else 'not met'})")
    study["seconds"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(study, f, indent=1, default=str)
    print(f"\nwrote {os.path.join(args.out, 'study.json')} ({study['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
