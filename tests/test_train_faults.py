"""Faults a cluster sees: preemption (SIGTERM), a corrupt latest checkpoint, a process that dies (kill -9)."""
import glob
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.train import optimizer as opt_lib
from jaxalign.train.checkpoint import Checkpointer, UnreadableCheckpointError
from jaxalign.train.loop import PREEMPTED_EXIT_CODE, TrainingPreempted, train
from jaxalign.train.state import create_train_state, state_shardings
from jaxalign.train.step import jit_train_step, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = [(".*", optax.adam(0.1))]


def init_params():
    """A 64 x 64 hidden matrix: arrays this large are stored outside orbax's CRC-checked index nodes."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"w": jax.random.normal(k1, (4, 64)), "hidden": 0.1 * jax.random.normal(k2, (64, 64)),
            "out": 0.1 * jax.random.normal(k3, (64, 1))}


def regression_loss(params, batch, rng):
    noise = 0.1 * jax.random.normal(rng, batch["y"].shape)  # the result depends on the key as well as the data
    hidden = jnp.tanh(jnp.tanh(batch["x"] @ params["w"]) @ params["hidden"])
    loss = jnp.mean((hidden @ params["out"] - batch["y"] - noise) ** 2)
    return loss, {}


def batch_at(index):
    rng = np.random.default_rng(100 + index)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": x @ np.arange(1.0, 5.0, dtype=np.float32)[:, None]}


def batches_from(start, sigterm_before_step=None):
    for index in itertools.count(start):
        if sigterm_before_step == index + 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before it preempts the job
        yield batch_at(index)


@pytest.fixture(scope="module")
def engine(eight_devices):
    mesh = sharding.make_mesh((-1, 1, 1))
    optimizer = opt_lib.build_optimizer(init_params(), RULES)
    mask = opt_lib.trainable_mask(init_params(), RULES)
    shardings = state_shardings(create_train_state(init_params(), optimizer, jax.random.PRNGKey(7)),
                                {"w": P(), "hidden": P(), "out": P()}, mesh)
    step = jit_train_step(make_train_step(regression_loss, optimizer, mask), mesh, shardings,
                          sharding.batch_sharding(mesh, 1))

    def fresh_state():
        return jax.device_put(create_train_state(init_params(), optimizer, jax.random.PRNGKey(7)), shardings)

    return {"step": step, "fresh_state": fresh_state}


def run(engine, workdir, factory=batches_from, total_steps=10):
    return train(state=engine["fresh_state"](), train_step=engine["step"], batch_iterator_factory=factory,
                 total_steps=total_steps, workdir=str(workdir), log_every=1, checkpoint_every=5, keep=2,
                 progress=False)


def assert_same_params(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def straight_run(engine, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, run(engine, workdir)


def data_files(step_dir):
    """The array data files orbax wrote for a checkpoint step, largest first."""
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return sorted(files, key=os.path.getsize, reverse=True)


def flip_bytes(path):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(byte ^ 0xFF for byte in data[middle:middle + 4])
    open(path, "wb").write(bytes(data))


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 3])


def copy_run(source, destination):
    subprocess.run(["cp", "-r", str(source / "checkpoints"), str(destination / "checkpoints")], check=True)


# --- preemption, one process ----------------------------------------------------------------------------------
def test_sigterm_saves_the_current_step_and_a_resumed_run_ends_like_a_straight_one(engine, straight_run, tmp_path,
                                                                                   caplog):
    _, straight = straight_run
    previous_handler = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="jaxalign.train.loop"), pytest.raises(TrainingPreempted) as stop:
        run(engine, tmp_path, factory=lambda start: batches_from(start, sigterm_before_step=3))
    # The step under way when SIGTERM arrived is finished and saved, although 3 is no checkpoint step.
    assert stop.value.step == 3 and stop.value.code == PREEMPTED_EXIT_CODE == 143
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    assert f"preempted at step 3, checkpoint saved in {tmp_path / 'checkpoints'}/3" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # train() puts the old handler back
    resumed = run(engine, tmp_path)
    assert_same_params(straight.state.params, resumed.state.params)
    assert resumed.history == straight.history[3:]


# --- corrupt checkpoints --------------------------------------------------------------------------------------
def test_flipped_bytes_in_the_latest_checkpoint_fail_its_checksums(engine, straight_run, tmp_path):
    workdir, _ = straight_run
    copy_run(workdir, tmp_path)
    flip_bytes(data_files(tmp_path / "checkpoints" / "10")[0])
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    # orbax itself reads flipped array bytes back as wrong numbers without complaint: only the checksums see it.
    with pytest.raises(UnreadableCheckpointError, match="do not match the checksums"):
        checkpointer.restore(10, engine["fresh_state"]())
    checkpointer.close()


def test_resume_falls_back_past_a_corrupt_latest_checkpoint_and_keeps_it(engine, straight_run, tmp_path, caplog):
    workdir, straight = straight_run
    copy_run(workdir, tmp_path)
    flip_bytes(data_files(tmp_path / "checkpoints" / "10")[0])
    with caplog.at_level(logging.WARNING, logger="jaxalign.train.checkpoint"):
        resumed = run(engine, tmp_path)
    moved_to = f"{tmp_path / 'checkpoints'}-unreadable/10"
    assert "checkpoint step 10 could not be restored" in caplog.text
    assert f"moved it to {moved_to} (not deleted) and resumed from step 5" in caplog.text
    assert os.path.isdir(moved_to)
    # Resumed from step 5, the run redid steps 6..10 and ends exactly where the straight run ended.
    assert [record["step"] for record in resumed.history] == [6, 7, 8, 9, 10]
    assert_same_params(straight.state.params, resumed.state.params)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]


def test_a_truncated_array_file_falls_back_to_the_previous_step(engine, straight_run, tmp_path, caplog):
    workdir, straight = straight_run
    copy_run(workdir, tmp_path)
    truncate(data_files(tmp_path / "checkpoints" / "10")[0])
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    with caplog.at_level(logging.WARNING, logger="jaxalign.train.checkpoint"):
        state, extra = checkpointer.restore_latest(engine["fresh_state"]())
    checkpointer.close()
    assert int(state.step) == 5 and extra["step"] == 5 and "array_checksums" not in extra
    assert "checkpoint step 10 could not be restored" in caplog.text


def test_no_readable_checkpoint_is_one_clear_line(engine, straight_run, tmp_path):
    workdir, _ = straight_run
    copy_run(workdir, tmp_path)
    flip_bytes(data_files(tmp_path / "checkpoints" / "10")[0])
    truncate(data_files(tmp_path / "checkpoints" / "5")[0])
    directory = tmp_path / "checkpoints"
    with pytest.raises(UnreadableCheckpointError) as error:
        run(engine, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"no readable checkpoint in {directory}: steps [10, 5] all failed to restore")
    assert f"mv {directory} {directory}.bad" in message
    assert sorted(os.listdir(directory)) == ["10", "5"]  # nothing moved or deleted


# --- two processes --------------------------------------------------------------------------------------------
def launch_two_processes(log_dir, *args, heartbeat_timeout=None, timeout=180):
    """launch/local.sh 2 4 multihost_faults_worker.py ARGS; returns (exit code, seconds, logs, JSON lines)."""
    env = dict(os.environ, LOG_DIR=str(log_dir))
    env.pop("XLA_FLAGS", None)  # the launcher gives each process its own 4 devices
    # The workers share the test suite's persistent compilation cache: each launch then skips most compiles.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if heartbeat_timeout is not None:
        env["JAXALIGN_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout)
    started = time.time()
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "4", sys.executable,
                           os.path.join(ROOT, "tests", "multihost_faults_worker.py"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    logs = [(log_dir / f"process_{i}.log").read_text() for i in range(2)]
    summaries = [[json.loads(line) for line in log.splitlines() if line.startswith("{")] for log in logs]
    return proc.returncode, time.time() - started, logs, summaries


def test_sigterm_to_both_processes_stops_them_at_one_step_with_a_checkpoint_to_resume(tmp_path):
    workdir = tmp_path / "run"
    code, _, logs, summaries = launch_two_processes(tmp_path / "preempted", workdir, 12, "--sigterm-at-step", 5)
    assert code != 0  # the launcher reports the preempted processes (exit code 143)
    stops = [lines[-1]["preempted_at"] for lines in summaries]
    # JAX's preemption sync picks one step for all, just after the furthest step any process had reached.
    assert stops[0] == stops[1] and 5 <= stops[0] < 12, logs
    assert str(stops[0]) in os.listdir(workdir / "checkpoints")
    assert all(f"preempted at step {stops[0]}, checkpoint saved" in log for log in logs)

    code, _, logs, summaries = launch_two_processes(tmp_path / "resumed", workdir, 12, "--also-straight",
                                                    tmp_path / "straight")
    assert code == 0, logs
    for lines in summaries:
        resumed = lines[-1]
        assert resumed["step"] == 12 and resumed["history"][0][0] == stops[0] + 1
        assert resumed["params"] == resumed["straight"]["params"]
        assert resumed["history"] == resumed["straight"]["history"][stops[0]:]


def test_a_killed_process_ends_the_other_through_the_heartbeat_timeout(tmp_path):
    code, seconds, logs, summaries = launch_two_processes(tmp_path / "killed", tmp_path / "run", 1000,
                                                          "--sigkill-process", 1, "--at-step", 3,
                                                          heartbeat_timeout=10, timeout=150)
    # Ended at all (the launch is bounded by `timeout`, so a hang fails the test), and not by success.
    assert code != 0
    assert summaries[1], "process 1 never reached the step at which it kills itself"
    # The survivor (process 0, which also hosts the coordination service) is aborted by the JAX runtime.
    assert "stopped sending heartbeats" in logs[0]
    assert "Terminating process because the JAX distributed service detected fatal errors" in logs[0]
