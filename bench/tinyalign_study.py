"""The fuller TinyAlign study behind the demo: every control, k in {1, 3, 10}, enough seeds and test questions for a
standard error of at most 0.02 on a colour or shape cell.

    python bench/tinyalign_study.py --out runs/study                      # the whole grid (hours on 2 CPU cores)
    python bench/tinyalign_study.py --out runs/study --k 3 --seeds 0,1,2  # one column of it
    python bench/tinyalign_study.py --out runs/study600 --k 3 --seeds 0,1,2,3,4,5,6,7 --eval-questions 2000 \
        --stage2-steps 600 --section tinyalign_study_600
                                # stage 2 long enough for the LM to read its context (its RESULTS.md section)

Each k is one `jaxalign.programs.demo.run_all` (the demo's runs: towers, stage 1 per method, stage 2 per seed at
100% and 40% of the data) with the methods baseline, tinyalign, shuffle_within_group, oracle and constant; runs
already finished in --out are reused, so the study can be stopped and continued. It prints, per k, the mean ±
std over seeds of every run, the paired differences with their standard errors (`*` beyond twice it), the
retrieval precision of the values the LM reads, and the standard error of each colour / shape cell mean against
the 0.02 target, and writes <out>/study.json. The same report, as markdown with the paired comparisons of every
arm against the baseline and both nulls (the constant control included), replaces the section `--section` of
bench/RESULTS.md, beside one plot per k (bench/<section>_k<k>_accuracy.png, bars of twice the SE); `--no-results`
leaves both alone. Rerunning a finished command reuses every run and only rewrites the report.

Sizing the target: a cell's accuracy over n_q test questions of that type has a sampling std of about
sqrt(p (1 - p) / n_q) per seed (0.044 for p = 0.5 and the ~130 colour questions of 1,000), and seeds add their
own variance; the SE of the mean over S seeds is std_over_seeds / sqrt(S). `--eval-questions 2000 --seeds 0..7`
reaches about 0.02 when the seed-to-seed std is 0.05; the printed SE column says whether it did.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

from clutrr_distill import markers, write_results  # noqa: E402  (a sibling script: the RESULTS.md section writer)
from jaxalign.evaluate import seed_stats  # noqa: E402
from jaxalign.programs import demo, startup  # noqa: E402

STUDY_METHODS = ("baseline", "tinyalign", "shuffle_within_group", "oracle", "constant")
TARGET_SE = 0.02
DEFAULT_SECTION = "tinyalign_study"
TYPE_HEADERS = {"shape": "shape", "color": "colour", "yes_no_shape": "yes/no shape", "yes_no_color": "yes/no colour"}


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
    parser.add_argument("--section", default=DEFAULT_SECTION,
                        help="the bench/RESULTS.md section this run's report replaces (between the markers "
                             "<!-- SECTION:start --> and <!-- SECTION:end -->; appended when absent) and the prefix "
                             "of its plots bench/SECTION_k<k>_accuracy.png (default tinyalign_study)")
    parser.add_argument("--no-results", action="store_true", help="print the report only; leave bench/RESULTS.md "
                                                                  "and the plots alone")
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


def seeds_needed(se: float, seeds: int, target: float = TARGET_SE) -> int:
    """Seeds a cell needs for an SE of at most `target` at the seed-to-seed spread it showed over `seeds` seeds:
    SE = std / sqrt(S), so S' = S (SE / target)^2 (an estimate: the spread itself is measured on S seeds)."""
    return max(seeds, math.ceil(seeds * (se / target) ** 2 - 1e-9))


def target_line(results: dict) -> str | None:
    """The seeds each cell above the SE target would need, and the stage-2 compute that would take on this machine
    (every further seed trains every run of the study: the most demanding cell sets the count)."""
    seeds = len(results["seeds"])
    needed = {f"{name} {TYPE_HEADERS[kind]}": seeds_needed(se, seeds)
              for name, row in cell_errors(results).items() for kind, se in row.items()
              if se is not None and se > TARGET_SE}
    if not needed or seeds < 2:
        return None
    stage2 = [run["seconds"].get("stage2") for run in results["runs"] if run["seconds"].get("stage2")]
    further_runs = (max(needed.values()) - seeds) * len(results["mean"])
    cost = (f"; at this run's {sum(stage2) / len(stage2):.0f} s per stage-2 run that is {further_runs} runs more, "
            f"about {further_runs * sum(stage2) / len(stage2) / 3600:.1f} h" if stage2 else "")
    return (f"Seeds the other cells would need at the spread measured here (S (SE / {TARGET_SE})^2): "
            + ", ".join(f"{cell} {count}" for cell, count in needed.items()) + cost + ".")


def facts_line(by_k: dict[int, dict]) -> str:
    """Settings, towers, machine and compute of the study, read from its results."""
    first = next(iter(by_k.values()))
    settings, environment = first["settings"], first.get("environment", {})
    seconds = sum((run["seconds"].get("stage2") or 0) for results in by_k.values() for run in results["runs"])
    fingerprint = (first.get("towers", {}).get("manifest") or {}).get("fingerprint", "?")
    return (f"Run {time.strftime('%Y-%m-%d')} on {environment.get('cpu_count', '?')} CPU cores (jax "
            f"{environment.get('jax', '?')}, load average at the end {environment.get('load_average', '?')}). "
            f"Stage 2: {settings['stage2_steps']} steps at 100% (a fraction f trains f times as many) at batch "
            f"{settings['batch_size']}, peak lr {settings['stage2_lr']}, on {settings['train_questions']} questions x "
            f"fractions {tuple(settings['fractions'])}; bank {settings['bank']} keyed by {settings['key_encoder']}; "
            f"towers {fingerprint}. The stage-2 runs took {seconds / 60:.1f} min of wall time in all (their own "
            "clocks, when they ran; finished runs are reused by a rerun). Mean ± std over seeds; the SE column is the "
            "standard error of the colour and shape cell means.")


def _mean_std(mean: float | None, std: float | None) -> str:
    return seed_stats.format_mean_std({"mean": mean, "std": std}, digits=3)


def _difference(row: dict | None) -> str:
    """'+0.123 ± 0.045 *' (mean ± SE of a paired difference, * beyond twice the SE), '-' when not measured."""
    if not row or row["mean"] is None:
        return "-"
    text = f"{row['mean']:+.3f}" + (f" ± {row['se']:.3f}" if row["se"] is not None else "")
    return text + (" *" if row["exceeds_2se"] else "")


def run_table(results: dict) -> list[str]:
    """Markdown rows of one k: mean ± std over seeds per run and question type, the SE of the colour and shape
    cell means (the study's 0.02 target), and the question-only prior."""
    mean, std, errors = results["mean"], results["std"], cell_errors(results)
    steps = {run["name"]: run["steps"] for run in results["runs"]}
    lines = ["| run | steps | train loss | accuracy | " + " | ".join(TYPE_HEADERS.values()) + " | SE shape / colour |",
             "|---|---|---|---|" + "---|" * len(TYPE_HEADERS) + "---|"]
    for name in mean:
        cells = [_mean_std(mean[name][metric], std[name][metric])
                 for metric in ("final_train_loss", "accuracy", *(f"accuracy/{kind}" for kind in TYPE_HEADERS))]
        se = " / ".join("-" if errors[name][kind] is None else f"{errors[name][kind]:.3f}" for kind in ("shape", "color"))
        lines.append(f"| {name} | {steps[name]} | " + " | ".join(cells) + f" | {se} |")
    priors = list((results.get("question_prior") or {}).values())
    if priors:
        cells = [seed_stats.summarise([prior["accuracy"] for prior in priors])]
        cells += [seed_stats.summarise([prior["per_type"].get(kind) for prior in priors]) for kind in TYPE_HEADERS]
        lines.append("| question-only prior | - | - | " + " | ".join(seed_stats.format_mean_std(cell) for cell in cells)
                     + " | - |")
    return lines


COMPARISON_METRICS = {"accuracy": "accuracy", "accuracy/shape": "shape", "accuracy/color": "colour",
                      "final_train_loss": "final train loss", "mean_train_loss": "mean train loss over the run"}


def comparison_table(results: dict) -> list[str]:
    """Markdown rows of the paired differences (a - b, mean ± SE over seeds, * beyond twice the SE)."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for row in results["comparisons"]:
        if row["metric"] in COMPARISON_METRICS:
            rows.setdefault((row["a"], row["b"]), {})[row["metric"]] = row
    lines = ["| a - b | " + " | ".join(COMPARISON_METRICS.values()) + " |",
             "|---|" + "---|" * len(COMPARISON_METRICS)]
    lines += [f"| {a} - {b} | " + " | ".join(_difference(metrics.get(metric)) for metric in COMPARISON_METRICS) + " |"
              for (a, b), metrics in rows.items()]
    return lines


def precision_lines(results: dict) -> list[str]:
    """What the retrieved values carry, per retrieval run at the first seed: the share of the k values naming the
    query image's colour / shape, for test queries, training queries and the keys' own kNN ceiling."""
    first = results["seeds"][0]
    lines = []
    for run in results["runs"]:
        # The oracle reads no bank row (results of older code measured its value ids, all -1, as 0).
        if run["seed"] != first or not run.get("retrieval_precision") or run.get("method") == "oracle":
            continue
        parts = [f"{where} {fields.get('color') or 0:.3f} / {fields.get('shape') or 0:.3f}"
                 for where, fields in run["retrieval_precision"].items() if fields]
        lines.append(f"- {run['name']} (seed {first}; colour / shape): " + ", ".join(parts))
    if lines and any(run.get("method") == "oracle" for run in results["runs"]):
        lines.append("- oracle: each sample's own caption, so its colour and shape by construction (no bank row read)")
    return lines


def k_report(k: int, results: dict, plot: str | None) -> list[str]:
    """The markdown of one k: both tables, the precision lines, the SE target and the claims as the demo words them."""
    errors = [se for row in cell_errors(results).values() for se in row.values() if se is not None]
    met = sum(se <= TARGET_SE for se in errors)
    seeds = results["seeds"]
    count = next((run["eval_questions"] for run in results["runs"] if run.get("eval_questions")), 0)
    lines = [f"### k = {k}: {len(seeds)} seeds {tuple(seeds)}, {count} test questions per seed", ""]
    lines += run_table(results)
    lines += ["", "Paired by seed (a - b, mean ± SE; * beyond twice the SE):", ""] + comparison_table(results)
    if precision := precision_lines(results):
        lines += ["", "What the retrieved values carry:", ""] + precision
    lines += ["", f"Colour / shape cells with a standard error of the mean at most {TARGET_SE}: {met} of {len(errors)} "
              f"(largest {max(errors):.3f})." if errors else "Standard errors: not measured (one seed)."]
    if needed := target_line(results):
        lines += ["", needed]
    lines += ["", "The paper's claims as the demo words them:", ""] + [f"- {claim}" for claim in results["claims"]]
    if plot:
        lines += ["", f"![accuracy per question type, k = {k}]({os.path.basename(plot)})"]
    return lines + [""]


def markdown_report(by_k: dict[int, dict], command: str, facts: str, section: str,
                    plots: dict[int, str] | None = None) -> str:
    """The study's RESULTS.md section (between `section`'s markers): the command, when and where it ran, and one
    `k_report` per k."""
    start, end = markers(section)
    lines = [start, f"## TinyAlign study (`bench/tinyalign_study.py --section {section}`)", "",
             "Command:", "", f"    {command}", "", facts, ""]
    for k, results in by_k.items():
        lines += k_report(k, results, (plots or {}).get(k))
    return "\n".join(lines).rstrip("\n") + "\n" + end


def plot_accuracy(results: dict, k: int, path: str) -> str:
    """Mean accuracy per question type of every run with twice-SE bars (the study reads SEs, not stds)."""
    from jaxalign.evaluate import plots

    kinds = ("accuracy", *(f"accuracy/{kind}" for kind in TYPE_HEADERS))
    groups = ("overall", *TYPE_HEADERS.values())
    values, bars = {}, {}
    for name in results["mean"]:
        summaries = [seed_stats.summarise([demo.metric_value(run, kind) for run in results["runs"]
                                           if run["name"] == name])
                     for kind in kinds]
        values[name] = {group: summary["mean"] or 0.0 for group, summary in zip(groups, summaries)}
        bars[name] = {group: 2 * (summary["se"] or 0.0) for group, summary in zip(groups, summaries)}
    return plots.plot_accuracy_bars(values, path, errors=bars,
                                    title=f"easy-vqa, k = {k}: mean over {len(results['seeds'])} seeds, bars 2 SE")


def main(argv=None) -> int:
    args = parse_args(argv)
    startup.start()
    study = {"args": vars(args), "by_k": {}}
    started = time.perf_counter()
    by_k: dict[int, dict] = {}
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
        by_k[k] = results
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
    plots = {} if args.no_results else {
        k: plot_accuracy(results, k, os.path.join(BENCH, f"{args.section}_k{k}_accuracy.png"))
        for k, results in by_k.items()}
    command = "python bench/tinyalign_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = markdown_report(by_k, command, facts_line(by_k), args.section, plots)
    print("\n" + report)
    if not args.no_results:
        write_results(report, os.path.join(BENCH, "RESULTS.md"), *markers(args.section))
        print(f"wrote bench/RESULTS.md section {args.section} and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
