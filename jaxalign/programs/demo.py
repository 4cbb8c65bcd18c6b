"""`jaxalign demo --out DIR`: TinyLLaVA baseline vs TinyAlign vs a shuffled-values control on easy-vqa, on a CPU.

What it runs, top to bottom:

1. **Towers** (`jaxalign.programs.pretrain_towers`): a tiny SigLIP-style ViT and a tiny Llama-family LM pretrained
   on easy-vqa by the demo itself (nothing can be downloaded), cached under `~/.cache/jaxalign/demo_towers`
   ($JAXALIGN_CACHE), so a second demo skips it. They are frozen from then on, as real towers would be.
2. **Three methods**, each with its own stage 1 (captions; connectors trained, LM frozen) and then stage 2
   (questions; connectors and LM trained) with 100% and with 40% of the demo's stage-2 data:
   - `baseline`: retrieval off, the TinyLLaVA recipe;
   - `tinyalign`: TinyAlign's default mode (masked query, leave-one-out search, neighbours' answer tokens as
     values, see `jaxalign.programs.tinyalign_trainer` and `jaxalign.align.memory_keys`);
   - `shuffled`: TinyAlign with the retrieved values taken from a fixed random permutation of the bank rows:
     as many extra tokens, no information about the query (separates a retrieval benefit from "more tokens").
   Every run is `jaxalign.programs.tinyalign_trainer.train_and_evaluate` with the tiny config `jaxalign/configs/
   tinyalign_tiny.py` pointed at the cached towers.
3. **Report**: a table (final training loss, eval loss, VQA accuracy overall and per question type), DIR/results.json,
   DIR/loss_curves.png (stage 2, one line per run), DIR/stage1_loss_curves.png and DIR/accuracy.png.

Data and sizes (chosen so that the whole demo fits in about ten minutes on a 2-core CPU): stage 2 trains on a
seeded subset of `train_questions` of the 38,575 easy-vqa training questions (100%), or the first 40% of that
same subset; the 40% runs train for 40% of the steps (the same number of epochs over less data, as in the
paper's claim). Stage 1 trains on the derived captions. Accuracy is measured on `eval_questions` test questions
(a seeded subset of the 9,673, the same for every run) by greedy generation. Every seed is fixed, so a rerun
gives the same numbers; finished runs found in DIR with an identical config are reused (`--fresh` reruns them).

Public API:
  DemoSettings, demo_settings(quick=False), run_all(out, settings, cache_root=None) -> results dict,
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

from jaxalign.programs import pretrain_towers
from jaxalign.programs.pretrain_towers import TowerPretrainConfig

TRAIN_QUESTIONS_TOTAL = 38575  # questions in the easy-vqa training split (package data, fixed)
TEST_QUESTIONS_TOTAL = 9673
QUESTION_TYPES = ("shape", "color", "yes_no_shape", "yes_no_color")
# (name, retrieval control) of the compared methods, in table order.
METHODS = (("baseline", "off"), ("tinyalign", "real"), ("shuffled", "shuffled"))


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. `demo_settings(quick=True)` is the variant the tests and notebooks run.

    Attributes:
      towers: the tower pretraining (its fingerprint names the cache folder).
      train_questions: the stage-2 "100%" subset of the easy-vqa training questions.
      fractions: shares of that subset each method is fine-tuned on.
      stage1_steps, stage2_steps: optimizer steps (stage 2: at fraction 1.0; a fraction f trains f times as many).
      batch_size: global batch of both stages.
      stage1_lr, stage2_lr: peak learning rates (warm-up then cosine decay).
      k, value_length: retrieved neighbours and tokens per neighbour's value (TinyAlign and the control).
      eval_questions: test questions scored by generation (a seeded subset, the same for every run).
      eval_batch_size: generation batch.
      eval_loss: also compute the loss on the test questions (off by default: one more compiled program per run,
        about a minute of the demo on 2 cores; `--eval-loss` turns it on).
      seed: seeds data order, connector initialisation and data subsets.
    """

    towers: TowerPretrainConfig = TowerPretrainConfig()
    train_questions: int = 3000
    fractions: tuple[float, ...] = (1.0, 0.4)
    stage1_steps: int = 120
    stage2_steps: int = 200
    batch_size: int = 32
    stage1_lr: float = 3e-3
    stage2_lr: float = 2e-3
    k: int = 3
    value_length: int = 4
    eval_questions: int = 1000
    eval_batch_size: int = 100
    eval_loss: bool = False
    seed: int = 0


def demo_settings(quick: bool = False) -> DemoSettings:
    """The full demo's settings, or with `quick` a few steps of everything (a smoke run: numbers mean little)."""
    if not quick:
        return DemoSettings()
    return DemoSettings(
        towers=dataclasses.replace(TowerPretrainConfig(), vision_steps=6, vision_batch=32, lm_steps=6, lm_batch=16),
        train_questions=200, stage1_steps=3, stage2_steps=5, batch_size=8, eval_questions=24, eval_batch_size=24,
        eval_loss=False)


# ================================================================================================ configs
def stage_config(settings: DemoSettings, towers: pretrain_towers.PretrainedTowers, stage: int, control: str,
                 fraction: float, init_from: str = ""):
    """The ConfigDict of one training stage: `jaxalign/configs/tinyalign_tiny.py` pointed at the demo towers."""
    from jaxalign.configs import tinyalign_tiny

    steps = settings.stage1_steps if stage == 1 else max(1, round(settings.stage2_steps * fraction))
    config = tinyalign_tiny.get_config(f"stage={stage},retrieval={control},k={settings.k},steps={steps}")
    config.seed = settings.seed
    config.model.source = "hf"
    config.model.vision_folder = towers.vision_folder
    config.model.lm_folder = towers.lm_folder
    # The demo towers have 3 layers and a contrastive head that reads the last one: its features are what the
    # pretraining shaped, so the connector takes them (real SigLIP towers use -2).
    config.model.vision_layer = -1
    config.model.init_from = init_from
    config.model.max_length = 64
    config.retrieval.value_length = settings.value_length
    if stage == 1:
        config.data.fraction = 1.0
        config.eval.at_end = False  # stage 1 is judged by its stage-2 run; skipping its eval saves compilations
    else:
        # The demo subset as a data fraction: with one seed a smaller fraction is a prefix of a larger one, so
        # the 40% subset lies inside the 100% subset (and the memory bank is built from the same share).
        config.data.fraction = settings.train_questions * fraction / TRAIN_QUESTIONS_TOTAL
        config.eval.fraction = settings.eval_questions / TEST_QUESTIONS_TOTAL
        config.eval.max_batches = 0
        config.eval.batch_size = settings.eval_batch_size
        config.eval.max_new_tokens = 3
        config.eval.loss = settings.eval_loss
        config.eval.vqa = True
    config.data.fraction_seed = settings.seed
    config.train.batch_size = settings.batch_size
    config.train.total_steps = steps
    config.train.learning_rate = settings.stage1_lr if stage == 1 else settings.stage2_lr
    config.train.log_every = 1
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


def _run_summary(name: str, method: str, control: str, fraction: float, settings: DemoSettings, stage1: dict,
                 stage2: dict, reused: bool) -> dict:
    evaluation = stage2.get("eval", {})
    vqa = evaluation.get("vqa", {})
    return {
        "name": name, "method": method, "control": control, "fraction": fraction,
        "train_questions": int(round(settings.train_questions * fraction)), "steps": stage2.get("steps"),
        "final_train_loss": _final_loss(stage2.get("loss_history", [])),
        "eval_loss": evaluation.get("loss"), "accuracy": vqa.get("accuracy"), "eval_questions": vqa.get("count"),
        "per_type": {kind: value["accuracy"] for kind, value in vqa.get("per_type", {}).items()},
        "loss_history": stage2.get("loss_history", []), "stage1_loss_history": stage1.get("loss_history", []),
        "stage1_final_train_loss": _final_loss(stage1.get("loss_history", [])),
        "seconds": {"stage1": stage1.get("wall_seconds"), "stage2": stage2.get("wall_seconds")},
        "reused": reused, "stage1_workdir": stage1.get("workdir"), "stage2_workdir": stage2.get("workdir"),
        "examples": evaluation.get("vqa_examples", [])[:5], "memory": stage2.get("memory", {}),
    }


def run_all(out: str, settings: DemoSettings, cache_root: str | None = None, fresh: bool = False) -> dict:
    """Runs the whole demo into `out` and returns the results dict (also written to out/results.json)."""
    from jaxalign.evaluate import plots

    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    towers = pretrain_towers.obtain_towers(settings.towers, cache_root)
    tower_seconds = time.perf_counter() - start
    runs = []
    for method, control in METHODS:
        method_dir = os.path.join(out, "runs", method)
        print(f"\n=== {method} (retrieval {control}): stage 1 on captions ===", flush=True)
        stage1, reused1 = _run_stage(stage_config(settings, towers, 1, control, 1.0),
                                     os.path.join(method_dir, "stage1"), fresh)
        for fraction in settings.fractions:
            percent = f"{fraction * 100:g}%"
            print(f"\n=== {method} (retrieval {control}): stage 2 on {percent} of the questions ===", flush=True)
            workdir = os.path.join(method_dir, f"stage2_{round(fraction * 100)}")
            # A stage 1 that ran again invalidates its stage-2 runs (their configs only name its folder).
            stage2, reused2 = _run_stage(stage_config(settings, towers, 2, control, fraction,
                                                      init_from=stage1["workdir"]), workdir, fresh or not reused1)
            runs.append(_run_summary(f"{method} {percent}", method, control, fraction, settings, stage1, stage2,
                                     reused1 and reused2))
    results = {
        "settings": dataclasses.asdict(settings),
        "towers": {"folder": towers.folder, "reused": towers.reused, "manifest": towers.manifest,
                   "seconds": round(tower_seconds, 1)},
        "runs": runs,
        "question_prior": question_prior(settings),
        "environment": _environment(),
    }
    results["plots"] = {
        "loss_curves": plots.plot_loss_curves({run["name"]: run["loss_history"] for run in runs},
                                              os.path.join(out, "loss_curves.png"),
                                              title="stage 2 training loss (easy-vqa questions)", smooth=10),
        "stage1_loss_curves": plots.plot_loss_curves(
            {run["method"]: run["stage1_loss_history"] for run in runs if run["fraction"] == settings.fractions[0]},
            os.path.join(out, "stage1_loss_curves.png"), title="stage 1 training loss (captions)", smooth=10),
        "accuracy": plots.plot_accuracy_bars(
            {**{run["name"]: {"overall": run["accuracy"] or 0.0, **run["per_type"]} for run in runs},
             "question-only prior": {"overall": results["question_prior"]["accuracy"],
                                     **results["question_prior"]["per_type"]}},
            os.path.join(out, "accuracy.png"), title=f"easy-vqa test accuracy ({settings.eval_questions} questions)"),
    }
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


def _environment() -> dict:
    import jax

    return {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "load_average": [round(value, 2) for value in os.getloadavg()]}


def question_prior(settings: DemoSettings) -> dict:
    """Accuracy of answering every scored test question with the answer its exact wording most often has in the
    training split, without looking at the image: what a model gets from the text alone. The same test subset as
    the runs (the trainer's `select_fraction` with the same fraction and seed)."""
    import collections

    import numpy as np

    from jaxalign.data import easy_vqa
    from jaxalign.data.pipeline import select_fraction

    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for question, answer, _ in easy_vqa.read_questions("train"):
        answers[question][answer] += 1
    source = easy_vqa.load_easy_vqa("questions", "test")
    rows = np.sort(select_fraction(len(source), settings.eval_questions / TEST_QUESTIONS_TOTAL, settings.seed))
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


def format_table(results: dict) -> str:
    """The demo's table: one row per run; accuracies are fractions of the scored test questions."""
    header = ["run", "questions", "steps", "train loss", "eval loss", "accuracy", *QUESTION_TYPES]
    rows = [[run["name"], str(run["train_questions"]), str(run["steps"]), _cell(run["final_train_loss"]),
             _cell(run["eval_loss"]), _cell(run["accuracy"]), *[_cell(run["per_type"].get(kind))
                                                                 for kind in QUESTION_TYPES]]
            for run in results["runs"]]
    widths = [max(len(line[column]) for line in [header] + rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(line, widths))) for line in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    prior = results.get("question_prior")
    if prior:
        cells = [prior["name"], "-", "-", "-", "-", _cell(prior["accuracy"]),
                 *[_cell(prior["per_type"].get(kind)) for kind in QUESTION_TYPES]]
        lines.append("  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(cells, widths))))
    count = next((run["eval_questions"] for run in results["runs"] if run["eval_questions"]), 0)
    lines.append(f"train loss: mean of the last 10 stage-2 steps; accuracy: exact match on {count} easy-vqa test "
                 "questions (greedy generation)")
    if prior:
        lines.append("question-only prior: the answer each question's wording most often has in the training split "
                     "(no image)")
    return "\n".join(lines)


def run_distillation(out: str, seed: int = 0) -> dict:
    """The distillation half of the demo: `jaxalign.programs.clutrr_trainer.run_quick_distillation` into OUT/clutrr.

    Returns its results ({'teacher' | 'student_alone' | 'student_kd_contrastive': {'test_accuracy': ...}}),
    also written to OUT/clutrr/results.json.
    """
    from jaxalign.programs import clutrr_trainer as distill_trainer

    print("\n=== CLUTRR structured distillation on generated data ===", flush=True)
    results = distill_trainer.run_quick_distillation(os.path.join(out, "clutrr"), seed=seed)
    with open(os.path.join(out, "clutrr", "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


def format_distillation_table(results: dict) -> str:
    """Accuracy per generated test file for the teacher and the two students."""
    models = [name for name in ("teacher", "student_alone", "student_kd_contrastive") if name in results]
    files = sorted({name for model in models for name in results[model].get("test_accuracy", {})})
    lines = ["CLUTRR (generated, clean): accuracy per test file",
             f"{'test file':<22}" + "".join(f"{model:>24}" for model in models)]
    for name in files:
        lines.append(f"{name:<22}" + "".join(f"{_cell(results[model]['test_accuracy'].get(name)):>24}"
                                            for model in models))
    return "\n".join(lines)
