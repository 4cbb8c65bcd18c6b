"""`jaxalign clutrr train-teacher` and `clutrr distill` as one program over 2 processes x 4 devices
(launch/local.sh) train on the same rows, reach the same losses and the same test accuracy as on 1 process x 8
devices; process 0 alone writes the run's files.

Both setups run the same commands with a global batch of 16 on generated data (96 training rows, 40 test rows
scored in 3 batches of 16, so the two processes score different rows): a tiny GAT teacher for 4 steps, then a
tiny BiLSTM student with KD, contrastive alignment and dropout for 4 steps, distilled from the two-process
teacher. The one-process runs happen in this test process (8 fake devices) while the launched ones run.
"""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxalign import cli
from jaxalign.clutrr import generator, reader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.batch_size=16", "--config.steps=4", "--config.eval_batch_size=16", "--config.lr=0.01",
        "--config.train.log_every=1", "--config.train.async_checkpoints=false", "--config.model.hidden=16",
        "--config.data.train_max_length=40", "--config.data.eval_max_length=64"]


def _teacher_argv(workdir, data: dict) -> list[str]:
    return ["clutrr", "train-teacher", "--config", "jaxalign/configs/clutrr_teacher.py:quick",
            "--workdir", str(workdir), f"--config.data.train={data['train']}",
            f"--config.data.test=('{data['test']}',)", "--config.model.num_layers=2", *TINY]


def _distill_argv(workdir, data: dict, teacher_workdir) -> list[str]:
    return ["clutrr", "distill", "--config", "jaxalign/configs/clutrr_distill.py:quick,variant=kd_contrastive",
            "--workdir", str(workdir), f"--config.data.train={data['train']}",
            f"--config.data.test=('{data['test']}',)", f"--config.distill.teacher_workdir={teacher_workdir}",
            "--config.model.embed=16", "--config.distill.shared_dim=16", *TINY]


def _launch(argv: list[str], log_dir) -> subprocess.Popen:
    """Starts `jaxalign <argv>` as 2 processes x 4 fake CPU devices; returns the launcher."""
    env = dict(os.environ, JAXALIGN_HEARTBEAT_TIMEOUT="20", LOG_DIR=str(log_dir))
    for name in ("JAXALIGN_COORDINATOR", "JAXALIGN_NUM_PROCESSES", "JAXALIGN_PROCESS_ID", "JAXALIGN_DISTRIBUTED",
                 "XLA_FLAGS"):  # the launcher gives each process its own 4 devices
        env.pop(name, None)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
    return subprocess.Popen(["bash", "launch/local.sh", "2", "4", sys.executable, "-m", "jaxalign.cli", *argv],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summaries(launcher: subprocess.Popen, log_dir) -> list[dict]:
    """Waits for the launcher; the JSON summary each process printed (the last top-level object of its log)."""
    _, stderr = launcher.communicate(timeout=300)
    logs = [(log_dir / f"process_{i}.log").read_text() for i in range(2)]
    assert launcher.returncode == 0, f"{stderr}\n" + "\n".join(text[-5000:] for text in logs)
    return [json.loads(text[text.rindex("\n{") + 1:]) for text in logs]


def _in_this_process(argv: list[str]) -> dict:
    """Runs `jaxalign <argv>` here (1 process, the test session's 8 fake devices); its JSON summary."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    text = out.getvalue()
    return json.loads(text[text.index("{"):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, eight_devices):
    """{'teacher' | 'student': {'one' | 'two': workdir, 'one_summary': dict, 'two_summaries': [dict, dict]}}."""
    root = tmp_path_factory.mktemp("launch_clutrr")
    data = {"train": str(root / "1.2,1.3_train.csv"), "test": str(root / "1.2_test.csv")}
    reader.write_csv(generator.generate(96, [2, 3], 1, seed=5), data["train"])
    reader.write_csv(generator.generate(40, [2], 1, seed=6, split="test"), data["test"])
    runs = {}
    for role in ("teacher", "student"):
        one, two, logs = root / f"{role}_one", root / f"{role}_two", root / f"{role}_logs"
        argv = ((lambda workdir: _teacher_argv(workdir, data)) if role == "teacher" else
                (lambda workdir: _distill_argv(workdir, data, runs["teacher"]["two"])))
        launcher = _launch(argv(two), logs)       # both processes train while this one runs the same command
        try:
            one_summary = _in_this_process(argv(one))
        finally:
            two_summaries = _summaries(launcher, logs)
        runs[role] = {"one": one, "two": two, "one_summary": one_summary, "two_summaries": two_summaries}
    return runs


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_two_processes_train_on_the_same_rows_as_one(runs, role):
    one, two = _metrics(runs[role]["one"]), _metrics(runs[role]["two"])
    assert [record["step"] for record in one] == [record["step"] for record in two] == [1, 2, 3, 4]
    for name in ("loss", "cross_entropy", "accuracy", "grad_norm") + (("kd", "contrastive") if role == "student"
                                                                      else ()):
        np.testing.assert_allclose([record[name] for record in two], [record[name] for record in one], rtol=1e-4,
                                   err_msg=name)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_two_processes_score_the_test_rows_as_one(runs, role):
    one = json.loads((runs[role]["one"] / "eval.json").read_text())["test"]["1.2_test.csv"]
    two = json.loads((runs[role]["two"] / "eval.json").read_text())["test"]["1.2_test.csv"]
    assert two["rows"] == one["rows"] == 40
    assert (two["correct"], two["per_k"], two["truncated"]) == (one["correct"], one["per_k"], one["truncated"])


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_every_process_reports_the_same_numbers_and_where_it_ran(runs, role):
    one, (first, second) = runs[role]["one_summary"], runs[role]["two_summaries"]
    assert (one["process_count"], one["device_count"]) == (1, 8)
    drop_time = lambda summary: {key: value for key, value in summary.items() if key != "train_seconds"}  # noqa
    assert drop_time(first) == drop_time(second)
    assert (first["process_count"], first["device_count"]) == (2, 8)
    assert first["test_accuracy"] == one["test_accuracy"]
    eval_json = json.loads((runs[role]["two"] / "eval.json").read_text())
    assert (eval_json["process_count"], eval_json["device_count"]) == (2, 8)


def test_process_zero_writes_the_files_once(runs):
    two = runs["student"]["two"]
    for name in ("config.json", "metrics.jsonl", "eval.json", "model/model.json", "model/params.npz"):
        assert (two / name).is_file(), name
    assert [record["step"] for record in _metrics(two)] == [1, 2, 3, 4]   # one line per step, not one per process
    with np.load(runs["student"]["one"] / "model" / "params.npz") as one_params, \
            np.load(two / "model" / "params.npz") as two_params:
        assert sorted(one_params.files) == sorted(two_params.files)
        for name in one_params.files:
            np.testing.assert_allclose(two_params[name], one_params[name], rtol=1e-4, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------- what each process builds alone


def test_one_process_holds_the_whole_batch_and_a_batch_the_devices_do_not_divide_is_refused(eight_devices):
    from jaxalign import sharding
    from jaxalign.programs import training

    mesh = sharding.make_mesh((-1, 1, 1))
    assert training.process_rows(16, mesh) == range(0, 16)
    with pytest.raises(ValueError, match="batch_size=12"):
        training.process_rows(12, mesh)


def test_a_rows_anonymisation_does_not_depend_on_the_rows_featurised_with_it():
    """A process featurises only its block of the global batch: row 2 must read the same with or without 0, 1."""
    from jaxalign.distill import clutrr_batches

    rows = generator.generate(4, [2], 1, seed=1)
    words = clutrr_batches.build_word_vocabulary(row.story for row in rows)
    labels = clutrr_batches.label_vocabulary()
    generators = lambda positions: [np.random.default_rng([0, 3, position]) for position in positions]  # noqa
    whole = clutrr_batches.text_batch(rows, words, labels, 40, generators(range(4)))
    block = clutrr_batches.text_batch(rows[2:], words, labels, 40, generators(range(2, 4)))
    for name, value in block.items():
        np.testing.assert_array_equal(value, whole[name][2:], err_msg=name)
    assert not np.array_equal(whole["tokens"][2:],
                              clutrr_batches.text_batch(rows[2:], words, labels, 40, generators(range(2)))["tokens"])
    with pytest.raises(ValueError, match="one per row"):
        clutrr_batches.text_batch(rows, words, labels, 40, generators(range(3)))
