"""`jaxalign train` as one program over 2 processes x 4 devices (launch/local.sh) trains on the same rows, and
reaches the same losses, as on 1 process x 8 devices; process 0 alone writes the run's files; a checkpoint of
either resumes on the other process count and ends where the uninterrupted run ends.

Both runs use the tiny random towers on 5% of easy-vqa captions (tfds data built from the `easy-vqa` package into
the default cache, nothing downloaded) for 4 steps of a global batch of 8, with retrieval on, checkpoints at
steps 2 and 4. A resume starts from a copy of a finished run's workdir with its step-4 checkpoint removed.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "jaxalign.cli", "train", "--config",
           "jaxalign/configs/tinyalign_tiny.py:stage=1,steps=4,fraction=0.05",
           "--config.progress=False", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
           "--config.eval.max_batches=2"]


def _environment(**extra: str) -> dict:
    env = dict(os.environ, JAXALIGN_HEARTBEAT_TIMEOUT="20", **extra)
    for name in ("JAXALIGN_COORDINATOR", "JAXALIGN_NUM_PROCESSES", "JAXALIGN_PROCESS_ID", "JAXALIGN_DISTRIBUTED"):
        env.pop(name, None)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
    return env


def _summary(stdout: str) -> dict:
    """The JSON summary a `jaxalign train` prints (the last top-level JSON object of its output)."""
    return json.loads(stdout[stdout.rindex("\n{") + 1:] if "\n{" in stdout else stdout[stdout.index("{"):])


def _run_one_process(workdir) -> None:
    single = subprocess.run(COMMAND + ["--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=_environment(JAX_PLATFORMS="cpu",
                                                          XLA_FLAGS=os.environ["XLA_FLAGS"]))
    assert single.returncode == 0, single.stderr[-5000:]


def _run_two_processes(workdir, logs) -> list[str]:
    """Runs the command as 2 processes x 4 devices; each process's log."""
    env = _environment(LOG_DIR=str(logs))
    env.pop("XLA_FLAGS", None)  # the launcher gives each process its own 4 devices
    launched = subprocess.run(["bash", "launch/local.sh", "2", "4", *COMMAND, "--workdir", str(workdir)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=env)
    outputs = [(logs / f"process_{i}.log").read_text() for i in range(2)]
    assert launched.returncode == 0, f"{launched.stderr}\n" + "\n".join(text[-5000:] for text in outputs)
    return outputs


def _interrupted_copy(finished, copy):
    """A copy of a finished run's workdir as if it had stopped after its step-2 checkpoint."""
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "checkpoints" / "4")
    (copy / "results.json").unlink()
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process results, two-process results, the two processes' summaries, the two workdirs)."""
    from jaxalign.data import easy_vqa

    for split in ("train", "test"):  # built once here, so that the runs only read the cache
        easy_vqa.load_easy_vqa("captions", split)
    root = tmp_path_factory.mktemp("launch_tinyalign")
    one, two, logs = root / "one", root / "two", root / "logs"
    _run_one_process(one)
    outputs = _run_two_processes(two, logs)
    results = [json.loads((workdir / "results.json").read_text()) for workdir in (one, two)]
    return results[0], results[1], [_summary(text) for text in outputs], (one, two)


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """(uninterrupted 1-process results, the 2-process step-2 checkpoint resumed by 1 process, the 1-process
    step-2 checkpoint resumed by 2 processes)."""
    single, _, _, (one, two) = runs
    root = tmp_path_factory.mktemp("launch_tinyalign_resume")
    two_then_one = _interrupted_copy(two, root / "two_then_one")
    _run_one_process(two_then_one)
    one_then_two = _interrupted_copy(one, root / "one_then_two")
    _run_two_processes(one_then_two, root / "logs")
    return single, *(json.loads((workdir / "results.json").read_text()) for workdir in (two_then_one, one_then_two))


def test_both_runs_say_where_they_ran(runs):
    single, multi, summaries, _ = runs
    assert (single["process_count"], single["device_count"]) == (1, 8)
    assert (multi["process_count"], multi["device_count"]) == (2, 8)
    for summary in summaries:
        assert (summary["process_count"], summary["device_count"]) == (2, 8)


def test_two_processes_train_on_the_same_rows_as_one(runs):
    single, multi, _, _ = runs
    assert [step for step, _ in single["loss_history"]] == [step for step, _ in multi["loss_history"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([loss for _, loss in multi["loss_history"]],
                               [loss for _, loss in single["loss_history"]], rtol=1e-4)
    np.testing.assert_allclose(multi["eval"]["loss"], single["eval"]["loss"], rtol=1e-4)
    assert multi["eval"]["num_tokens"] == single["eval"]["num_tokens"]
    assert multi["memory"]["count"] == single["memory"]["count"]


def test_every_process_reports_the_same_numbers(runs):
    _, multi, summaries, _ = runs
    timing = ("seconds_per_step",)  # each process times its own steps
    assert ({key: value for key, value in summaries[0].items() if key not in timing}
            == {key: value for key, value in summaries[1].items() if key not in timing})
    assert summaries[0]["train_loss_last"] == multi["train_loss_last"]
    assert summaries[0]["eval_loss"] == multi["eval"]["loss"]


def test_process_zero_writes_the_files_once(runs):
    _, _, _, (_, two) = runs
    for name in ("results.json", "config.json", "metrics.jsonl", "tokenizer/tokenizer.json", "memory/manifest.json"):
        assert (two / name).is_file(), name
    # Only process 0 logs metrics: one line per logged step, not two.
    steps = [json.loads(line).get("step") for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len([step for step in steps if step == 1]) == 1


def test_a_checkpoint_resumes_on_the_other_process_count_and_ends_where_the_uninterrupted_run_ends(resumed):
    uninterrupted, two_then_one, one_then_two = resumed
    assert (two_then_one["process_count"], one_then_two["process_count"]) == (1, 2)
    expected = dict(uninterrupted["loss_history"])
    for run in (two_then_one, one_then_two):
        # Only steps 3 and 4 ran after the resume: the data iterator continued from its saved per-shard state.
        assert [step for step, _ in run["loss_history"]] == [3, 4]
        np.testing.assert_allclose([loss for _, loss in run["loss_history"]], [expected[3], expected[4]], rtol=1e-4)
        np.testing.assert_allclose(run["eval"]["loss"], uninterrupted["eval"]["loss"], rtol=1e-4)
        assert run["steps"] == 4
