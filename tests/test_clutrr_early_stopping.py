"""Early stopping with the best validation checkpoint kept, for the CLUTRR trainers: the stopping rule, a tiny
teacher run that stops before `steps` and exports the best evaluation's parameters (equal to the checkpoint of
that step, not the last one), and resumes (interrupted, or after the stop) that end with the same best model."""
import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxalign.clutrr import generator
from jaxalign.configs.base import load_config
from jaxalign.programs import clutrr_trainer as trainer, training

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "jaxalign", "configs")
PATIENCE, EVAL_EVERY, STEPS = 2, 2, 60


def early_stopping_teacher_config(**overrides):
    fields = {"data.test": "()", "data.valid_fraction": 0.25, "batch_size": 16, "mesh": "(2, 4, 1)",
              "steps": STEPS, "lr": 0.01, "model.hidden": 16, "model.num_layers": 2, "train.log_every": 2,
              "train.eval_every": EVAL_EVERY, "train.patience": PATIENCE, "train.checkpoint_every": EVAL_EVERY,
              "train.keep": 100, "train.async_checkpoints": False, **overrides}
    return load_config(os.path.join(CONFIGS, "clutrr_teacher.py:quick"), [f"{k}={v}" for k, v in fields.items()])


# ------------------------------------------------------------------------------------------ the rules


def test_best_evaluation_is_the_earliest_of_the_highest():
    records = [{"step": 2, "eval/a": 0.5}, {"step": 4, "eval/a": 0.7}, {"step": 6, "eval/a": 0.7},
               {"step": 8, "eval/a": float("nan")}]
    assert training.best_evaluation(records, "eval/a")["step"] == 4
    assert training.best_evaluation([], "eval/a") is None


def test_early_stopping_keeps_each_new_best_and_stops_after_patience_evaluations_without_a_gain():
    kept = []
    stopping = training.EarlyStopping("eval/a", patience=2, keep_best=lambda state, record: kept.append(record["step"]))
    records, answers = [], []
    for step, value in zip((1, 2, 3, 4, 5), (0.2, 0.5, 0.5, 0.4, 0.9)):
        records.append({"step": step, "eval/a": value})
        answers.append(stopping(f"state {step}", records))
    assert kept == [1, 2, 5]
    assert answers == [False, False, False, True, False]
    never = training.EarlyStopping("eval/a", patience=0, keep_best=lambda state, record: None)
    assert not never(None, [{"step": 1, "eval/a": 0.9}] + [{"step": s, "eval/a": 0.1} for s in range(2, 50)])


def test_validation_split_is_seeded_disjoint_and_keeps_file_order():
    rows = generator.generate(40, [2], 1, seed=1)
    config = early_stopping_teacher_config()
    train, valid = trainer.split_validation(config, rows)
    assert (len(train), len(valid)) == (30, 10)
    ids = [row.id for row in rows]
    assert sorted(ids.index(row.id) for row in train) == [ids.index(row.id) for row in train]
    assert not {row.id for row in train} & {row.id for row in valid}
    again = trainer.split_validation(early_stopping_teacher_config(seed=7), rows)[1]
    assert [row.id for row in again] == [row.id for row in valid]    # data.valid_seed, not the run's seed
    other = trainer.split_validation(early_stopping_teacher_config(**{"data.valid_seed": 1}), rows)[1]
    assert [row.id for row in other] != [row.id for row in valid]
    assert trainer.split_validation(early_stopping_teacher_config(**{"data.valid_fraction": 0.0}), rows) == (rows, [])
    with pytest.raises(ValueError, match="data.valid_fraction"):
        trainer.split_validation(early_stopping_teacher_config(**{"data.valid": "x.csv"}), rows)


# ------------------------------------------------------------------------------------------ a tiny teacher


@pytest.fixture(scope="module")
def rows():
    return generator.generate(96, [2, 3], 1, seed=3)


@pytest.fixture(scope="module")
def stopped_run(rows, eight_devices, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("early_stopping_teacher"))
    return workdir, trainer.train_teacher(early_stopping_teacher_config(), workdir, rows=rows)


def _checkpoint_params(workdir: str, step: int) -> dict[str, np.ndarray]:
    """The parameters saved in checkpoint `step`, named as in params.npz ('a/b/kernel')."""
    flat = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return {name[len("params."):].replace(".", "/"): np.asarray(value) for name, value in flat.items()
            if name.startswith("params.")}


def _model_params(folder: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(folder, "params.npz")) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _eval_json(workdir: str) -> dict:
    with open(os.path.join(workdir, "eval.json")) as stream:
        return json.load(stream)


def test_run_stops_after_patience_evaluations_without_a_gain(stopped_run):
    workdir, summary = stopped_run
    curve = summary["validation"]
    stopped_at, best_step = summary["stopped_at"], summary["best_step"]
    assert stopped_at is not None and stopped_at < STEPS and summary["steps"] == stopped_at
    assert [step for step, _ in curve] == list(range(EVAL_EVERY, stopped_at + 1, EVAL_EVERY))
    accuracies = dict(curve)
    assert summary["best_valid_accuracy"] == max(accuracies.values())
    assert best_step == min(step for step, value in curve if value == max(accuracies.values()))
    assert stopped_at == best_step + PATIENCE * EVAL_EVERY      # `patience` evaluations without a strict gain
    assert summary["valid_rows"] == 24
    saved = _eval_json(workdir)
    assert (saved["best_step"], saved["best_valid_accuracy"], saved["stopped_at"]) == (
        best_step, summary["best_valid_accuracy"], stopped_at)
    with open(os.path.join(workdir, "best", "best.json")) as stream:
        assert json.load(stream)["step"] == best_step


def test_exported_model_is_the_best_checkpoint_not_the_last(stopped_run):
    workdir, summary = stopped_run
    exported = _model_params(os.path.join(workdir, "model"))
    at_best = _checkpoint_params(workdir, summary["best_step"])
    at_stop = _checkpoint_params(workdir, summary["stopped_at"])
    assert sorted(exported) == sorted(at_best)
    for name in exported:
        np.testing.assert_array_equal(exported[name], at_best[name], err_msg=name)
    assert any(not np.array_equal(exported[name], at_stop[name]) for name in exported)


def test_interrupted_run_resumed_ends_with_the_same_best_model(rows, stopped_run, tmp_path):
    workdir, summary = stopped_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    # Interrupted one evaluation after its best: the best came before the checkpoint it resumes from, so the
    # resumed run must take it from best/, and learn from the restored evaluations when to stop.
    interrupted_at = summary["best_step"] + EVAL_EVERY
    for step in os.listdir(os.path.join(resumed, "checkpoints")):
        if int(step) > interrupted_at:
            shutil.rmtree(os.path.join(resumed, "checkpoints", step))
    shutil.rmtree(os.path.join(resumed, "model"))
    os.remove(os.path.join(resumed, "eval.json"))
    again = trainer.train_teacher(early_stopping_teacher_config(), resumed, rows=rows)
    for key in ("best_step", "best_valid_accuracy", "stopped_at", "validation"):
        assert again[key] == summary[key], key
    original, repeated = _model_params(os.path.join(workdir, "model")), _model_params(os.path.join(resumed, "model"))
    for name in original:
        np.testing.assert_array_equal(original[name], repeated[name], err_msg=name)


def test_rerunning_a_stopped_run_trains_no_further(rows, stopped_run, tmp_path):
    workdir, summary = stopped_run
    rerun = str(tmp_path / "rerun")
    shutil.copytree(workdir, rerun)
    again = trainer.train_teacher(early_stopping_teacher_config(), rerun, rows=rows)
    assert again["steps"] == summary["stopped_at"] and again["stopped_at"] == summary["stopped_at"]
    assert sorted(os.listdir(os.path.join(rerun, "checkpoints")), key=int)[-1] == str(summary["stopped_at"])
    assert again["best_step"] == summary["best_step"]
    original, repeated = _model_params(os.path.join(workdir, "model")), _model_params(os.path.join(rerun, "model"))
    for name in original:
        np.testing.assert_array_equal(original[name], repeated[name], err_msg=name)
