"""The fuller TinyAlign study behind the demo: every control, k in {1, 3, 10}, enough seeds and test questions for a
standard error of at most 0.02 on a colour or shape cell.

    python bench/tinyalign_study.py --out runs/study                      # the whole grid (hours on 2 CPU cores)
    python bench/tinyalign_study.py --out runs/study --k 3 --seeds 0,1,2  # one column of it
    python bench/tinyalign_study.py --out runs/study600 --k 3 --seeds 0,1,2,3,4,5,6,7 --eval-questions 2000 \
        --stage2-steps 600 --section tinyalign_study_600
                                # stage 2 long enough for the LM to read its context (its RESULTS.md section)

Each k is one `jaxalign.programs.demo.run_all` (the demo's runs: towers, stage 1 per method, stage 2 per seed at
100% and 40% of the data) with the methods baseline, tinyalign, shuffle_within_group, oracle and constant; runs
already finished in --out are reused, so the study can be stopped and continued. Each finished run's summary (its
numbers, not its checkpoints) is also kept in bench/jobs/<section>/k<k>/, tracked by git, since runs/ goes with the
machine: a later invocation at the same settings skips the runs kept there, and the report pools every kept run of
the section, so seeds (also those of single cells: `--methods tinyalign,oracle --fractions 0.4 --seeds 8,9,...`)
accumulate session by session; `--report-only` rebuilds the report from the kept runs alone. It prints, per k, the mean ±
std over seeds of every run, the paired differences with their standard errors (`*` beyond twice it), the
retrieval precision of the values the LM reads, how many seeds read shape fully / partly / not, and the standard
error of each colour / shape cell mean against the 0.02 target, and writes <out>/study.json. The same report, as
markdown with the paired comparisons of every arm against the baseline and both nulls (the constant control
included) and of TinyAlign against the oracle, replaces the section `--section` of
bench/RESULTS.md, beside one plot per k (bench/<section>_k<k>_accuracy.png, bars of twice the SE); `--no-results`
leaves both alone. Rerunning a finished command reuses every run and only rewrites the report.

Sizing the target: a cell's accuracy over n_q test questions of that type has a sampling std of about
sqrt(p (1 - p) / n_q) per seed (0.044 for p = 0.5 and the ~130 colour questions of 1,000), and seeds add their
own variance; the SE of the mean over S seeds is std_over_seeds / sqrt(S). `--eval-questions 2000 --seeds 0..7`
reaches about 0.02 when the seed-to-seed std is 0.05; the printed SE column says whether it did.
"""
from __future__ import annotations

import argparse
import collections
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

from clutrr_distill import differing_fields, markers, write_results  # noqa: E402  (a sibling script)
from jaxalign.evaluate import seed_stats  # noqa: E402
from jaxalign.programs import demo, startup  # noqa: E402

STUDY_METHODS = ("baseline", "tinyalign", "shuffle_within_group", "oracle", "constant")
TARGET_SE = 0.02
DEFAULT_SECTION = "tinyalign_study"
# Shape accuracy at which a seed counts as reading the shape from its context fully / at least partly: seeds that
# cannot read it there (the baseline's and both nulls', k = 3 pool) answer shape questions at 0.28-0.55, so 0.6 is
# above all of them; 0.9 is about the lowest colour accuracy of a 100% TinyAlign or oracle seed (0.87-1.0).
SHAPE_READ_FULLY, SHAPE_READ_PARTLY = 0.9, 0.6
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
    parser.add_argument("--archive", default=None,
                        help="folder of the kept run summaries (default bench/jobs/SECTION): runs kept there at the "
                             "same settings are not rerun, and the report pools all of them")
    parser.add_argument("--no-archive", action="store_true", help="neither read nor keep run summaries: the report "
                                                                  "holds this invocation's runs only")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild the report of --k from the kept runs of the section")
    args = parser.parse_args(argv)
    if args.report_only and args.no_archive:
        parser.error("--report-only reads the kept runs: it cannot go with --no-archive")
    return args


# ================================================================================================ kept runs
# The fields of a run summary the report reads (the loss curves and generated examples stay in --out: kept for
# every run of a many-seed study they would weigh megabytes in git).
KEPT_FIELDS = ("name", "method", "control", "fraction", "seed", "train_questions", "steps", "final_train_loss",
               "mean_train_loss", "eval_loss", "accuracy", "eval_questions", "per_type", "retrieval_precision",
               "stage1_final_train_loss", "seconds", "skipped")


def archive_folder(section: str) -> str:
    return os.path.join(BENCH, "jobs", section)


# Settings that only say which runs an invocation asks for (a run's own config reads its seed, method and fraction,
# never the others'), so runs asked for by different invocations pool.
RUN_SELECTION = ("seeds", "methods", "fractions")


def comparable_settings(settings: demo.DemoSettings | dict) -> dict:
    """What two runs of one cell must share to be pooled: every demo setting but `RUN_SELECTION`."""
    if isinstance(settings, demo.DemoSettings):
        settings = dataclasses.asdict(settings)
    return {key: value for key, value in json.loads(json.dumps(settings)).items() if key not in RUN_SELECTION}


def kept_run_path(archive: str, k: int, name: str, seed: int) -> str:
    """bench/jobs/<section>/k3/tinyalign_40_seed5.json for the run 'tinyalign 40%' of seed 5 at k = 3."""
    return os.path.join(archive, f"k{k}", f"{name.replace('%', '').replace(' ', '_')}_seed{seed}.json")


def keep_runs(archive: str, k: int, settings: demo.DemoSettings, results: dict, command: str = "") -> int:
    """Writes each run of run_all's `results` to the archive (atomically: a parallel invocation may read it) with
    the settings it ran, its seed's question-only prior, the machine and the command that ran it; returns how many
    it wrote."""
    for run in results["runs"]:
        path = kept_run_path(archive, k, run["name"], run["seed"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = {"settings": comparable_settings(settings), "run": {key: run.get(key) for key in KEPT_FIELDS},
                  "question_prior": (results.get("question_prior") or {}).get(run["seed"]),
                  "environment": results.get("environment"),
                  "towers_fingerprint": ((results.get("towers") or {}).get("manifest") or {}).get("fingerprint"),
                  "command": command}
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
    return len(results["runs"])


def _field(settings: dict, dotted: str):
    for part in dotted.split("."):
        settings = settings.get(part) if isinstance(settings, dict) else None
    return settings


def kept_runs(archive: str, k: int, settings: demo.DemoSettings) -> list[dict]:
    """The records kept for k, all at `settings` (seeds, methods and fractions aside) and on the towers those
    settings make today; a record at other settings or of other towers is an error naming its file (and the
    fields), since pooling it would mix two studies (give another --section)."""
    folder = os.path.join(archive, f"k{k}")
    wanted = comparable_settings(settings)
    records = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name)) as f:
            record = json.load(f)
        towers = settings.towers.fingerprint()
        if record.get("towers_fingerprint") != towers:
            raise ValueError(f"{os.path.join(folder, name)} was trained on other towers (fingerprint "
                             f"{record.get('towers_fingerprint')} kept, {towers} now: their settings, their code or "
                             "JAX changed since, see pretrain_towers.TowerPretrainConfig.fingerprint); pool it with a "
                             "study of those towers, or give this one another --section")
        kept = comparable_settings(record["settings"])
        if kept != wanted:
            raise ValueError(f"{os.path.join(folder, name)} ran other settings: "
                             + "; ".join(f"{field} ({_field(kept, field)!r} kept, {_field(wanted, field)!r} now)"
                                         for field in differing_fields(kept, wanted))
                             + "; pool it with a study of those "
                             "settings, or give this one another --section")
        records.append(record)
    return records


def pooled_results(records: list[dict], settings: demo.DemoSettings) -> dict:
    """run_all-shaped results over every kept run: the runs in the study's method and fraction order, each seed's
    question-only prior, and `demo.aggregate` over the union of their seeds (a difference pairs the seeds both of
    its runs have)."""
    order = {method: index for index, method in enumerate(STUDY_METHODS)}
    runs = sorted((record["run"] for record in records),
                  key=lambda run: (order.get(run["method"], len(order)), -run["fraction"], run["seed"]))
    seeds = sorted({run["seed"] for run in runs})
    priors = {record["run"]["seed"]: record["question_prior"] for record in records if record.get("question_prior")}
    pooled = dataclasses.replace(settings, seeds=tuple(seeds),
                                 methods=tuple(dict.fromkeys(run["method"] for run in runs)),
                                 fractions=tuple(sorted({run["fraction"] for run in runs}, reverse=True)))
    last = records[-1] if records else {}
    commands = dict(collections.Counter(record.get("command") or "(not recorded)" for record in records))
    return {"settings": dataclasses.asdict(pooled), "seeds": seeds, "runs": runs, "question_prior": priors,
            "kept_commands": commands,
            "environment": last.get("environment") or {},
            "towers": {"manifest": {"fingerprint": last.get("towers_fingerprint", "?")}},
            **demo.aggregate(runs, pooled, priors)}


def run_study_k(args: argparse.Namespace, k: int, settings: demo.DemoSettings, command: str = "") -> dict:
    """The results of one k: without an archive, run_all as asked; with one, run_all seed by seed for the methods
    whose runs of that seed are not kept yet (each seed kept as soon as it finishes), then the pool of all kept
    runs."""
    out = os.path.join(args.out, f"k{k}")
    if args.no_archive:
        return demo.run_all(out, settings, args.cache)
    archive = args.archive or archive_folder(args.section)
    records = kept_runs(archive, k, settings)
    if not args.report_only:
        have = {(record["run"]["method"], record["run"]["fraction"], record["run"]["seed"]) for record in records}
        for seed in settings.seeds:
            missing = tuple(method for method in settings.methods
                            if any((method, fraction, seed) not in have for fraction in settings.fractions))
            if not missing:
                continue
            print(f"\n######## k = {k}, seed {seed}: {', '.join(missing)}", flush=True)
            results = demo.run_all(out, dataclasses.replace(settings, seeds=(seed,), methods=missing), args.cache)
            keep_runs(archive, k, settings, results, command)
        records = kept_runs(archive, k, settings)
        print(f"{len(records)} run(s) of k = {k} kept in {archive}", flush=True)
    if not records:
        raise ValueError(f"no runs of k = {k} kept in {archive} at these settings: nothing to report")
    return pooled_results(records, settings)


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


def seed_counts(results: dict) -> dict[str, int]:
    """{run name: seeds it has}: kept runs accumulate per arm, so arms may have different counts."""
    return dict(collections.Counter(run["name"] for run in results["runs"]))


def target_line(results: dict) -> str | None:
    """The seeds each cell above the SE target would need, and the stage-2 compute that would take on this machine
    (a run trains both of its cells, so each run name needs the larger of its colour and shape counts; the arms'
    seeds can be added separately with --methods)."""
    counts = seed_counts(results)
    needed = {(name, kind): seeds_needed(se, counts[name])
              for name, row in cell_errors(results).items() for kind, se in row.items()
              if se is not None and se > TARGET_SE and counts.get(name, 0) >= 2}
    if not needed:
        return None
    stage2 = [run["seconds"].get("stage2") for run in results["runs"] if (run.get("seconds") or {}).get("stage2")]
    further = {name: max(count for (other, _), count in needed.items() if other == name) - counts[name]
               for name, _ in needed}
    further_runs = sum(further.values())
    cost = (f"; at this study's {sum(stage2) / len(stage2):.0f} s per stage-2 run that is {further_runs} runs more "
            f"({', '.join(f'{name} {count}' for name, count in further.items())}), about "
            f"{further_runs * sum(stage2) / len(stage2) / 3600:.1f} h" if stage2 else "")
    return (f"Seeds the other cells would need at the spread measured here (S (SE / {TARGET_SE})^2): "
            + ", ".join(f"{name} {TYPE_HEADERS[kind]} {count}" for (name, kind), count in needed.items())
            + cost + ".")


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
    counts = seed_counts(results)
    lines = ["| run | steps | seeds | train loss | accuracy | " + " | ".join(TYPE_HEADERS.values())
             + " | SE shape / colour |", "|---|---|---|---|---|" + "---|" * len(TYPE_HEADERS) + "---|"]
    for name in mean:
        cells = [_mean_std(mean[name][metric], std[name][metric])
                 for metric in ("final_train_loss", "accuracy", *(f"accuracy/{kind}" for kind in TYPE_HEADERS))]
        se = " / ".join("-" if errors[name][kind] is None else f"{errors[name][kind]:.3f}" for kind in ("shape", "color"))
        lines.append(f"| {name} | {steps[name]} | {counts[name]} | " + " | ".join(cells) + f" | {se} |")
    priors = list((results.get("question_prior") or {}).values())
    if priors:
        cells = [seed_stats.summarise([prior["accuracy"] for prior in priors])]
        cells += [seed_stats.summarise([prior["per_type"].get(kind) for prior in priors]) for kind in TYPE_HEADERS]
        lines.append(f"| question-only prior | - | {len(priors)} | - | "
                     + " | ".join(seed_stats.format_mean_std(cell) for cell in cells)
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


def shape_reading(results: dict) -> dict[str, dict[str, int]]:
    """{run name: {'fully', 'partly', 'not': seeds}}: how many seeds of each run answer shape questions at
    SHAPE_READ_FULLY or more, between SHAPE_READ_PARTLY and it, or below it. Seeds split into these groups rather
    than spreading around the mean (whether the tiny LM learns to read its context is decided per seed), which is
    what makes the shape cells the slowest to reach the SE target."""
    counts = {}
    for run in results["runs"]:
        shape = (run.get("per_type") or {}).get("shape")
        if shape is None:
            continue
        group = "fully" if shape >= SHAPE_READ_FULLY else "partly" if shape >= SHAPE_READ_PARTLY else "not"
        counts.setdefault(run["name"], {"fully": 0, "partly": 0, "not": 0})[group] += 1
    return counts


def reading_lines(results: dict) -> list[str]:
    """The markdown line of `shape_reading` for the runs where some seed reads shape at least partly."""
    parts = [f"{name} {row['fully']} / {row['partly']} / {row['not']}"
             for name, row in shape_reading(results).items() if row["fully"] + row["partly"]]
    if not parts:
        return []
    return [f"Seeds reading shape fully (>= {SHAPE_READ_FULLY}) / partly ({SHAPE_READ_PARTLY}-{SHAPE_READ_FULLY}) / "
            f"not (below {SHAPE_READ_PARTLY}; runs where no seed reads it left out): " + ", ".join(parts) + "."]


def _seed_list(seeds: list[int]) -> str:
    """'(0, 1, 2)', or '0-40' for a consecutive run of more than eight seeds."""
    if len(seeds) > 8 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return str(tuple(seeds))


def k_report(k: int, results: dict, plot: str | None) -> list[str]:
    """The markdown of one k: both tables, the precision lines, the SE target and the claims as the demo words them."""
    errors = [se for row in cell_errors(results).values() for se in row.values() if se is not None]
    met = sum(se <= TARGET_SE for se in errors)
    seeds = results["seeds"]
    count = next((run["eval_questions"] for run in results["runs"] if run.get("eval_questions")), 0)
    counts = set(seed_counts(results).values())
    per_run = "" if len(counts) <= 1 else f" (the runs have {min(counts)}-{max(counts)} of them: column seeds)"
    lines = [f"### k = {k}: {len(seeds)} seeds {_seed_list(seeds)}{per_run}, {count} test questions per seed", ""]
    lines += run_table(results)
    lines += ["", "Paired by seed (a - b, mean ± SE; * beyond twice the SE):", ""] + comparison_table(results)
    if precision := precision_lines(results):
        lines += ["", "What the retrieved values carry:", ""] + precision
    if reading := reading_lines(results):
        lines += [""] + reading
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
        if kept := results.get("kept_commands"):
            lines += [f"k = {k} pools the {sum(kept.values())} runs kept in bench/jobs/{section}/k{k}, made by:", ""]
            lines += [f"- `{kept_command}`: {count} runs" for kept_command, count in kept.items()] + [""]
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
    counts = sorted(set(seed_counts(results).values()))
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return plots.plot_accuracy_bars(values, path, errors=bars,
                                    title=f"easy-vqa, k = {k}: mean over {seeds} seeds per run, bars 2 SE")


def main(argv=None) -> int:
    args = parse_args(argv)
    startup.start()
    study = {"args": vars(args), "by_k": {}}
    command = "python bench/tinyalign_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
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
        results = run_study_k(args, k, settings, command)
        by_k[k] = results
        errors = cell_errors(results)
        study["by_k"][k] = {key: results[key] for key in ("seeds", "mean", "std", "comparisons", "claims")}
        study["by_k"][k]["cell_se"] = errors
        study["by_k"][k]["shape_reading"] = shape_reading(results)
        study["by_k"][k]["retrieval_precision"] = {
            run["name"]: run["retrieval_precision"] for run in results["runs"] if run["seed"] == results["seeds"][0]}
        print(f"\n######## k = {k}\n" + demo.format_table(results))
        worst = max((se for row in errors.values() for se in row.values() if se is not None), default=None)
        print(f"largest SE of a colour / shape cell mean: {worst if worst is None else round(worst, 4)} "
              f"(target {TARGET_SE}: {'met' if worst is not None and worst <= TARGET_SE else 'not met'})")
    study["seconds"] = round(time.perf_counter() - started, 1)
    os.makedirs(args.out, exist_ok=True)     # --report-only trains nothing into it
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(study, f, indent=1, default=str)
    print(f"\nwrote {os.path.join(args.out, 'study.json')} ({study['seconds']} s)")
    plots = {} if args.no_results else {
        k: plot_accuracy(results, k, os.path.join(BENCH, f"{args.section}_k{k}_accuracy.png"))
        for k, results in by_k.items()}
    report = markdown_report(by_k, command, facts_line(by_k), args.section, plots)
    print("\n" + report)
    if not args.no_results:
        write_results(report, os.path.join(BENCH, "RESULTS.md"), *markers(args.section))
        print(f"wrote bench/RESULTS.md section {args.section} and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
