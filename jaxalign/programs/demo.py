"""`jaxalign demo --out DIR`: does retrieval help a small VLM on easy-vqa? Baseline, TinyAlign and two controls,
over seeds, on a CPU.

What it runs, top to bottom:

1. **Towers** (`jaxalign.programs.pretrain_towers`): a tiny SigLIP-style ViT and a tiny Llama-family LM pretrained
   on easy-vqa by the demo itself (nothing can be downloaded), cached under `~/.cache/jaxalign/demo_towers`
   ($JAXALIGN_CACHE) under a fingerprint of their settings and code, so a second demo skips it. Frozen from then on.
2. **Four methods** (`METHODS`), each with its own stage 1 (captions; connectors trained, LM frozen) and then, for
   every seed, stage 2 (questions; connectors and LM trained) on 100% and on 40% of the demo's stage-2 data:
   - `baseline`: retrieval off, the TinyLLaVA recipe;
   - `tinyalign`: retrieval from the demo's memory (below), the neighbours' values spliced after the image;
   - `shuffle_within_group`: the same memory with each retrieved value replaced by another row's value of the
     same group (the right null: as many tokens, the same kind of text, no information about this query);
   - `oracle`: the sample's own value (its image's caption) in every slot: the upper bound. If even the oracle
     does not help, the LM is not reading the retrieved tokens.
   The memory (`DemoSettings.bank`): by default `image_captions`, one entry per captioned training image with its
   caption ("a red circle") as the value, the paper's image-caption memory; it does not shrink with the data
   fraction. Its keys and queries (`DemoSettings.key_encoder`) are by default the image's `silhouette`
   (`jaxalign.align.silhouette`: the foreground's outline on an 8 x 8 grid and its mean colour, a second encoder
   that sees the shape the tiny frozen ViT misses: its neighbours share the query's shape 99% of the time, the
   ViT's 49%); `towers` keys by the frozen ViT's mean patch embedding instead. Training queries leave out every
   entry of their own image (`retrieval.leave_out='group'`), as test queries cannot retrieve theirs. `answers` is
   the earlier bank: the training questions keyed 0.4 image / 0.6 text with their answers as values.
   Every run is `jaxalign.programs.tinyalign_trainer.train_and_evaluate` with the tiny config `jaxalign/configs/
   tinyalign_tiny.py` pointed at the cached towers; its results carry the retrieval diagnostics (how often the
   retrieved values agree with the answer, the colour and the shape; `retrieval_precision`), measured at the
   first seed for the image-caption memory (its retrievals depend on the image alone, not on the training).
3. **Report**: per-seed results, their mean and std per run (`results.json` keys `seeds`, `runs`, `mean`, `std`),
   differences paired by seed with their standard error (`comparisons`; `*` marks those beyond twice it), the
   paper's claims answered from them (`claims`), the question-only prior, and DIR/loss_curves.png (stage 2, mean
   over seeds), DIR/stage1_loss_curves.png and DIR/accuracy.png (mean with std bars).

Data and sizes: stage 2 trains on a seeded subset of `train_questions` of the 38,575 easy-vqa training questions
(100%), or the first 40% of that same subset; the 40% runs train for 40% of the steps (the same number of epochs
over less data). Stage 2 runs 200 steps at batch 32 by default, about the demo's 12-minute budget on 2 CPU cores
(measured: 6 min 34 s where a step takes 0.069 s; 12 min 41 s at 0.1 s, before the 40% runs shared the 100% runs'
compiled step and all runs their decoded samples); the tiny LM learns to read its retrieved tokens only after some
10,000-20,000 samples (bench/RESULTS.md), so at 200 steps no retrieval method, not even the oracle, changes much,
and the demo's claims say so.
`--stage2-steps 600` (about 6 epochs; 15-25 minutes on 2 cores, by machine) is the setting where retrieval shows its
effect (bench/RESULTS.md has that run).

A seed draws the subset, the data order and the `eval_questions` test questions scored (greedy generation); all
methods share them at a given seed, so differences are paired. Stage 1 (one per method, seed
`seeds[0]`) trains on the derived captions.

Reruns: a seeded rerun on the same machine gives the same numbers bit for bit (tests/test_demo.py). On another
machine (another CPU core count, CPU, or JAX / XLA version), or with other code, floating-point rounding differs
in the last bits and a single run's cells move as far as a change of seed moves them (±0.15 on a colour or shape
cell): read means over seeds and the paired differences, never one run. Finished runs found in DIR with an
identical config are reused (`--fresh` reruns them).

Public API:
  Method, METHODS, DemoSettings, demo_settings(quick=False), stage_config(...), run_all(out, settings,
  cache_root=None) -> results dict, aggregate(runs, settings) -> {'mean', 'std', 'comparisons', 'claims'}, metric_value(run, metric),
  format_table(results) -> str, run_distillation(out, seed) -> results, format_distillation_table(results) -> str

The command (`jaxalign demo`, options and printing) is `jaxalign.commands.demo`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from typing import Any

from jaxalign.evaluate import seed_stats
from jaxalign.programs import pretrain_towers
from jaxalign.programs.pretrain_towers import TowerPretrainConfig

TRAIN_QUESTIONS_TOTAL = 38575  # questions in the easy-vqa training split (package data, fixed)
TEST_QUESTIONS_TOTAL = 9673
QUESTION_TYPES = ("shape", "color", "yes_no_shape", "yes_no_color")
@dataclasses.dataclass(frozen=True)
class Method:
    """A compared method: its name in tables and results, and its retrieval control (`config.retrieval.control`)."""

    name: str
    control: str


METHODS = (Method("baseline", "off"), Method("tinyalign", "real"),
           Method("shuffle_within_group", "shuffle_within_group"), Method("oracle", "oracle"),
           Method("constant", "constant"))
DEFAULT_METHODS = ("baseline", "tinyalign", "shuffle_within_group", "oracle")  # `constant`: bench/ studies
BANKS = ("image_captions", "answers")
KEY_ENCODERS = ("silhouette", "towers")  # what the image_captions bank is keyed by (`query.KEY_ENCODERS`)
PRIOR = "question-only prior"  # the name the prior takes among the runs of `aggregate`


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. `demo_settings(quick=True)` is the variant the tests and notebooks run.

    Attributes:
      towers: the tower pretraining (its fingerprint names the cache folder).
      methods: names of the `METHODS` run, in table order.
      seeds: stage-2 seeds (each draws the training subset, data order and scored test questions).
      bank: the retrieval memory: 'image_captions' (default) or 'answers' (see the module docstring).
      key_encoder: what the image_captions bank is keyed by: 'silhouette' (default) or 'towers'.
      train_questions: the stage-2 "100%" subset of the easy-vqa training questions.
      fractions: shares of that subset each method is fine-tuned on.
      stage1_steps, stage2_steps: optimizer steps (stage 2: at fraction 1.0; a fraction f trains f times as many).
      batch_size: global batch of both stages.
      stage1_lr, stage2_lr: peak learning rates (warm-up then cosine decay).
      k, value_length: retrieved neighbours and tokens per neighbour's value (every retrieval method).
      eval_questions: test questions scored by generation per run.
      eval_batch_size: generation batch.
      eval_loss: also compute the loss on the test questions (one more compiled program per run).
    """

    towers: TowerPretrainConfig = TowerPretrainConfig()
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    bank: str = "image_captions"
    key_encoder: str = "silhouette"
    train_questions: int = 3000
    fractions: tuple[float, ...] = (1.0, 0.4)
    stage1_steps: int = 120
    stage2_steps: int = 200
    batch_size: int = 32
    stage1_lr: float = 3e-3
    stage2_lr: float = 2e-3
    k: int = 3
    value_length: int = 4
    eval_questions: int = 600
    eval_batch_size: int = 100
    eval_loss: bool = False

    def __post_init__(self):
        known = {method.name for method in METHODS}
        if unknown := [name for name in self.methods if name not in known]:
            raise ValueError(f"unknown demo methods {unknown}; known: {sorted(known)}")
        if self.bank not in BANKS:
            raise ValueError(f"DemoSettings.bank={self.bank!r}; expected one of {BANKS}")
        if self.key_encoder not in KEY_ENCODERS:
            raise ValueError(f"DemoSettings.key_encoder={self.key_encoder!r}; expected one of {KEY_ENCODERS}")
        if not self.seeds:
            raise ValueError("DemoSettings.seeds is empty: give at least one seed")


def demo_settings(quick: bool = False) -> DemoSettings:
    """The full demo's settings, or with `quick` a few steps of everything (a smoke run: numbers mean little)."""
    if not quick:
        return DemoSettings()
    return DemoSettings(
        towers=dataclasses.replace(TowerPretrainConfig(), vision_steps=6, vision_batch=32, lm_steps=6, lm_batch=16),
        seeds=(0, 1), fractions=(1.0,), train_questions=200, stage1_steps=3, stage2_steps=5, batch_size=8,
        eval_questions=24, eval_batch_size=24, eval_loss=False)


def method_named(name: str) -> Method:
    return next(method for method in METHODS if method.name == name)


# ================================================================================================ configs
def stage_config(settings: DemoSettings, towers: pretrain_towers.PretrainedTowers, stage: int, control: str,
                 fraction: float, init_from: str = "", seed: int | None = None, bank_root: str = ""):
    """The ConfigDict of one training stage: `jaxalign/configs/tinyalign_tiny.py` pointed at the demo towers;
    `bank_root`, if given, the folder of the memory banks shared by the runs."""
    from jaxalign.configs import tinyalign_tiny

    seed = settings.seeds[0] if seed is None else seed
    steps = settings.stage1_steps if stage == 1 else max(1, round(settings.stage2_steps * fraction))
    config = tinyalign_tiny.get_config(f"stage={stage},retrieval={control},k={settings.k},steps={steps}")
    config.seed = seed
    config.model.source = "hf"
    config.model.vision_folder = towers.vision_folder
    config.model.lm_folder = towers.lm_folder
    # The demo towers have 3 layers and a contrastive head that reads the last one: its features are what the
    # pretraining shaped, so the connector takes them (real SigLIP towers use -2).
    config.model.vision_layer = -1
    config.model.init_from = init_from
    # Text (about 20 tokens) + 16 image tokens + k x value_length retrieved ones: 64 at the default k = 3.
    config.model.max_length = 52 + settings.k * settings.value_length
    config.retrieval.value_length = settings.value_length
    # Training queries never retrieve an entry of their own image (test queries cannot retrieve theirs).
    config.retrieval.leave_out = "group"
    if settings.bank == "image_captions":
        # The paper's image-caption memory: one entry per captioned training image, keyed by the image alone, its
        # caption as the value; the same memory whatever the fine-tuning fraction.
        config.data.memory_config = "captions"
        config.retrieval.image_weight, config.retrieval.text_weight = 1.0, 0.0
        config.retrieval.key_encoder = settings.key_encoder
    if bank_root:
        # Keys come from the frozen towers, values from the data: one bank serves every run of a stage (the
        # fingerprint check rebuilds it if that ever stops being true).
        bank_name = settings.bank if settings.bank == "answers" else f"{settings.bank}_{settings.key_encoder}"
        config.retrieval.memory_dir = os.path.join(bank_root, f"{bank_name}_stage{stage}")
    if stage == 1:
        config.data.fraction = 1.0
        config.eval.at_end = False  # stage 1 is judged by its stage-2 runs; skipping its eval saves compilations
    else:
        # The demo subset as a data fraction: with one seed a smaller fraction is a prefix of a larger one, so
        # the 40% subset lies inside the 100% subset.
        config.data.fraction = settings.train_questions * fraction / TRAIN_QUESTIONS_TOTAL
        config.eval.fraction = settings.eval_questions / TEST_QUESTIONS_TOTAL
        config.eval.max_batches = 0
        config.eval.batch_size = settings.eval_batch_size
        config.eval.max_new_tokens = 3
        config.eval.loss = settings.eval_loss
        config.eval.vqa = True
        config.eval.diagnostic_batches = 4  # training queries the retrieval diagnostics search (400)
        # The image-caption memory's keys and queries come from the image alone (a fixed function of it, or the
        # frozen tower): what it retrieves for a question does not depend on the run's training, so the
        # diagnostics are measured at the first seed only (about 5 s of every later run on 2 cores).
        config.eval.retrieval_diagnostics = settings.bank != "image_captions" or seed == settings.seeds[0]
    config.data.fraction_seed = seed
    config.train.batch_size = settings.batch_size
    config.train.total_steps = steps
    config.train.learning_rate = settings.stage1_lr if stage == 1 else settings.stage2_lr
    # Every 5th step's loss is logged: each logged step waits for the device, which costs about 10% of a tiny step.
    config.train.log_every = 5
    # A 100% run reads its 3,000 questions about twice: decoding and tokenising each once saves part of a step
    config.data.cache_samples = True
    # ... once for the whole demo: the 4 methods read the same subset of each seed (and 40% lies inside 100%), so
    # the runs share the processed samples (measured: 15 s of the demo's 6.5 minutes, bench/RESULTS.md).
    config.data.share_sample_cache = True
    config.train.checkpoint_every = steps  # only the final checkpoint (stage 2 starts from stage 1's)
    config.train.keep_checkpoints = 1
    config.progress = True
    return config


# ================================================================================================ runs
def _run_stage(config, workdir: str, fresh: bool) -> tuple[dict, bool]:
    """(results, reused): `train_and_evaluate` in `workdir`, or the results of an identical finished run there."""
    from jaxalign.programs import tinyalign_trainer as trainer

    marker = os.path.join(workdir, "demo_run.json")
    wanted = json.loads(config.to_json_best_effort())
    if not fresh and os.path.isfile(marker):
        with open(marker) as f:
            previous = json.load(f)
        if previous.get("config") == wanted:
            return previous["results"], True
    shutil.rmtree(workdir, ignore_errors=True)  # a different config must not resume this one's checkpoints
    start = time.perf_counter()
    results = trainer.train_and_evaluate(config, workdir)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    with open(marker, "w") as f:
        json.dump({"config": wanted, "results": results}, f, indent=1, default=str)
    return results, False


def _final_loss(history: list, last: int = 10) -> float | None:
    """Mean training loss of the last `last` logged steps (a single step's loss is a one-batch estimate)."""
    losses = [float(loss) for _, loss in history][-last:]
    return sum(losses) / len(losses) if losses else None


def _mean_loss(history: list) -> float | None:
    """Mean training loss over the whole run: the area under the loss curve per step (lower: converged sooner)."""
    losses = [float(loss) for _, loss in history]
    return sum(losses) / len(losses) if losses else None


def _run_summary(method: Method, fraction: float, seed: int, settings: DemoSettings, stage1: dict, stage2: dict,
                 reused: bool) -> dict:
    evaluation = stage2.get("eval", {})
    vqa = evaluation.get("vqa", {})
    precision = evaluation.get("retrieval_precision") or {}
    return {
        "name": run_name(method.name, fraction), "method": method.name, "control": method.control,
        "fraction": fraction, "seed": seed,
        "train_questions": int(round(settings.train_questions * fraction)), "steps": stage2.get("steps"),
        "final_train_loss": _final_loss(stage2.get("loss_history", [])),
        "mean_train_loss": _mean_loss(stage2.get("loss_history", [])),
        "eval_loss": evaluation.get("loss"), "accuracy": vqa.get("accuracy"), "eval_questions": vqa.get("count"),
        "per_type": {kind: value["accuracy"] for kind, value in vqa.get("per_type", {}).items()},
        "retrieval_precision": {name: {field: row.get("precision") for field, row in result.get("fields", {}).items()}
                                for name, result in precision.items() if result},
        "loss_history": stage2.get("loss_history", []), "stage1_loss_history": stage1.get("loss_history", []),
        "stage1_final_train_loss": _final_loss(stage1.get("loss_history", [])),
        "seconds": {"stage1": stage1.get("wall_seconds"), "stage2": stage2.get("wall_seconds")},
        "reused": reused, "stage1_workdir": stage1.get("workdir"), "stage2_workdir": stage2.get("workdir"),
        "examples": evaluation.get("vqa_examples", [])[:5], "memory": stage2.get("memory", {}),
        "skipped": evaluation.get("skipped"),
    }


def run_name(method: str, fraction: float) -> str:
    return f"{method} {fraction * 100:g}%"


def run_all(out: str, settings: DemoSettings, cache_root: str | None = None, fresh: bool = False) -> dict:
    """Runs the whole demo into `out` and returns the results dict (also written to out/results.json)."""
    from jaxalign.evaluate import plots

    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    towers = pretrain_towers.obtain_towers(settings.towers, cache_root)
    tower_seconds = time.perf_counter() - start
    runs, banks = [], os.path.join(out, "memory")
    for method in map(method_named, settings.methods):
        method_dir = os.path.join(out, "runs", method.name)
        print(f"\n=== {method.name} (retrieval {method.control}): stage 1 on captions ===", flush=True)
        stage1, reused1 = _run_stage(stage_config(settings, towers, 1, method.control, 1.0, bank_root=banks),
                                     os.path.join(method_dir, "stage1"), fresh)
        for seed in settings.seeds:
            for fraction in settings.fractions:
                name = run_name(method.name, fraction)
                print(f"\n=== {name}, seed {seed}: stage 2 on the questions ===", flush=True)
                workdir = os.path.join(method_dir, f"stage2_{round(fraction * 100)}_seed{seed}")
                # A stage 1 that ran again invalidates its stage-2 runs (their configs only name its folder).
                stage2, reused2 = _run_stage(stage_config(settings, towers, 2, method.control, fraction,
                                                          init_from=stage1["workdir"], seed=seed, bank_root=banks),
                                             workdir, fresh or not reused1)
                runs.append(_run_summary(method, fraction, seed, settings, stage1, stage2, reused1 and reused2))
    results = {
        "settings": dataclasses.asdict(settings),
        "towers": {"folder": towers.folder, "reused": towers.reused, "manifest": towers.manifest,
                   "seconds": round(tower_seconds, 1)},
        "seeds": list(settings.seeds),
        "runs": runs,
    }
    results["question_prior"] = {seed: question_prior(settings, seed) for seed in settings.seeds}
    results.update(aggregate(runs, settings, results["question_prior"]))
    results["environment"] = _environment()
    results["plots"] = _plots(results, settings, out, plots)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


# ================================================================================================ statistics
METRICS = ("accuracy", "final_train_loss", "mean_train_loss", "eval_loss")
# Paired comparisons at each fraction: every arm against each reference run (the baseline and the two nulls), and
# TinyAlign against the oracle; pairs whose runs are absent (the demo does not run `constant`) are left out.
COMPARED_ARMS = ("tinyalign", "shuffle_within_group", "oracle", "constant")
COMPARED_AGAINST = ("baseline", "shuffle_within_group", "constant")


def metric_value(run: dict, metric: str) -> float | None:
    """A run summary's value of `metric`: a top-level field ('accuracy', 'final_train_loss', ...) or
    'accuracy/<question type>'; None when absent."""
    if metric in run:
        return run[metric]
    return run["per_type"].get(metric.split("/", 1)[1]) if metric.startswith("accuracy/") else None


def _metrics() -> tuple[str, ...]:
    return METRICS + tuple(f"accuracy/{kind}" for kind in QUESTION_TYPES)


def aggregate(runs: list[dict], settings: DemoSettings, priors: dict | None = None) -> dict:
    """Mean and std over seeds of every run, the differences paired by seed that answer the paper's questions,
    and those answers in words. `priors` ({seed: question_prior(settings, seed)}), when given, enters as the run
    'question-only prior' (accuracy only), compared with the baseline: does the baseline use the image?

    Returns {'mean': {run name: {metric: mean}}, 'std': {...}, 'comparisons': [{'a', 'b', 'metric', 'mean', 'se',
    'n', 'exceeds_2se'}], 'claims': [sentences]}; metrics are accuracy (overall and 'accuracy/<type>'),
    final_train_loss (last 10 steps), mean_train_loss (whole run) and eval_loss.
    """
    by_name: dict[str, dict[int, dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], {})[run["seed"]] = run
    for seed, prior in (priors or {}).items():
        by_name.setdefault(PRIOR, {})[int(seed)] = {"accuracy": prior["accuracy"], "per_type": prior["per_type"]}
    mean, std = {}, {}
    for name, seeds in by_name.items():
        summaries = {metric: seed_stats.summarise([metric_value(run, metric) for run in seeds.values()])
                     for metric in _metrics()}
        mean[name] = {metric: summary["mean"] for metric, summary in summaries.items()}
        std[name] = {metric: summary["std"] for metric, summary in summaries.items()}

    def compare(a: str, b: str, metric: str) -> dict | None:
        if a not in by_name or b not in by_name:
            return None
        seeds = [seed for seed in settings.seeds if seed in by_name[a] and seed in by_name[b]]
        result = seed_stats.paired_difference([metric_value(by_name[a][seed], metric) for seed in seeds],
                                              [metric_value(by_name[b][seed], metric) for seed in seeds])
        return {"a": a, "b": b, "metric": metric, **{key: result[key] for key in ("n", "mean", "se", "exceeds_2se")}}

    pairs = []
    for fraction in settings.fractions:
        for other in COMPARED_AGAINST:
            for method in COMPARED_ARMS:
                pair = (run_name(method, fraction), run_name(other, fraction))
                # Each pair once: with the constant control run, 'constant - shuffle' is not also 'shuffle - constant'.
                if method != other and pair[::-1] not in pairs:
                    pairs.append(pair)
    # How much of the oracle's headroom retrieval reaches: the retrieved values against the sample's own.
    pairs += [(run_name("tinyalign", fraction), run_name("oracle", fraction)) for fraction in settings.fractions]
    low, full = min(settings.fractions), max(settings.fractions)
    if low != full:
        pairs.append((run_name("tinyalign", low), run_name("baseline", full)))
    if priors:
        pairs.append((run_name("baseline", full), PRIOR))
    comparisons = [row for a, b in pairs for metric in _metrics() if (row := compare(a, b, metric))
                   and row["n"]]
    mean.pop(PRIOR, None)
    std.pop(PRIOR, None)
    return {"mean": mean, "std": std, "comparisons": comparisons, "claims": _claims(comparisons, settings)}


def _find(comparisons: list[dict], a: str, b: str, metric: str) -> dict | None:
    return next((row for row in comparisons if (row["a"], row["b"], row["metric"]) == (a, b, metric)), None)


def _verdict(row: dict | None, lower_is_better: bool) -> str:
    """'yes' / 'no (the opposite)' / 'not shown' for "a is better than b" from a paired comparison."""
    if row is None or row["mean"] is None:
        return "not measured"
    better = row["mean"] < 0 if lower_is_better else row["mean"] > 0
    numbers = f"difference {row['mean']:+.3f} ± {row['se']:.3f} (SE, {row['n']} seeds)" if row["se"] is not None \
        else f"difference {row['mean']:+.3f} ({row['n']} seed)"
    if row["exceeds_2se"]:
        return ("yes" if better else "no, the opposite") + f": {numbers}"
    return f"not shown (within twice the SE): {numbers}"


def _uses_image(comparisons: list[dict], settings: DemoSettings) -> str | None:
    """Per question type, the baseline's accuracy above the question-only prior (paired by seed)."""
    base = run_name("baseline", max(settings.fractions))
    rows = [(kind, _find(comparisons, base, PRIOR, f"accuracy/{kind}")) for kind in QUESTION_TYPES]
    rows = [(kind, row) for kind, row in rows if row and row["mean"] is not None]
    if not rows:
        return None
    parts = [f"{kind} {row['mean']:+.3f}{'*' if row['exceeds_2se'] else ''}" for kind, row in rows]
    unused = [kind for kind, row in rows if not (row["exceeds_2se"] and row["mean"] > 0)]
    verdict = ("on every question type" if not unused else
               f"not on {', '.join(unused)}: there it answers as the question's wording alone suggests (with this "
               f"budget the tiny towers and {settings.stage2_steps} steps do not teach it to read those questions off "
               "the image)")
    return f"The baseline uses the image beyond the question-only prior {verdict}; by type: {', '.join(parts)}"


def _claims(comparisons: list[dict], settings: DemoSettings) -> list[str]:
    """The paper's claims, answered from the paired comparisons at the full fraction (and 40% vs 100%)."""
    full, low = max(settings.fractions), min(settings.fractions)
    ta, base, shuffle, oracle = (run_name(name, full) for name in
                                 ("tinyalign", "baseline", "shuffle_within_group", "oracle"))
    claims = [
        f"TinyAlign lowers the final training loss vs the baseline: "
        f"{_verdict(_find(comparisons, ta, base, 'final_train_loss'), True)}",
        f"TinyAlign converges faster (lower mean loss over the run) than the baseline: "
        f"{_verdict(_find(comparisons, ta, base, 'mean_train_loss'), True)}",
        f"... and than the within-group shuffle: {_verdict(_find(comparisons, ta, shuffle, 'mean_train_loss'), True)}",
        f"TinyAlign answers better than the baseline: {_verdict(_find(comparisons, ta, base, 'accuracy'), False)}",
        f"... and than the within-group shuffle: {_verdict(_find(comparisons, ta, shuffle, 'accuracy'), False)}",
        f"The oracle (own caption) answers better than the baseline (headroom): "
        f"{_verdict(_find(comparisons, oracle, base, 'accuracy'), False)}",
        f"TinyAlign (retrieved captions) answers better than the oracle (own caption): "
        f"{_verdict(_find(comparisons, ta, oracle, 'accuracy'), False)}",
    ]
    if (oracle_row := _find(comparisons, oracle, base, "accuracy")) and not (
            oracle_row["exceeds_2se"] and oracle_row["mean"] > 0):
        claims.append("Since even the oracle, whose values hold each image's own caption, does not answer better, "
                      f"the LM is not reading the retrieved tokens after {settings.stage2_steps} stage-2 steps "
                      f"({settings.stage2_steps * settings.batch_size:,} samples) at k = {settings.k}: no memory can "
                      "help it until it does (in our runs at k = 3 it learns to after about 10,000-20,000 training "
                      "samples, not at every seed; `jaxalign demo --stage2-steps 600` trains 19,200, and there "
                      "TinyAlign beats the baseline and its shuffle; at k = 1, one copy of the value, 600 "
                      "steps suffice at some seeds only: bench/RESULTS.md)")
    if uses := _uses_image(comparisons, settings):
        claims.append(uses)
    if low != full:
        row = _find(comparisons, run_name("tinyalign", low), base, "accuracy")
        if row and row["mean"] is not None:
            reaches = row["mean"] >= 0 or (row["se"] is not None and row["mean"] + 2 * row["se"] >= 0)
            claims.append(f"TinyAlign with {low * 100:g}% of the data reaches the baseline with {full * 100:g}%: "
                          f"{'yes (not worse beyond twice the SE)' if reaches else 'no'}: difference "
                          f"{row['mean']:+.3f}" + (f" ± {row['se']:.3f} (SE)" if row["se"] is not None else ""))
    return claims


def _mean_curve(histories: list[list]) -> list[tuple[int, float]]:
    """Stepwise mean of loss histories [(step, loss)] over the steps every history has."""
    steps = sorted(set.intersection(*(set(step for step, _ in history) for history in histories))) if histories else []
    tables = [dict(history) for history in histories]
    return [(step, sum(table[step] for table in tables) / len(tables)) for step in steps]


def _plots(results: dict, settings: DemoSettings, out: str, plots) -> dict:
    runs, mean, std = results["runs"], results["mean"], results["std"]
    names = list(dict.fromkeys(run["name"] for run in runs))
    prior = results["question_prior"][settings.seeds[0]]
    return {
        "loss_curves": plots.plot_loss_curves(
            {name: _mean_curve([run["loss_history"] for run in runs if run["name"] == name]) for name in names},
            os.path.join(out, "loss_curves.png"),
            title=f"stage 2 training loss, mean over {len(settings.seeds)} seeds", smooth=10),
        "stage1_loss_curves": plots.plot_loss_curves(
            {run["method"]: run["stage1_loss_history"] for run in runs
             if run["seed"] == settings.seeds[0] and run["fraction"] == settings.fractions[0]},
            os.path.join(out, "stage1_loss_curves.png"), title="stage 1 training loss (captions)", smooth=10),
        "accuracy": plots.plot_accuracy_bars(
            {**{name: {"overall": mean[name]["accuracy"] or 0.0,
                       **{kind: mean[name][f"accuracy/{kind}"] or 0.0 for kind in QUESTION_TYPES}} for name in names},
             "question-only prior": {"overall": prior["accuracy"], **prior["per_type"]}},
            os.path.join(out, "accuracy.png"),
            title=f"easy-vqa test accuracy, mean ± std over {len(settings.seeds)} seeds",
            errors={name: {"overall": std[name]["accuracy"] or 0.0,
                           **{kind: std[name][f"accuracy/{kind}"] or 0.0 for kind in QUESTION_TYPES}}
                    for name in names}),
    }


def _environment() -> dict:
    import jax

    return {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "load_average": [round(value, 2) for value in os.getloadavg()]}


def question_prior(settings: DemoSettings, seed: int | None = None) -> dict:
    """Accuracy of answering every scored test question with the answer its exact wording most often has in the
    training split, without looking at the image: what a model gets from the text alone. The same test subset as
    the runs of `seed` (the trainer's `select_fraction` with the same fraction and seed)."""
    seed = settings.seeds[0] if seed is None else seed
    import collections

    import numpy as np

    from jaxalign.data import easy_vqa
    from jaxalign.data.pipeline import select_fraction

    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for question, answer, _ in easy_vqa.read_questions("train"):
        answers[question][answer] += 1
    source = easy_vqa.load_easy_vqa("questions", "test")
    rows = np.sort(select_fraction(len(source), settings.eval_questions / TEST_QUESTIONS_TOTAL, seed))
    total, correct = collections.Counter(), collections.Counter()
    for row in rows:
        record = source[int(row)]
        question, answer, kind = (record[name].decode() for name in ("question", "answer", "question_type"))
        guess = answers[question].most_common(1)[0][0] if answers[question] else ""
        total[kind] += 1
        correct[kind] += int(guess == answer)
    return {"name": "question-only prior", "accuracy": sum(correct.values()) / max(sum(total.values()), 1),
            "eval_questions": sum(total.values()),
            "per_type": {kind: correct[kind] / total[kind] for kind in sorted(total)}}


# ================================================================================================ table
def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                     for column, (cell, width) in enumerate(zip(cells, widths)))


def format_table(results: dict) -> str:
    """The demo's tables: mean ± std over seeds per run, the paired comparisons, the claims answered."""
    seeds, mean, std = results.get("seeds", []), results.get("mean", {}), results.get("std", {})
    names = list(dict.fromkeys(run["name"] for run in results["runs"]))
    steps = {run["name"]: run["steps"] for run in results["runs"]}
    questions = {run["name"]: run["train_questions"] for run in results["runs"]}

    def cell(name: str, metric: str) -> str:
        return seed_stats.format_mean_std({"mean": mean.get(name, {}).get(metric),
                                           "std": std.get(name, {}).get(metric)}, digits=3)

    header = ["run", "questions", "steps", "train loss", "accuracy", *QUESTION_TYPES]
    rows = [[name, str(questions[name]), str(steps[name]), cell(name, "final_train_loss"), cell(name, "accuracy"),
             *[cell(name, f"accuracy/{kind}") for kind in QUESTION_TYPES]] for name in names]
    priors = list((results.get("question_prior") or {}).values())
    if priors:
        prior = {metric: seed_stats.summarise([p["accuracy"] if metric == "accuracy" else p["per_type"].get(metric)
                                               for p in priors]) for metric in ("accuracy", *QUESTION_TYPES)}
        rows.append(["question-only prior", "-", "-", "-",
                     *[seed_stats.format_mean_std(prior[metric]) for metric in ("accuracy", *QUESTION_TYPES)]])
    widths = [max(len(line[column]) for line in [header] + rows) for column in range(len(header))]
    lines = [f"easy-vqa, mean ± std over {len(seeds)} seeds {tuple(seeds)}", _row(header, widths)]
    lines.append("-" * len(lines[-1]))
    lines += [_row(row, widths) for row in rows]
    count = next((run["eval_questions"] for run in results["runs"] if run["eval_questions"]), 0)
    lines.append(f"train loss: mean of the last 10 stage-2 steps; accuracy: exact match on {count} easy-vqa test "
                 "questions per seed (greedy generation); question-only prior: the answer each question's wording "
                 "most often has in the training split (no image)")
    shown = [row for row in results.get("comparisons", [])
             if row["metric"] in ("accuracy", "accuracy/color", "accuracy/shape", "final_train_loss")]
    if shown:
        lines += ["", "paired by seed: a - b (mean ± SE); * = beyond twice the SE"]
        width = max(len(f"{row['a']} - {row['b']}") for row in shown)
        for row in shown:
            numbers = (f"{row['mean']:+.3f} ± {row['se']:.3f}" if row["se"] is not None else f"{row['mean']:+.3f}")
            lines.append(f"  {row['a'] + ' - ' + row['b']:<{width}}  {row['metric']:<18} {numbers}"
                         f"{' *' if row['exceeds_2se'] else ''}")
    if results.get("claims"):
        lines += ["", "the paper's claims, on this demo:"] + [f"  - {claim}" for claim in results["claims"]]
    return "\n".join(lines)


def run_distillation(out: str, seed: int = 0) -> dict:
    """The distillation half of the demo: `jaxalign.programs.clutrr_trainer.run_quick_distillation` into OUT/clutrr
    (a GNN teacher and two BiLSTM students, alone and with KD + contrastive, on generated clean data, one seed).

    Returns its results ({'settings', 'majority_baseline', 'teacher' | 'student_alone' | 'student_kd_contrastive':
    {'test_accuracy': ...}}), also written to OUT/clutrr/results.json.
    """
    from jaxalign.programs import clutrr_trainer as distill_trainer

    print("\n=== CLUTRR structured distillation on generated data ===", flush=True)
    results = distill_trainer.run_quick_distillation(os.path.join(out, "clutrr"), seed=seed)
    with open(os.path.join(out, "clutrr", "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


def format_distillation_table(results: dict) -> str:
    """Accuracy per generated test file of the most-frequent-answer baseline, the teacher and the two students,
    under lines that say what was trained on what, and where the comparison over seeds is."""
    titles = {"majority_baseline": "most frequent answer", "teacher": "GNN teacher (graph)",
              "student_alone": "BiLSTM alone (text)", "student_kd_contrastive": "BiLSTM + KD + NCE"}
    columns = [(key, title) for key, title in titles.items() if key in results]
    accuracy = {key: results[key] if key == "majority_baseline" else results[key].get("test_accuracy", {})
                for key, _ in columns}
    files = sorted({name for values in accuracy.values() for name in values})
    lines = ["CLUTRR on generated clean stories: accuracy per test file <task>.<k>_test.csv, k the number of",
             "relations to compose (k = 3 test patterns are held out of training; k = 4 is longer than any "
             "training path)."]
    if settings := results.get("settings"):
        lines += [f"{settings['train_rows']} training stories of k = 2, 3; {settings['test_rows_per_file']} test "
                  f"rows per file; seed {settings['seed']}. The teacher reads the story graph "
                  f"({settings['teacher_steps']} steps),",
                  f"each student the story text ({settings['student_steps']} steps)."]
    width = max(len(title) for _, title in columns) + 2
    lines.append(f"{'test file':<14}" + "".join(f"{title:>{width}}" for _, title in columns))
    for name in files:
        lines.append(f"{name:<14}" + "".join(f"{_cell(accuracy[key].get(name)):>{width}}" for key, _ in columns))
    lines += ["'most frequent answer' always gives the training set's most frequent answer (the chance level).",
              "One seed on easy templated data: this shows that the teacher and the students learn, not whether",
              "distillation helps; bench/clutrr_distill.py compares the students alone and distilled over seeds on "
              "the released",
              "CLUTRR data (results in bench/RESULTS.md)."]
    return "\n".join(lines)
