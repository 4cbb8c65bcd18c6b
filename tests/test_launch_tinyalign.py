"""`jaxalign train` as one program over 2 processes x 4 devices (launch/local.sh) trains on the same rows, and
reaches the same losses, as on 1 process x 8 devices; process 0 alone writes the run's files.

Both runs use the tiny random towers on 5% of easy-vqa captions (tfds data built from the `easy-vqa` package into
the default cache, nothing downloaded) for 4 steps of a global batch of 8, with retrieval on.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "jaxalign.cli", "train", "--config",
           "jaxalign/configs/tinyalign_tiny.py:stage=1,steps=4,fraction=0.05",
           "--config.progress=False", "--config.train.log_every=1", "--config.train.checkpoint_every=4",
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process results, two-process results, the two processes' summaries, the two workdirs)."""
    from jaxalign.data import easy_vqa

    for split in ("train", "test"):  # built once here, so that the runs only read the cache
        easy_vqa.load_easy_vqa("captions", split)
    root = tmp_path_factory.mktemp("launch_tinyalign")
    one, two, logs = root / "one", root / "two", root / "logs"
    single = subprocess.run(COMMAND + ["--workdir", str(one)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=_environment(JAX_PLATFORMS="cpu",
                                                          XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert single.returncode == 0, single.stderr[-5000:]
    env = _environment(LOG_DIR=str(logs))
    env.pop("XLA_FLAGS", None)  # the launcher gives each process its own 4 devices
    launched = subprocess.run(["bash", "launch/local.sh", "2", "4", *COMMAND, "--workdir", str(two)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=env)
    outputs = [(logs / f"process_{i}.log").read_text() for i in range(2)]
    assert launched.returncode == 0, f"{launched.stderr}\n" + "\n".join(text[-5000:] for text in outputs)
    results = [json.loads((workdir / "results.json").read_text()) for workdir in (one, two)]
    return results[0], results[1], [_summary(text) for text in outputs], (one, two)


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
