"""The CLUTRR benchmark's report: mean ± std per test file from job summaries, settings read from the configs the
jobs ran, marker splice."""
import importlib.util
import json
import os

import pytest

from jaxalign.configs.base import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("clutrr_bench", os.path.join(ROOT, "bench", "clutrr_distill.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _model(accuracy: dict) -> dict:
    return {"accuracy": accuracy, "train_seconds": 1.0, "final_metrics": {}, "train_stories_truncated": 3,
            "truncated": {name: 0 for name in accuracy}}


def _configs(steps=(1500, 2000), teacher_overrides=(), student_overrides=()) -> dict:
    """{model: config dict} as a job records them: the real config files (no data: `data_root=`), overridden."""
    configs = {"teacher": load_config(os.path.join(ROOT, "jaxalign/configs/clutrr_teacher.py:data_root="),
                                      [f"steps={steps[0]}", *teacher_overrides]).to_dict()}
    for variant in bench.VARIANTS:
        configs[variant] = load_config(
            os.path.join(ROOT, f"jaxalign/configs/clutrr_distill.py:data_root=,variant={variant}"),
            [f"steps={steps[1]}", *student_overrides]).to_dict()
    return json.loads(json.dumps(configs))


def _write_job(out, dataset, seed, accuracy_by_model, steps=(1500, 2000), configs=None, record_configs=True):
    folder = out / dataset / f"seed{seed}"
    folder.mkdir(parents=True)
    summary = {"dataset": dataset, "seed": seed, "teacher_steps": steps[0], "student_steps": steps[1],
               "models": {name: _model(acc) for name, acc in accuracy_by_model.items()}}
    if record_configs:
        summary["configs"] = configs or _configs(steps)
    summary["models"]["teacher"]["unambiguous"] = {f: {"rows": 10, "accuracy": 1.0} for f in accuracy_by_model["teacher"]}
    (folder / "summary.json").write_text(json.dumps(summary))


def _accuracies(k2: float, k3: float) -> dict:
    files = {"1.2_test.csv": k2, "1.3_test.csv": k3}
    return {name: dict(files) for name in ("teacher", *bench.VARIANTS)}


def _settings_line(report: str) -> str:
    return next(line for line in report.splitlines() if "Settings, from the jobs' configs:" in line)


def test_report_gives_mean_and_population_std_over_seeds_and_the_recorded_steps(tmp_path):
    _write_job(tmp_path, bench.GENERALISATION, 0, _accuracies(1.0, 0.90))
    _write_job(tmp_path, bench.GENERALISATION, 1, _accuracies(0.8, 0.96))
    report = bench.build_report(str(tmp_path), None)
    teacher_row = next(line for line in report.splitlines() if line.startswith("| GNN teacher"))
    assert teacher_row == "| GNN teacher (jaxalign) | 0.90 ± 0.10 | 0.93 ± 0.03 |"
    assert "seeds [0, 1]" in report and "teacher steps = 1500; student steps = 2000" in report
    assert bench._recorded_steps(str(tmp_path)) == (1500, 2000)


def test_the_settings_line_is_read_from_the_configs_the_jobs_ran(tmp_path):
    _write_job(tmp_path / "default", bench.GENERALISATION, 0, _accuracies(1.0, 0.9))
    line = _settings_line(bench.build_report(str(tmp_path / "default"), None))
    for expected in ("teacher = GAT 4 layers, width 64, 4 heads", "student = BiLSTM 1 layer, 32 per direction, "
                     "embed 48", "batch = 64", "train tokens = 96", "loss of BiLSTM alone = CE;",
                     "loss of BiLSTM + KD = CE + KD (alpha 1, tau 2);", "loss of BiLSTM + KD + contrastive = CE + "
                     "KD (alpha 1, tau 2) + contrastive (beta 0.5, InfoNCE temperature 0.1, 2-layer projection "
                     "heads to 64 dimensions)."):
        assert expected in line
    changed = _configs(teacher_overrides=["model.hidden=96", "batch_size=32"],
                       student_overrides=["distill.tau=3.5", "data.train_max_length=80", "batch_size=32"])
    _write_job(tmp_path / "changed", bench.GENERALISATION, 0, _accuracies(1.0, 0.9), configs=changed)
    line = _settings_line(bench.build_report(str(tmp_path / "changed"), None))
    for expected in ("teacher = GAT 4 layers, width 96, 4 heads", "loss of BiLSTM + KD = CE + KD (alpha 1, tau 3.5);",
                     "train tokens = 80", "batch = 32"):
        assert expected in line
    assert "tau 2" not in line and "width 64" not in line


def test_jobs_that_ran_different_configs_are_refused(tmp_path):
    _write_job(tmp_path, bench.GENERALISATION, 0, _accuracies(1.0, 0.9))
    _write_job(tmp_path, bench.GENERALISATION, 1, _accuracies(1.0, 0.9),
               configs=_configs(student_overrides=["distill.temperature=0.2"]))
    with pytest.raises(ValueError, match=r"different settings \(loss of BiLSTM \+ KD \+ contrastive\)"):
        bench.build_report(str(tmp_path), None)


def test_jobs_without_recorded_configs_read_their_runs_config_json(tmp_path):
    _write_job(tmp_path, bench.GENERALISATION, 0, _accuracies(1.0, 0.9), record_configs=False)
    report = bench.build_report(str(tmp_path), None)
    assert "teacher steps = 1500; student steps = 2000; other settings = not recorded" in report
    for model, config in _configs(teacher_overrides=["model.num_layers=2"]).items():
        run = tmp_path / bench.GENERALISATION / "seed0" / model
        run.mkdir()
        (run / "config.json").write_text(json.dumps(config))
    assert "teacher = GAT 2 layers, width 64" in _settings_line(bench.build_report(str(tmp_path), None))


def test_jobs_with_different_steps_are_refused(tmp_path):
    _write_job(tmp_path, bench.GENERALISATION, 0, _accuracies(1.0, 0.9))
    _write_job(tmp_path, bench.GENERALISATION, 1, _accuracies(1.0, 0.9), steps=(200, 150))
    with pytest.raises(ValueError, match="different or unrecorded step counts"):
        bench._recorded_steps(str(tmp_path))


def test_write_results_replaces_only_the_text_between_the_markers(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\nbefore\n{bench.START}\nold table\n{bench.END}\nafter: a reading\n")
    bench.write_results(f"{bench.START}\nnew table\n{bench.END}", str(path))
    assert path.read_text() == f"# Results\nbefore\n{bench.START}\nnew table\n{bench.END}\nafter: a reading\n"


def _row(path, target, tail_gender="female"):
    from types import SimpleNamespace
    return SimpleNamespace(edge_types=tuple(path), target=target, genders=(("a", "male"), ("b", tail_gender)),
                           query_edge=(0, 1))


def test_path_only_ceiling_counts_the_best_single_answer_per_ambiguous_path():
    from jaxalign.clutrr import solver
    ambiguous = ("wife", "son", "grandmother")          # the tail is the husband's mother or his wife's mother
    assert solver.solve_row(_row(ambiguous, "mother")).ambiguous
    rows = ([_row(("son", "aunt"), "sister")] * 3                           # unambiguous: always solvable
            + [_row(ambiguous, "mother")] * 4 + [_row(ambiguous, "mother-in-law")] * 2)
    assert bench.path_only_ceiling(rows) == (3 + 4) / 9


def test_the_ceiling_row_appears_in_the_k_table(tmp_path):
    _write_job(tmp_path, bench.GENERALISATION, 0, _accuracies(1.0, 0.9))
    report = bench.build_report(str(tmp_path), None, {"1.2_test.csv": 1.0, "1.3_test.csv": 100 / 105})
    assert "| ceiling of any path-only model | 1.000 | 0.952 |" in report.splitlines()
