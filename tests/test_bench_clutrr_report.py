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


def _student_config(variant, overrides=()):
    return load_config(os.path.join(ROOT, f"jaxalign/configs/clutrr_distill.py:data_root=,variant={variant}"),
                       list(overrides))


@pytest.mark.parametrize("variant, expected", [("alone", (0.0, 2.0, 0.0)), ("kd", (0.3, 4.0, 0.0)),
                                               ("kd_contrastive", (0.3, 4.0, 0.25))])
def test_student_overrides_set_the_loss_weights_of_the_distilled_variants_only(variant, expected):
    config = _student_config(variant, bench.student_overrides(variant, kd_alpha=0.3, kd_tau=4.0, beta=0.25))
    assert (config.distill.alpha, config.distill.tau, config.distill.beta) == expected
    assert config.data.valid_fraction == 0.0 and config.train.patience == 0    # no early stopping unless asked


@pytest.mark.parametrize("variant, expected", [("alone", (0.0, 0.0)), ("kd", (1.0, 2.0, 0.0)),
                                               ("kd_contrastive", (1.0, 2.0, 0.5))])
def test_the_default_weights_give_todays_configs(variant, expected):
    config = _student_config(variant, bench.student_overrides(variant))
    if variant == "alone":
        assert (config.distill.alpha, config.distill.beta) == expected
    else:
        assert (config.distill.alpha, config.distill.tau, config.distill.beta) == expected
    assert config.to_dict() == _student_config(variant).to_dict()   # an old --out folder's settings still agree


def test_early_stopping_overrides_hold_out_the_same_rows_for_every_run():
    config = _student_config("kd", bench.student_overrides("kd", early_stopping=True, eval_every=100, patience=3))
    assert (config.data.valid_fraction, config.data.valid_seed) == (0.1, 0)
    assert (config.train.eval_every, config.train.patience) == (100, 3)
    teacher = load_config(os.path.join(ROOT, "jaxalign/configs/clutrr_teacher.py:data_root="),
                          bench.validation_overrides(True))
    assert (teacher.data.valid_fraction, teacher.data.valid_seed) == (0.1, 0)
    assert bench.validation_overrides(False) == []


def _paired_row(report: str, title: str, name: str) -> str:
    lines = report.splitlines()
    start = lines.index(title)
    return next(line for line in lines[start:] if line.startswith(f"| {name} |"))


def test_paired_table_gives_mean_and_standard_error_of_the_seed_differences(tmp_path):
    # k=2 differences kd - alone: 0.10, 0.20, 0.30 -> mean 0.2, sample std 0.1, SE 0.1 / sqrt(3) = 0.0577 (beyond
    # twice the SE: star). k=3 differences: +0.10, -0.10, +0.03 -> mean 0.01, sample std sqrt(0.0206/2) = 0.1015,
    # SE 0.0586 (no star). Mean over k: 0.10, 0.05, 0.165 -> mean 0.105, SE 0.0333 (star).
    alone = [(0.50, 0.40), (0.60, 0.50), (0.40, 0.30)]
    kd = [(0.60, 0.50), (0.80, 0.40), (0.70, 0.33)]
    for seed, ((a2, a3), (k2, k3)) in enumerate(zip(alone, kd)):
        accuracy = _accuracies(a2, a3)
        accuracy["kd"] = {"1.2_test.csv": k2, "1.3_test.csv": k3}
        accuracy["kd_contrastive"] = {"1.2_test.csv": a2, "1.3_test.csv": a3}   # the same as alone: no difference
        _write_job(tmp_path, bench.GENERALISATION, seed, accuracy)
    report = bench.build_report(str(tmp_path), None)
    title = f"{bench.PAIRED_TITLE}:"
    differences = {"k2": [0.10, 0.20, 0.30], "k3": [0.10, -0.10, 0.03], "mean": [0.10, 0.05, 0.165]}
    cells = []
    for values in differences.values():
        mean = sum(values) / 3
        se = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5 / 3 ** 0.5
        cells.append(f"{mean:+.3f} ± {se:.3f}" + ("*" if abs(mean) > 2 * se else ""))
    assert cells == ["+0.200 ± 0.058*", "+0.010 ± 0.059", "+0.105 ± 0.033*"]
    assert _paired_row(report, title, "BiLSTM + KD") == "| BiLSTM + KD | " + " | ".join(cells) + " |"
    assert (_paired_row(report, title, "BiLSTM + KD + contrastive")
            == "| BiLSTM + KD + contrastive | +0.000 ± 0.000 | +0.000 ± 0.000 | +0.000 ± 0.000 |")


def test_paired_table_with_one_seed_has_no_standard_error_and_no_star(tmp_path):
    accuracy = _accuracies(0.5, 0.4)
    accuracy["kd"] = {"1.2_test.csv": 0.9, "1.3_test.csv": 0.8}
    _write_job(tmp_path, bench.GENERALISATION, 0, accuracy)
    report = bench.build_report(str(tmp_path), None)
    assert (_paired_row(report, f"{bench.PAIRED_TITLE}:", "BiLSTM + KD")
            == "| BiLSTM + KD | +0.400 ± - | +0.400 ± - | +0.400 ± - |")


ROBUST_PAIRED_TITLE = f"{bench.PAIRED_TITLE}, test k = 3 per test noise, their mean, and the own-noise k = 2 file:"


def _robustness_report(tmp_path, dataset: str, files: dict, variant: str, file: str, gains) -> str:
    """The report of one robustness set whose jobs (one per gain) score every model at `files` but `variant`,
    which is `gain` above them on `file`."""
    for seed, gain in enumerate(gains):
        accuracy = {name: dict(files) for name in ("teacher", *bench.VARIANTS)}
        accuracy[variant][file] += gain
        _write_job(tmp_path, dataset, seed, accuracy)
    return bench.build_report(str(tmp_path), None)


def test_robustness_sets_get_a_paired_table_at_k3_per_test_noise(tmp_path):
    dataset = "data_06b8f2a1"
    report = _robustness_report(tmp_path, dataset, {"1.3_test.csv": 0.5, "2.3_test.csv": 0.6, "2.2_test.csv": 0.7},
                                "kd", "2.3_test.csv", (0.1, 0.2))
    # supporting at k = 3: differences 0.1, 0.2 -> mean 0.15, sample std 0.0707, SE 0.05: beyond 2 SE (0.1).
    # Mean of the two k = 3 files: differences 0.05, 0.10 -> mean 0.075, SE 0.025 (star); own-noise k = 2: none.
    assert (_paired_row(report, ROBUST_PAIRED_TITLE, f"supporting ({dataset}, 2 seeds): BiLSTM + KD")
            == f"| supporting ({dataset}, 2 seeds): BiLSTM + KD | +0.000 ± 0.000 | +0.150 ± 0.050* | - | - "
               "| +0.075 ± 0.025* | +0.000 ± 0.000 |")


def test_the_robustness_paired_table_has_no_k2_cell_for_a_set_without_a_k2_file(tmp_path):
    dataset = "data_523348e6"
    report = _robustness_report(tmp_path, dataset, {"1.3_test.csv": 0.5, "3.3_test.csv": 0.4}, "kd_contrastive",
                                "3.3_test.csv", (-0.0, -0.2, -0.1))
    # irrelevant at k = 3: -0.0, -0.2, -0.1 -> mean -0.1, sample std 0.1, SE 0.0577 (no star); the mean of the two
    # files halves both: -0.050 ± 0.029.
    assert (_paired_row(report, ROBUST_PAIRED_TITLE, f"irrelevant ({dataset}, 3 seeds): BiLSTM + KD + contrastive")
            == f"| irrelevant ({dataset}, 3 seeds): BiLSTM + KD + contrastive | +0.000 ± 0.000 | - "
               "| -0.100 ± 0.058 | - | -0.050 ± 0.029 | - |")


def test_early_stopping_shows_in_the_settings_and_the_best_and_stopped_steps(tmp_path):
    configs = _configs(teacher_overrides=bench.validation_overrides(True),
                       student_overrides=bench.validation_overrides(True) + ["train.eval_every=250",
                                                                               "train.patience=4"])
    for seed, (best, stopped) in enumerate(((750, 1750), (1250, None))):     # None: ran to the step limit
        _write_job(tmp_path, bench.GENERALISATION, seed, _accuracies(1.0, 0.9), configs=configs)
        path = tmp_path / bench.GENERALISATION / f"seed{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        for model in summary["models"].values():
            model.update(best_step=best, best_valid_accuracy=0.9, stopped_at=stopped)
        path.write_text(json.dumps(summary))
    report = bench.build_report(str(tmp_path), None)
    assert ("early stopping = 10% validation, every 250 steps, patience 4 (teacher: best of every 100 steps, "
            "patience 0)") in _settings_line(report)
    line = next(line for line in report.splitlines() if line.startswith(f"Early stopping on {bench.GENERALISATION}"))
    # best steps 750, 1250 -> 1000; stopped at 1750 and the limit 2000 -> 1875
    assert line.endswith(": BiLSTM alone 1000 / 1875; BiLSTM + KD 1000 / 1875; BiLSTM + KD + contrastive 1000 / 1875.")


def test_summaries_without_early_stopping_have_neither_settings_nor_steps_line(tmp_path):
    _write_job(tmp_path, bench.GENERALISATION, 0, _accuracies(1.0, 0.9))
    report = bench.build_report(str(tmp_path), None)
    assert "early stopping" not in _settings_line(report) and "Early stopping on" not in report


def test_model_summary_records_the_early_stopping_fields_when_the_trainer_gives_them():
    result = {"test_accuracy": {"1.2_test.csv": 0.9}, "train_seconds": 1.0, "final_metrics": {},
              "test": {"1.2_test.csv": {"truncated": 0}}}
    assert {k: bench._model_summary(result)[k] for k in ("best_step", "best_valid_accuracy", "stopped_at")} == {
        "best_step": None, "best_valid_accuracy": None, "stopped_at": None}
    result.update(best_step=500, best_valid_accuracy=0.8, stopped_at=1500)
    assert bench._model_summary(result)["best_step"] == 500 and bench._model_summary(result)["stopped_at"] == 1500


def _bert_configs(student="bert_lstm") -> dict:
    configs = _configs()
    for variant in bench.VARIANTS:
        configs[variant] = json.loads(json.dumps(load_config(
            os.path.join(ROOT, f"jaxalign/configs/clutrr_distill.py:data_root=,variant={variant},student={student}"),
            ["steps=2000", "batch_size=16"]).to_dict()))
    return configs


def test_a_bert_family_run_names_its_student_in_every_table_and_in_the_settings(tmp_path):
    accuracy = _accuracies(0.5, 0.4)
    _write_job(tmp_path, bench.GENERALISATION, 0, accuracy, configs=_bert_configs())
    report = bench.build_report(str(tmp_path), None)
    line = _settings_line(report)
    assert "student = BERT-LSTM (all-MiniLM-L6-v2 fine-tuned at lr 3e-05, dropout 0.1), LSTM 128 per direction" in line
    assert "loss of BERT-LSTM + KD = CE + KD (alpha 1, tau 2);" in line and "student batch = 16" in line
    rows = report.splitlines()
    assert "| BERT-LSTM alone (jaxalign) | 0.50 ± 0.00 | 0.40 ± 0.00 |" in rows
    assert _paired_row(report, f"{bench.PAIRED_TITLE}:", "BERT-LSTM + KD").startswith("| BERT-LSTM + KD | +0.000")
    assert "BiLSTM" not in report.replace("BiLSTM-Att", "")
    assert bench.student_label(_bert_configs("bert")) == "BERT" and bench.student_label({}) == "BiLSTM"


def test_a_named_section_has_its_own_markers_and_plot_and_leaves_the_others_alone(tmp_path):
    _write_job(tmp_path / "jobs", bench.GENERALISATION, 0, _accuracies(1.0, 0.9))
    report = bench.build_report(str(tmp_path / "jobs"), None, section="clutrr_bert")
    start, end = bench.markers("clutrr_bert")
    assert (start, end) == ("<!-- clutrr_bert:start -->", "<!-- clutrr_bert:end -->")
    assert report.startswith(start) and report.endswith(end) and "(clutrr_bert_accuracy_vs_k.png)" in report
    assert bench.plot_name() == "clutrr_accuracy_vs_k.png" and bench.markers() == (bench.START, bench.END)
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\n{bench.START}\nthe BiLSTM table\n{bench.END}\n")
    bench.write_results(report, str(path), start, end)
    bench.write_results(report.replace("0.90", "0.80"), str(path), start, end)     # a rerun replaces its own
    text = path.read_text()
    assert "the BiLSTM table" in text and text.count(start) == 1 and "0.80 ± 0.00" in text


def _teacher_config(overrides=()) -> dict:
    return load_config(os.path.join(ROOT, "jaxalign/configs/clutrr_teacher.py:data_root="),
                       ["steps=1500", *overrides]).to_dict()


def test_a_reused_teacher_must_come_from_a_finished_job_that_ran_the_same_teacher_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"seed3/summary.json not found"):
        bench.reused_teacher(str(tmp_path), bench.GENERALISATION, 3, _teacher_config())
    configs = _configs(teacher_overrides=bench.validation_overrides(True))
    _write_job(tmp_path, bench.GENERALISATION, 3, _accuracies(1.0, 0.9), configs=configs)
    (tmp_path / bench.GENERALISATION / "seed3" / "teacher").mkdir()
    folder, model, config = bench.reused_teacher(str(tmp_path), bench.GENERALISATION, 3,
                                                 _teacher_config(bench.validation_overrides(True)))
    assert folder == str(tmp_path / bench.GENERALISATION / "seed3" / "teacher")
    assert model["accuracy"] == {"1.2_test.csv": 1.0, "1.3_test.csv": 0.9} and config == configs["teacher"]
    with pytest.raises(ValueError, match=r"another config than this run's teacher \(data.valid_fraction\)"):
        bench.reused_teacher(str(tmp_path), bench.GENERALISATION, 3, _teacher_config())


def test_run_job_trains_every_arm_as_the_chosen_student_with_the_overrides_and_the_reused_teacher(tmp_path,
                                                                                                monkeypatch):
    from jaxalign.programs import clutrr_trainer
    trained = []

    def fake_train_student(config, workdir, rows=None):
        trained.append((os.path.basename(workdir), config.model.kind, config.batch_size,
                        config.distill.teacher_workdir, config.distill.alpha))
        return {"test_accuracy": {"1.2_test.csv": 0.5}, "train_seconds": 1.0, "final_metrics": {},
                "test": {"1.2_test.csv": {"truncated": 0}}}

    monkeypatch.setattr(clutrr_trainer, "read_rows", lambda path: ["row"] * 7)
    monkeypatch.setattr(clutrr_trainer, "train_student", fake_train_student)
    monkeypatch.setattr(clutrr_trainer, "train_teacher", lambda *a, **k: pytest.fail("the teacher is reused"))
    teacher = {"accuracy": {"1.2_test.csv": 1.0}}
    monkeypatch.setattr(bench, "reused_teacher", lambda root, dataset, seed, wanted: (
        f"{root}/{dataset}/seed{seed}/teacher", teacher, wanted))
    summary = bench.run_job(bench.GENERALISATION, 2, str(tmp_path), 100, 50, kd_alpha=0.3, student="bert_lstm",
                            student_settings=["batch_size=16"], teacher_from="earlier")
    teacher_dir = f"earlier/{bench.GENERALISATION}/seed2/teacher"
    assert trained == [("alone", "bert_lstm", 16, teacher_dir, 0.0), ("kd", "bert_lstm", 16, teacher_dir, 0.3),
                       ("kd_contrastive", "bert_lstm", 16, teacher_dir, 0.3)]
    assert summary["models"]["teacher"] == teacher and summary["teacher_from"] == os.path.abspath("earlier")
    assert bench.student_label(summary["configs"]) == "BERT-LSTM"
    assert json.loads((tmp_path / bench.GENERALISATION / "seed2" / "summary.json").read_text())["train_rows"] == 7
    with pytest.raises(ValueError, match="student='lstm' is not one of"):
        bench.run_job(bench.GENERALISATION, 2, str(tmp_path), 100, 50, student="lstm")


def test_the_report_gives_the_best_validation_accuracy_with_paired_differences_and_the_jobs_wall_times(tmp_path):
    for seed, (alone, kd) in enumerate(((0.80, 0.83), (0.82, 0.84), (0.81, 0.85))):
        _write_job(tmp_path, bench.GENERALISATION, seed, _accuracies(1.0, 0.9))
        path = tmp_path / bench.GENERALISATION / f"seed{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        for name, value in (("alone", alone), ("kd", kd), ("kd_contrastive", alone)):
            summary["models"][name].update(best_step=100, best_valid_accuracy=value, stopped_at=None)
        summary["wall_seconds"] = 60.0 * (seed + 1)
        path.write_text(json.dumps(summary))
    report = bench.build_report(str(tmp_path), 600.0)
    line = next(line for line in report.splitlines() if line.startswith("Best validation accuracy on"))
    # alone 0.80, 0.82, 0.81: mean 0.81, population std 0.00816; kd - alone 0.03, 0.02, 0.04: mean 0.03, SE 0.00577
    assert line.endswith(": BiLSTM alone 0.810 ± 0.008; BiLSTM + KD 0.840 ± 0.008 (+0.030 ± 0.006*); "
                         "BiLSTM + KD + contrastive 0.810 ± 0.008 (+0.000 ± 0.000).")
    assert "last invocation: 10.0 min" in report and "3 jobs, 6 min in all, 1.0-3.0 min each." in report


def _job_configs(seed=0, **overrides) -> dict:
    """{model: config dict} `run_job` would train for a robustness-set job (the real config files)."""
    settings = dict(teacher_steps=1500, student_steps=4000, teacher_dir="runs/x/teacher", kd_alpha=0.1, kd_tau=4.0,
                    beta=1.0, early_stopping=True)
    settings.update(overrides)
    return {model: config.to_dict()
            for model, config in bench.job_configs("data_7c5b0e70", seed, **settings).items()}


def test_a_finished_job_is_kept_in_the_archive_and_restored_into_an_empty_out_folder(tmp_path):
    configs = _job_configs()
    _write_job(tmp_path / "first", "data_7c5b0e70", 0, _accuracies(1.0, 0.9), configs=configs)
    archive = tmp_path / "archive"
    assert bench.archive_jobs(str(tmp_path / "first"), str(archive)) == 1
    assert bench.archive_jobs(str(tmp_path / "first"), str(archive)) == 0      # unchanged: nothing copied again
    assert bench.archived_jobs(str(archive)) == [("data_7c5b0e70", 0)]
    # Another machine: another data root and run folder, the same settings -> restored and reported.
    elsewhere = json.loads(json.dumps(_job_configs(teacher_dir="/elsewhere/runs/y/teacher")))
    for config in elsewhere.values():
        config["data"]["train"] = config["data"]["train"].replace(bench.DATA_ROOT, "/other/machine/clutrr")
    assert bench.restore_job(str(archive), str(tmp_path / "second"), "data_7c5b0e70", 0, wanted=elsewhere)
    assert not bench.restore_job(str(archive), str(tmp_path / "second"), "data_7c5b0e70", 0, wanted=elsewhere)
    assert not bench.restore_job(str(archive), str(tmp_path / "second"), "data_7c5b0e70", 1)   # never archived
    restored = json.loads((tmp_path / "second" / "data_7c5b0e70" / "seed0" / "summary.json").read_text())
    assert restored["models"]["alone"]["accuracy"] == {"1.2_test.csv": 1.0, "1.3_test.csv": 0.9}
    assert bench.build_report(str(tmp_path / "second"), None) == bench.build_report(str(tmp_path / "first"), None)


def test_an_archived_job_that_ran_other_settings_is_refused_naming_the_fields(tmp_path):
    _write_job(tmp_path / "first", "data_7c5b0e70", 0, _accuracies(1.0, 0.9), configs=_job_configs())
    bench.archive_jobs(str(tmp_path / "first"), str(tmp_path / "archive"))
    with pytest.raises(ValueError, match=r"data_7c5b0e70_seed0.json ran other settings than this run "
                                         r"\(kd.distill.tau, kd_contrastive.distill.tau\)"):
        bench.restore_job(str(tmp_path / "archive"), str(tmp_path / "second"), "data_7c5b0e70", 0,
                          wanted=_job_configs(kd_tau=2.0))
    assert not (tmp_path / "second" / "data_7c5b0e70").exists()


def test_job_configs_are_the_configs_run_job_records(tmp_path, monkeypatch):
    from jaxalign.programs import clutrr_trainer
    monkeypatch.setattr(clutrr_trainer, "read_rows", lambda path: ["row"] * 3)
    monkeypatch.setattr(clutrr_trainer, "train_student", lambda config, workdir, rows=None: {
        "test_accuracy": {}, "train_seconds": 1.0, "final_metrics": {}, "test": {}})
    monkeypatch.setattr(bench, "_train_teacher", lambda config, workdir, rows: {"accuracy": {}})
    summary = bench.run_job("data_7c5b0e70", 0, str(tmp_path), 1500, 4000, kd_alpha=0.1, kd_tau=4.0, beta=1.0,
                            early_stopping=True)
    expected = _job_configs(teacher_dir=os.path.join(str(tmp_path), "data_7c5b0e70", "seed0", "teacher"))
    assert json.loads(json.dumps(summary["configs"])) == json.loads(json.dumps(expected))
    assert summary["configs"]["kd"]["distill"]["tau"] == 4.0 and summary["configs"]["alone"]["distill"]["alpha"] == 0


def test_a_reused_teacher_needs_its_checkpoint_folder_not_only_its_summary(tmp_path):
    configs = _configs(teacher_overrides=bench.validation_overrides(True))
    _write_job(tmp_path, bench.GENERALISATION, 3, _accuracies(1.0, 0.9), configs=configs)   # no teacher/ folder
    with pytest.raises(FileNotFoundError, match=r"seed3/teacher not found \(a summary restored from bench/jobs/"):
        bench.reused_teacher(str(tmp_path), bench.GENERALISATION, 3, _teacher_config(bench.validation_overrides(True)))


def test_a_robustness_only_report_links_the_robustness_plot_which_is_written_and_not_the_k_plot(tmp_path):
    files = {"1.3_test.csv": 0.5, "2.3_test.csv": 0.6, "2.2_test.csv": 0.7}
    for seed in range(2):
        _write_job(tmp_path / "jobs", "data_06b8f2a1", seed, {name: dict(files) for name in ("teacher", *bench.VARIANTS)})
    report = bench.build_report(str(tmp_path / "jobs"), None, section="robust")
    assert "(robust_robustness.png)" in report and "accuracy_vs_k.png" not in report
    bench.plot(str(tmp_path / "jobs"), str(tmp_path / "k.png"))
    bench.plot_robustness(str(tmp_path / "jobs"), str(tmp_path / "robust.png"))
    assert not (tmp_path / "k.png").exists()
    assert (tmp_path / "robust.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_generalisation_only_report_links_the_k_plot_only(tmp_path):
    _write_job(tmp_path / "jobs", bench.GENERALISATION, 0, _accuracies(1.0, 0.9))
    report = bench.build_report(str(tmp_path / "jobs"), None)
    assert f"({bench.plot_name()})" in report and "robustness.png" not in report
    bench.plot_robustness(str(tmp_path / "jobs"), str(tmp_path / "robust.png"))
    assert not (tmp_path / "robust.png").exists()
