"""CLUTRR distillation weights chosen on validation: KD (alpha, tau) and the contrastive weight beta, one seed.

    .venv/bin/python bench/clutrr_kd_grid.py                  # ~1 h on 2 cores (13 students + 1 teacher)
    .venv/bin/python bench/clutrr_kd_grid.py --report-only    # rebuild the table from finished jobs

The paper's student loss is CE + alpha * tau^2 * KL(teacher_tau || student_tau) + beta * InfoNCE
(`CLUTRR_DISTILL.md`); it does not give alpha, tau or beta for CLUTRR. This script chooses them on a validation
split of the training rows, never on test, in two phases on the BiLSTM student (data_089907f8: train k = 2, 3):

1. the student alone and KD at every (alpha, tau) in {0.1, 0.5, 1} x {1, 2, 4} (beta = 0);
2. KD + contrastive at the best (alpha, tau) of phase 1 with beta in {0.1, 0.5, 1}.

Every run holds out the same 10% of the training rows (`data.valid_fraction`, `data.valid_seed` 0; the teacher
too, so it never trains on them), evaluates them every `--eval-every` steps, keeps the best evaluation's model and
stops after `--patience` evaluations without a gain, or at `--max-steps`. The choice is the highest validation
accuracy (ties: the smaller alpha, then the smaller tau / beta). Test accuracy per k is reported beside it for
information only. One seed: a choice, not a comparison; `bench/clutrr_distill.py` compares the arms over seeds.

Jobs run as parallel worker processes (each XLA single-threaded) and write `<out>/<name>/summary.json`; a finished
job is not rerun. The report goes to bench/RESULTS.md between this script's markers and to `<out>/grid.json`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clutrr_distill import DATA_ROOT, GENERALISATION as DATASET, ROOT, write_results  # noqa: E402  (a sibling script)

ALPHAS, TAUS, BETAS = (0.1, 0.5, 1.0), (1.0, 2.0, 4.0), (0.1, 0.5, 1.0)
START, END = "<!-- clutrr_kd_grid:start -->", "<!-- clutrr_kd_grid:end -->"


def job_name(alpha: float, tau: float, beta: float) -> str:
    """'alone', 'kd_a0.5_t2' or 'kdc_a0.5_t2_b0.1'."""
    if alpha == 0 and beta == 0:
        return "alone"
    kd = f"a{alpha:g}_t{tau:g}"
    return f"kd_{kd}" if beta == 0 else f"kdc_{kd}_b{beta:g}"


def phase1_jobs() -> list[tuple[float, float, float]]:
    return [(0.0, 1.0, 0.0)] + [(alpha, tau, 0.0) for alpha, tau in itertools.product(ALPHAS, TAUS)]


def phase2_jobs(alpha: float, tau: float) -> list[tuple[float, float, float]]:
    return [(alpha, tau, beta) for beta in BETAS]


def _common_overrides(args) -> list[str]:
    return [f"seed={args.seed}", "data.valid_fraction=0.1", "data.valid_seed=0"]


# ------------------------------------------------------------------------------------------------- jobs
def run_teacher(args) -> None:
    from jaxalign.configs.base import load_config
    from jaxalign.programs import clutrr_trainer as trainer

    config = load_config(os.path.join(ROOT, f"jaxalign/configs/clutrr_teacher.py:data_root={DATA_ROOT},"
                                            f"dataset={DATASET}"),
                         _common_overrides(args) + [f"steps={args.teacher_steps}"])
    result = trainer.train_teacher(config, os.path.join(args.out, "teacher"))
    _write(os.path.join(args.out, "teacher"), {"name": "teacher", "config": config.to_dict(), **_fields(result)})


def run_student(args, alpha: float, tau: float, beta: float) -> None:
    from jaxalign.configs.base import load_config
    from jaxalign.programs import clutrr_trainer as trainer

    name = job_name(alpha, tau, beta)
    config = load_config(os.path.join(ROOT, f"jaxalign/configs/clutrr_distill.py:variant=alone,"
                                            f"data_root={DATA_ROOT},dataset={DATASET}"),
                         _common_overrides(args) + [
                             f"steps={args.max_steps}", f"train.eval_every={args.eval_every}",
                             f"train.patience={args.patience}", f"distill.alpha={alpha}", f"distill.tau={tau}",
                             f"distill.beta={beta}", f"distill.teacher_workdir={os.path.join(args.out, 'teacher')}"])
    result = trainer.train_student(config, os.path.join(args.out, name))
    _write(os.path.join(args.out, name), {"name": name, "alpha": alpha, "tau": tau, "beta": beta,
                                          "config": config.to_dict(), **_fields(result)})


def _fields(result: dict) -> dict:
    return {key: result.get(key) for key in ("test_accuracy", "best_valid_accuracy", "best_step", "stopped_at",
                                             "valid_rows", "validation", "train_seconds")}


def _write(folder: str, summary: dict) -> None:
    with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as stream:
        json.dump(summary, stream, indent=1, default=str)


def _summary(out: str, name: str) -> dict | None:
    path = os.path.join(out, name, "summary.json")
    return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else None


def _launch_all(args, jobs: list[tuple[float, float, float]]) -> None:
    """Runs the unfinished student jobs in `args.workers` single-threaded processes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
               JAX_COMPILATION_CACHE_DIR=os.path.join(args.out, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def launch(job):
        name = job_name(*job) if job else "teacher"
        if _summary(args.out, name):
            return 0
        command = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--seed", str(args.seed),
                   "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every),
                   "--patience", str(args.patience), "--teacher-steps", str(args.teacher_steps),
                   "--job", *(map(str, job) if job else ["teacher"])]
        started = time.time()
        with open(os.path.join(args.out, f"{name}.log"), "w", encoding="utf-8") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {code} in {time.time() - started:.0f} s", flush=True)
        if code:
            raise RuntimeError(f"job {name} failed (exit {code}); see {args.out}/{name}.log")
        return code

    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(launch, jobs))


# ----------------------------------------------------------------------------------------------- choice
def best_of(summaries: list[dict]) -> dict:
    """The summary with the highest validation accuracy; ties: smaller alpha, then smaller tau, then beta."""
    return min(summaries, key=lambda s: (-s["best_valid_accuracy"], s["alpha"], s["tau"], s["beta"]))


def _k(name: str) -> int:
    return int(name.split("_")[0].split(".")[1])


def build_report(out: str, wall_seconds: float | None) -> tuple[str, dict]:
    """(markdown section, grid.json dict) from the finished jobs."""
    phase1 = [s for s in (_summary(out, job_name(*job)) for job in phase1_jobs()) if s]
    kd = [s for s in phase1 if s["name"] != "alone"]
    chosen = best_of(kd) if kd else None
    phase2 = [s for s in (_summary(out, job_name(*job)) for job in phase2_jobs(chosen["alpha"], chosen["tau"]))
              if s] if chosen else []
    chosen_beta = best_of(phase2) if phase2 else None
    teacher = _summary(out, "teacher")
    rows = ([teacher] if teacher else []) + phase1 + phase2
    files = sorted({name for s in rows for name in (s.get("test_accuracy") or {})}, key=_k)
    student = rows[-1]["config"] if rows else {}
    lines = [START, "## CLUTRR distillation weights chosen on validation (`bench/clutrr_kd_grid.py`)", "",
             f"BiLSTM student on {DATASET} (train k = 2, 3), seed {teacher['config']['seed'] if teacher else '?'}; "
             f"10% of the training rows held out for validation (the same rows for the teacher and every "
             f"student); students evaluated on them every {student.get('train', {}).get('eval_every')} steps, the "
             f"best evaluation kept, stopped after {student.get('train', {}).get('patience')} evaluations without a "
             f"gain or at {student.get('steps')} steps (batch {student.get('batch_size')}). The choice reads "
             "validation only; test accuracy is shown for information."
             + (f" Wall time: {wall_seconds / 60:.1f} min on the shared 2-core CPU (2 single-threaded workers)."
                if wall_seconds else ""), "",
             "    .venv/bin/python bench/clutrr_kd_grid.py", "",
             "| run | alpha | tau | beta | valid accuracy | best step | stopped at | "
             + " | ".join(f"test k={_k(name)}" for name in files) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(files)]
    for s in rows:
        marks = " (chosen)" if s is chosen or s is chosen_beta else ""
        cells = [s["name"] + marks, *(("-",) * 3 if s["name"] == "teacher" else
                                      (f"{s['alpha']:g}", f"{s['tau']:g}", f"{s['beta']:g}")),
                 f"{s['best_valid_accuracy']:.3f}" if s.get("best_valid_accuracy") is not None else "-",
                 str(s.get("best_step") or "-"), str(s.get("stopped_at") or "ran to the end"),
                 *(f"{(s.get('test_accuracy') or {}).get(name, float('nan')):.3f}" for name in files)]
        lines.append("| " + " | ".join(cells) + " |")
    grid = {"phase1": phase1, "phase2": phase2, "teacher": teacher,
            "chosen_kd": {k: chosen[k] for k in ("alpha", "tau", "best_valid_accuracy")} if chosen else None,
            "chosen_beta": {k: chosen_beta[k] for k in ("beta", "best_valid_accuracy")} if chosen_beta else None,
            "wall_seconds": wall_seconds}
    if chosen:
        alone = next((s for s in phase1 if s["name"] == "alone"), None)
        lines += ["", f"Chosen on validation: alpha = {chosen['alpha']:g}, tau = {chosen['tau']:g} (KD valid "
                      f"{chosen['best_valid_accuracy']:.3f}"
                      + (f", student alone {alone['best_valid_accuracy']:.3f}" if alone else "") + ")"
                      + (f"; beta = {chosen_beta['beta']:g} (KD + contrastive valid "
                         f"{chosen_beta['best_valid_accuracy']:.3f})" if chosen_beta else "") + "."]
    lines.append(END)
    return "\n".join(lines), grid


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "clutrr_kd_grid"),
                        help="job folders (default runs/clutrr_kd_grid, git-ignored)")
    parser.add_argument("--seed", type=int, default=0, help="the one seed of every run (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="parallel job processes (default 2)")
    parser.add_argument("--teacher-steps", type=int, default=1500, help="GNN teacher steps (default 1500)")
    parser.add_argument("--max-steps", type=int, default=4000,
                        help="student step limit (default 4000: about 26 epochs of the 9k rows at batch 64)")
    parser.add_argument("--eval-every", type=int, default=250, help="validation every this many steps")
    parser.add_argument("--patience", type=int, default=4,
                        help="stop after this many validations without a gain (default 4)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.job:
        if args.job == ["teacher"]:
            run_teacher(args)
        else:
            run_student(args, *map(float, args.job))
        return 0
    started = time.time()
    if not args.report_only:
        archive = os.path.join(DATA_ROOT, f"{DATASET}.zip")
        if not os.path.exists(archive):
            print(f"released CLUTRR data not found: {archive} (read from ../shared/data/clutrr beside the "
                  "repository)", file=sys.stderr)
            return 2
        os.makedirs(args.out, exist_ok=True)
        _launch_all(args, [None])
        _launch_all(args, phase1_jobs())
        chosen = best_of([s for s in (_summary(args.out, job_name(*job)) for job in phase1_jobs()[1:])])
        print(f"phase 1 chose alpha = {chosen['alpha']:g}, tau = {chosen['tau']:g} "
              f"(valid {chosen['best_valid_accuracy']:.3f})", flush=True)
        _launch_all(args, phase2_jobs(chosen["alpha"], chosen["tau"]))
    wall_file = os.path.join(args.out, "wall_seconds.json")
    if args.report_only:
        wall = json.load(open(wall_file, encoding="utf-8")) if os.path.exists(wall_file) else None
    else:
        wall = time.time() - started
        with open(wall_file, "w", encoding="utf-8") as stream:
            json.dump(wall, stream)
    report, grid = build_report(args.out, wall)
    with open(os.path.join(args.out, "grid.json"), "w", encoding="utf-8") as stream:
        json.dump(grid, stream, indent=1, default=str)
    write_results(report, os.path.join(ROOT, "bench", "RESULTS.md"), START, END)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
