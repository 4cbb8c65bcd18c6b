"""`jaxalign clutrr train-teacher | distill | eval` on generated CSVs in the released format."""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from jaxalign import cli
from jaxalign.clutrr import generator, reader
from jaxalign.distill import evaluate

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "jaxalign", "configs")
TINY = ["--config.data.test=()", "--config.data.train_max_length=40", "--config.data.eval_max_length=64",
        "--config.batch_size=16", "--config.lr=0.01", "--config.train.async_checkpoints=false"]


@pytest.fixture(scope="module")
def csv_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clutrr_csv")
    train = generator.generate(96, [2, 3], 1, seed=5)
    test = generator.generate(40, [2], 1, seed=6, split="test")
    paths = {"train": str(folder / "1.2,1.3_train.csv"), "test": str(folder / "1.2_test.csv")}
    reader.write_csv(train, paths["train"])
    reader.write_csv(test, paths["test"])
    return paths


def _run(capsys, argv) -> dict:
    capsys.readouterr()
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def teacher_dir(csv_files, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cmd_teacher"))
    argv = ["clutrr", "train-teacher", "--config", os.path.join(CONFIGS, "clutrr_teacher.py:quick"),
            "--workdir", workdir, f"--config.data.train={csv_files['train']}", "--config.steps=80",
            "--config.model.hidden=16", "--config.model.num_layers=2", *TINY]
    assert cli.main(argv) == 0
    return workdir


def test_train_teacher_then_eval_prints_accuracy_per_task_and_k(teacher_dir, csv_files, capsys):
    output = _run(capsys, ["clutrr", "eval", "--checkpoint", teacher_dir, "--csv", csv_files["test"]])
    assert output["role"] == "teacher" and output["rows"] == 40 and output["unknown_labels"] == 0
    assert set(output["per_task"]) == {"task_1"} and set(output["per_k"]) == {"2"}
    assert output["per_task_k"]["1.2"]["accuracy"] == output["accuracy"]
    majority = max(np.unique([row.target for row in reader.read_csv(csv_files["test"])], return_counts=True)[1]) / 40
    assert output["accuracy"] > max(0.3, majority + 0.1)   # 18 classes: chance is about 0.06
    assert output["correct"] == round(output["accuracy"] * 40)


def test_eval_of_a_constant_predictor_gives_the_label_frequency(teacher_dir, csv_files, capsys, tmp_path):
    model = evaluate.load_model(teacher_dir)
    output_layer = model.params["classifier"]["output"]
    son = model.labels.id("son")
    output_layer["kernel"] = np.zeros_like(output_layer["kernel"])
    output_layer["bias"] = np.eye(len(model.labels), dtype=np.float32)[son] * 10.0
    constant_dir = evaluate.save_model(str(tmp_path / "constant"), model)
    # One row whose answer is a kinship label outside the 18 answer classes: counted, and wrong.
    rows = reader.read_csv(csv_files["test"])
    tail_gender = rows[0].genders[rows[0].query_edge[1]][1]
    rows[0] = dataclasses.replace(rows[0], target="husband" if tail_gender == "male" else "wife")
    odd_csv = str(tmp_path / "1.2_test.csv")
    reader.write_csv(rows, odd_csv)
    output = _run(capsys, ["clutrr", "eval", "--checkpoint", constant_dir, "--csv", odd_csv])
    expected = sum(row.target == "son" for row in rows) / len(rows)
    assert output["accuracy"] == pytest.approx(expected)
    assert output["unknown_labels"] == 1 and output["rows"] == len(rows)


def test_distill_command_trains_a_student_that_eval_reads(teacher_dir, csv_files, capsys, tmp_path):
    workdir = str(tmp_path / "student")
    summary = _run(capsys, [
        "clutrr", "distill", "--config", os.path.join(CONFIGS, "clutrr_distill.py:quick,variant=alone"),
        "--workdir", workdir, f"--config.data.train={csv_files['train']}", "--config.steps=3",
        "--config.model.embed=16", "--config.model.hidden=16", *TINY])
    assert summary["role"] == "student" and summary["steps"] == 3
    assert os.path.exists(os.path.join(workdir, "config.json"))
    output = _run(capsys, ["clutrr", "eval", "--checkpoint", workdir, "--csv", csv_files["test"],
                           "--csv", csv_files["test"]])
    reports = output["files"]
    assert output["role"] == "student" and list(reports) == [csv_files["test"]]
    report = reports[csv_files["test"]]
    assert report["rows"] == 40 and 0.0 <= report["accuracy"] <= 1.0 and report["truncated"] == 0


def test_training_commands_reject_unknown_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["clutrr", "train-teacher", "--config", "x.py", "--workdir", "w", "--stepz=3"])
    assert "config overrides look like" in capsys.readouterr().err


def test_missing_data_and_malformed_rows_are_one_error_line_with_exit_code_2(teacher_dir, csv_files, capsys,
                                                                           tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)      # the configs' default data (../shared/data/clutrr) is not there
    for command, config in (("train-teacher", "clutrr_teacher.py:quick"), ("distill", "clutrr_distill.py:quick")):
        capsys.readouterr()
        assert cli.main(["clutrr", command, "--config", os.path.join(CONFIGS, config),
                         "--workdir", str(tmp_path / command)]) == 2
        captured = capsys.readouterr()
        error = captured.err.strip()
        assert captured.out == "" and "\n" not in error and "Traceback" not in error
        assert error.startswith(f"jaxalign clutrr {command}: error: CLUTRR data not found: ")
        assert "jaxalign clutrr generate --out-dir DIR" in error
    with open(csv_files["test"], encoding="utf-8", newline="") as stream:
        header, *rows = list(csv.reader(stream))
    rows[1][header.index("query")] = "not a pair"
    bad = tmp_path / "1.2_bad_test.csv"
    with open(bad, "w", encoding="utf-8", newline="") as stream:
        csv.writer(stream).writerows([header, *rows[:2]])
    capsys.readouterr()
    assert cli.main(["clutrr", "eval", "--checkpoint", teacher_dir, "--csv", str(bad)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"jaxalign clutrr eval: error: {bad}") and "query" in error and "\n" not in error
