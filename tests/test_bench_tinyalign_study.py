"""bench/tinyalign_study.py: the standard errors it reports and the RESULTS.md section it writes, on runs whose
numbers are chosen so that every figure can be computed by hand."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os

import pytest

from jaxalign.programs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study():
    spec = importlib.util.spec_from_file_location("tinyalign_study", os.path.join(ROOT, "bench", "tinyalign_study.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def _results(seeds=(0, 1, 2)):
    """run_all-shaped results of baseline, tinyalign and constant at 100% over `seeds`: shape accuracy 0.3 +
    method offset + 0.1 * seed, colour 0.9 everywhere."""
    methods = ("baseline", "tinyalign", "constant")
    offset = {"baseline": 0.0, "tinyalign": 0.5, "constant": 0.1}
    settings = dataclasses.replace(demo.demo_settings(), methods=methods, seeds=seeds, fractions=(1.0,), k=3,
                                   stage2_steps=600)
    runs = []
    for method in methods:
        for seed in seeds:
            shape = 0.3 + offset[method] + 0.1 * seed
            runs.append({"name": demo.run_name(method, 1.0), "method": method, "fraction": 1.0, "seed": seed,
                         "train_questions": 3000, "steps": 600, "final_train_loss": 0.2, "mean_train_loss": 0.3,
                         "eval_loss": None, "accuracy": (shape + 0.9) / 2, "eval_questions": 2000,
                         "per_type": {"shape": shape, "color": 0.9},
                         "retrieval_precision": ({"test": {"color": 0.999, "shape": 0.994}}
                                                 if method == "tinyalign" and seed == seeds[0] else {}),
                         "seconds": {"stage1": 5.0, "stage2": 30.0}})
    priors = {seed: {"accuracy": 0.6, "per_type": {"shape": 0.33, "color": 0.1}} for seed in seeds}
    return {"settings": dataclasses.asdict(settings), "seeds": list(seeds), "runs": runs, "question_prior": priors,
            "towers": {"manifest": {"fingerprint": "abc"}}, "environment": {"cpu_count": 2, "jax": "x"},
            **demo.aggregate(runs, settings, priors)}


def test_study_reports_the_standard_error_of_each_colour_and_shape_cell():
    study = _study()
    # colour 0.5, 0.6, 0.7 over three seeds: std 0.1, SE 0.1 / sqrt(3) = 0.0577; shape constant: SE 0.
    runs = [{"name": "tinyalign 100%", "per_type": {"color": value, "shape": 0.4}} for value in (0.5, 0.6, 0.7)]
    errors = study.cell_errors({"mean": {"tinyalign 100%": {}}, "runs": runs})
    assert errors["tinyalign 100%"]["color"] == pytest.approx(0.1 / math.sqrt(3))
    assert errors["tinyalign 100%"]["shape"] == pytest.approx(0.0)
    assert study.parse_args(["--out", "x"]).k == "1,3,10"


def test_seeds_needed_scale_with_the_squared_ratio_of_the_standard_error_to_the_target():
    study = _study()
    assert study.seeds_needed(0.04, 8) == 32 and study.seeds_needed(0.01, 8) == 8
    assert study.seeds_needed(0.094, 8) == 177     # 8 (0.094 / 0.02)^2 = 176.7


def test_report_tables_hold_the_hand_computed_means_standard_errors_and_paired_differences(tmp_path):
    study = _study()
    results = _results()
    plot = study.plot_accuracy(results, 3, str(tmp_path / "study_k3_accuracy.png"))
    assert os.path.getsize(plot) > 1000
    report = study.markdown_report({3: results}, "python bench/tinyalign_study.py --k 3", study.facts_line({3: results}),
                                   "study_test", {3: plot})
    lines = report.splitlines()
    assert lines[0] == "<!-- study_test:start -->" and lines[-1] == "<!-- study_test:end -->"
    # Shape over seeds 0, 1, 2: tinyalign 0.8, 0.9, 1.0 -> 0.900 ± 0.100, SE 0.1 / sqrt(3) = 0.058; colour SE 0.
    row = next(line for line in lines if line.startswith("| tinyalign 100% |"))
    assert row.split(" | ")[2] == "3" and row.split(" | ")[5:7] == ["0.900 ± 0.100", "0.900 ± 0.000"]
    assert row.endswith("| 0.058 / 0.000 |")
    # Paired by seed the differences are constant: tinyalign - constant = +0.4 shape, +0.2 overall, beyond 2 SE.
    row = next(line for line in lines if line.startswith("| tinyalign 100% - constant 100% |"))
    assert row.split(" | ")[1:3] == ["+0.200 ± 0.000 *", "+0.400 ± 0.000 *"]
    assert any(line.startswith("| constant 100% - baseline 100% | +0.050 ± 0.000 * | +0.100 ± 0.000 * |")
               for line in lines)
    assert "| question-only prior | - | 3 | - | 0.600 ± 0.000 | 0.330 ± 0.000 | 0.100 ± 0.000 |" in report
    assert "- tinyalign 100% (seed 0; colour / shape): test 0.999 / 0.994" in lines
    # Shape per seed: tinyalign 0.8, 0.9, 1.0 (1 partly, 2 fully), constant 0.4, 0.5, 0.6 (1 partly), baseline none.
    assert any(line.startswith("Seeds reading shape fully (>= 0.9) / partly (0.6-0.9) / not (below 0.6")
               and line.endswith(": tinyalign 100% 2 / 1 / 0, constant 100% 0 / 1 / 2.") for line in lines)
    # Six colour / shape cells: the three colour ones (SE 0) meet 0.02, the shape ones (SE 0.058) do not.
    assert "at most 0.02: 3 of 6 (largest 0.058)." in report
    # Each shape cell: 3 (0.0577 / 0.02)^2 = 25 seeds; 22 more seeds x 3 runs x 30 s = 66 runs, 0.55 h.
    assert ("(S (SE / 0.02)^2): baseline 100% shape 25, tinyalign 100% shape 25, constant 100% shape 25; at this "
            "study's 30 s per stage-2 run that is 66 runs more (baseline 100% 22, tinyalign 100% 22, constant 100% "
            "22), about 0.6 h.") in report
    assert "600 steps at 100%" in report and "towers abc" in report and "took 4.5 min" in report  # 9 runs x 30 s
    assert "![accuracy per question type, k = 3](study_k3_accuracy.png)" in lines


def test_a_rerun_replaces_its_own_section_of_results_md_and_leaves_the_rest(tmp_path):
    study = _study()
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\nintro\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    for seeds in ((0, 1, 2), (0, 1)):
        results = _results(seeds)
        report = study.markdown_report({3: results}, "cmd", study.facts_line({3: results}), "study_test")
        study.write_results(report, str(results_md), *study.markers("study_test"))
    text = results_md.read_text()
    assert text.count("<!-- study_test:start -->") == 1 and "2 seeds (0, 1)" in text and "3 seeds" not in text
    assert "keep me" in text and text.startswith("# Benchmark results\n\nintro")


def test_shape_reading_counts_each_seed_once_at_the_thresholds():
    study = _study()
    runs = [{"name": "tinyalign 100%", "per_type": {"shape": shape, "color": 1.0}}
            for shape in (0.95, 0.9, 0.75, 0.6, 0.59)]
    runs += [{"name": "baseline 100%", "per_type": {"shape": shape}} for shape in (0.4, 0.55)]
    runs += [{"name": "baseline 100%", "per_type": {"color": 0.9}}]      # no shape question scored: not counted
    assert study.shape_reading({"runs": runs}) == {"tinyalign 100%": {"fully": 2, "partly": 2, "not": 1},
                                                   "baseline 100%": {"fully": 0, "partly": 0, "not": 2}}
    assert study.reading_lines({"runs": runs[5:]}) == []     # no seed reads it: no line


def test_precision_lines_leave_out_the_oracle_which_reads_no_bank_row():
    study = _study()
    carried = {"test": {"color": 1.0, "shape": 0.99}}
    runs = [{"name": "tinyalign 100%", "method": "tinyalign", "seed": 0, "retrieval_precision": carried},
            {"name": "oracle 100%", "method": "oracle", "seed": 0,      # older results measured its -1 ids as 0
             "retrieval_precision": {"test": {"color": 0.0, "shape": 0.0}}},
            {"name": "tinyalign 100%", "method": "tinyalign", "seed": 1, "retrieval_precision": carried}]
    lines = study.precision_lines({"seeds": [0, 1], "runs": runs})
    assert lines == ["- tinyalign 100% (seed 0; colour / shape): test 1.000 / 0.990",
                     "- oracle: each sample's own caption, so its colour and shape by construction (no bank row read)"]


def _fake_run_all(calls):
    """A stand-in for demo.run_all: records (methods, seeds) and returns run_all-shaped results whose shape accuracy
    is 0.3 + 0.1 * seed (+0.2 for tinyalign), colour 0.9, at every fraction of the settings."""
    def run_all(out, settings, cache_root=None):
        calls.append((settings.methods, settings.seeds))
        runs = [{"name": demo.run_name(method, fraction), "method": method, "control": method, "fraction": fraction,
                 "seed": seed, "train_questions": 3000, "steps": 600, "final_train_loss": 0.2,
                 "mean_train_loss": 0.3, "eval_loss": None, "eval_questions": 2000,
                 "accuracy": 0.6, "per_type": {"shape": 0.3 + 0.1 * seed + (0.2 if method == "tinyalign" else 0.0),
                                               "color": 0.9},
                 "retrieval_precision": {}, "seconds": {"stage1": 5.0, "stage2": 30.0},
                 "loss_history": [[0, 1.0]] * 50, "examples": ["a long generated example"]}
                for method in settings.methods for seed in settings.seeds for fraction in settings.fractions]
        priors = {seed: {"accuracy": 0.6, "per_type": {"shape": 0.33, "color": 0.1}} for seed in settings.seeds}
        return {"runs": runs, "question_prior": priors, "environment": {"cpu_count": 2, "jax": "x"},
                "towers": {"manifest": {"fingerprint": settings.towers.fingerprint()}}}
    return run_all


def _main(study, tmp_path, *extra):
    return study.main(["--out", str(tmp_path / "out"), "--archive", str(tmp_path / "jobs"), "--k", "3",
                       "--stage2-steps", "600", "--eval-questions", "2000", "--no-results", *extra])


def test_kept_runs_are_not_rerun_and_the_report_pools_every_kept_seed(tmp_path, monkeypatch):
    study = _study()
    calls = []
    monkeypatch.setattr(study.demo, "run_all", _fake_run_all(calls))
    _main(study, tmp_path, "--seeds", "0,1", "--methods", "baseline,tinyalign")
    assert calls == [(("baseline", "tinyalign"), (0,)), (("baseline", "tinyalign"), (1,))]
    kept = sorted(os.listdir(tmp_path / "jobs" / "k3"))
    assert len(kept) == 8 and "tinyalign_40_seed1.json" in kept     # 2 methods x 2 fractions x 2 seeds
    record = json.loads((tmp_path / "jobs" / "k3" / "tinyalign_40_seed1.json").read_text())
    assert "loss_history" not in record["run"] and "examples" not in record["run"]
    assert record["settings"]["stage2_steps"] == 600 and "seeds" not in record["settings"]
    assert record["command"].startswith("python bench/tinyalign_study.py --out ") and "--seeds 0,1" in record["command"]
    # A second invocation asks for seeds 1 and 2 of tinyalign: only seed 2 runs; the report has all kept runs.
    calls.clear()
    _main(study, tmp_path, "--seeds", "1,2", "--methods", "tinyalign")
    assert calls == [(("tinyalign",), (2,))]
    by_k = json.loads((tmp_path / "out" / "study.json").read_text())["by_k"]["3"]
    assert by_k["seeds"] == [0, 1, 2]
    # tinyalign 100% shape over seeds 0, 1, 2: 0.5, 0.6, 0.7 -> mean 0.6, SE 0.1 / sqrt(3); baseline: 0.3, 0.4.
    assert by_k["mean"]["tinyalign 100%"]["accuracy/shape"] == pytest.approx(0.6)
    assert by_k["cell_se"]["tinyalign 100%"]["shape"] == pytest.approx(0.1 / math.sqrt(3))
    assert by_k["mean"]["baseline 100%"]["accuracy/shape"] == pytest.approx(0.35)
    difference = next(row for row in by_k["comparisons"] if row["a"] == "tinyalign 100%"
                      and row["b"] == "baseline 100%" and row["metric"] == "accuracy/shape")
    assert difference["n"] == 2 and difference["mean"] == pytest.approx(0.2)    # paired on seeds 0 and 1 only
    # --report-only trains nothing and reports the same pool, naming the commands that made it.
    calls.clear()
    _main(study, tmp_path, "--report-only")
    assert calls == [] and json.loads((tmp_path / "out" / "study.json").read_text())["by_k"]["3"]["seeds"] == [0, 1, 2]
    settings = dataclasses.replace(demo.demo_settings(), stage2_steps=600, eval_questions=2000)
    results = study.pooled_results(study.kept_runs(str(tmp_path / "jobs"), 3, settings), settings)
    report = study.markdown_report({3: results}, "cmd", "facts", "pool")
    assert "k = 3 pools the 10 runs kept in bench/jobs/pool/k3, made by:" in report
    assert any(line.startswith("- `python bench/tinyalign_study.py") and "--methods tinyalign`: 2 runs" in line
               for line in report.splitlines())


def test_a_kept_run_of_other_settings_is_refused_naming_its_file_and_the_field(tmp_path, monkeypatch):
    study = _study()
    monkeypatch.setattr(study.demo, "run_all", _fake_run_all([]))
    _main(study, tmp_path, "--seeds", "0", "--methods", "baseline")
    with pytest.raises(ValueError, match=r"baseline_100_seed0\.json ran other settings: stage2_steps \(600 kept, 300"):
        study.main(["--out", str(tmp_path / "out"), "--archive", str(tmp_path / "jobs"), "--k", "3", "--seeds", "0",
                    "--stage2-steps", "300", "--eval-questions", "2000", "--no-results"])


def test_report_only_without_kept_runs_says_so(tmp_path):
    study = _study()
    with pytest.raises(ValueError, match="no runs of k = 3 kept in"):
        _main(study, tmp_path, "--report-only")


def test_the_target_line_counts_each_arms_own_seeds():
    study = _study()
    # tinyalign 100% shape over 4 seeds 0.5, 0.7, 0.5, 0.7: sample std 0.1155, SE 0.0577 -> 4 (0.0577/0.02)^2 = 33.3
    # -> 34 seeds, 30 more; baseline over 2 seeds at 0.3: SE 0, meets the target.
    runs = [{"name": "tinyalign 100%", "per_type": {"shape": shape, "color": 0.9}, "seconds": {"stage2": 20.0}}
            for shape in (0.5, 0.7, 0.5, 0.7)]
    runs += [{"name": "baseline 100%", "per_type": {"shape": 0.3, "color": 0.9}, "seconds": {"stage2": 20.0}}] * 2
    line = study.target_line({"mean": {"tinyalign 100%": {}, "baseline 100%": {}}, "runs": runs})
    assert line.endswith("tinyalign 100% shape 34; at this study's 20 s per stage-2 run that is 30 runs more "
                         "(tinyalign 100% 30), about 0.2 h.")


def test_report_only_needs_the_archive():
    with pytest.raises(SystemExit):
        _study().parse_args(["--out", "x", "--report-only", "--no-archive"])


def test_runs_asked_for_at_one_fraction_pool_with_the_runs_of_both(tmp_path, monkeypatch):
    study = _study()
    calls = []
    monkeypatch.setattr(study.demo, "run_all", _fake_run_all(calls))
    _main(study, tmp_path, "--seeds", "0", "--methods", "tinyalign")
    _main(study, tmp_path, "--seeds", "0,1", "--methods", "tinyalign", "--fractions", "0.4")
    assert calls == [(("tinyalign",), (0,)), (("tinyalign",), (1,))]
    by_k = json.loads((tmp_path / "out" / "study.json").read_text())["by_k"]["3"]
    assert list(by_k["mean"]) == ["tinyalign 100%", "tinyalign 40%"]
    assert by_k["cell_se"]["tinyalign 40%"]["shape"] == pytest.approx(0.05)   # 0.5, 0.6: std 0.0707 / sqrt(2)
    assert by_k["cell_se"]["tinyalign 100%"]["shape"] is None                                # one seed


def test_a_kept_run_of_other_towers_is_refused(tmp_path, monkeypatch):
    study = _study()
    monkeypatch.setattr(study.demo, "run_all", _fake_run_all([]))
    _main(study, tmp_path, "--seeds", "0", "--methods", "baseline")
    path = tmp_path / "jobs" / "k3" / "baseline_40_seed0.json"
    record = json.loads(path.read_text())
    record["towers_fingerprint"] = "0123456789abcdef"     # towers made by other tower code
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"baseline_40_seed0\.json was trained on other towers \(fingerprint "
                                         r"0123456789abcdef kept"):
        _main(study, tmp_path, "--report-only")
