"""The CLUTRR weight grid's choice: validation accuracy alone decides, ties go to the smaller weights, phase 2
searches beta at phase 1's choice, and the report marks the chosen runs."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("clutrr_kd_grid", os.path.join(ROOT, "bench", "clutrr_kd_grid.py"))
grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid)

CONFIG = {"seed": 0, "steps": 4000, "batch_size": 64, "train": {"eval_every": 250, "patience": 4}}


def _write(out, name, valid, test, alpha=0.0, tau=1.0, beta=0.0):
    (out / name).mkdir(parents=True)
    summary = {"name": name, "alpha": alpha, "tau": tau, "beta": beta, "config": CONFIG,
               "best_valid_accuracy": valid, "best_step": 500, "stopped_at": 1500,
               "test_accuracy": {"1.2_test.csv": test, "1.10_test.csv": test / 2}}
    (out / name / "summary.json").write_text(json.dumps(summary))


def test_job_names_and_phases_cover_the_grid():
    assert grid.job_name(0.0, 1.0, 0.0) == "alone"
    assert grid.job_name(0.5, 2.0, 0.0) == "kd_a0.5_t2" and grid.job_name(1.0, 4.0, 0.1) == "kdc_a1_t4_b0.1"
    assert len(grid.phase1_jobs()) == 10 and len(set(map(lambda j: grid.job_name(*j), grid.phase1_jobs()))) == 10
    assert grid.phase2_jobs(0.5, 2.0) == [(0.5, 2.0, 0.1), (0.5, 2.0, 0.5), (0.5, 2.0, 1.0)]


def test_the_choice_reads_validation_only_and_breaks_ties_towards_smaller_weights(tmp_path):
    _write(tmp_path, "teacher", 0.99, 0.99)
    _write(tmp_path, "alone", 0.70, 0.90)
    for alpha, tau, valid in [(0.1, 1.0, 0.80), (0.1, 2.0, 0.80), (1.0, 4.0, 0.80), (0.5, 1.0, 0.79)]:
        # (0.5, 1) has the best test accuracy but not the best validation accuracy: it must not be chosen.
        _write(tmp_path, grid.job_name(alpha, tau, 0.0), valid, 0.99 if alpha == 0.5 else 0.60, alpha, tau)
    _write(tmp_path, "kdc_a0.1_t1_b0.5", 0.82, 0.50, 0.1, 1.0, 0.5)
    _write(tmp_path, "kdc_a0.1_t1_b1", 0.82, 0.50, 0.1, 1.0, 1.0)
    _write(tmp_path, "kdc_a1_t4_b0.1", 0.95, 0.95, 1.0, 4.0, 0.1)  # not at phase 1's choice: not read
    report, result = grid.build_report(str(tmp_path), 600.0)
    assert result["chosen_kd"] == {"alpha": 0.1, "tau": 1.0, "best_valid_accuracy": 0.80}
    assert result["chosen_beta"] == {"beta": 0.5, "best_valid_accuracy": 0.82}
    assert [s["name"] for s in result["phase2"]] == ["kdc_a0.1_t1_b0.5", "kdc_a0.1_t1_b1"]
    assert "| kd_a0.1_t1 (chosen) | 0.1 | 1 | 0 | 0.800 |" in report
    assert "| kdc_a0.1_t1_b0.5 (chosen) |" in report and "kdc_a1_t4_b0.1" not in report
    assert "test k=2 | test k=10 |" in report and "10.0 min" in report
    assert report.startswith(grid.START) and report.endswith(grid.END)
