"""Two CPU processes joined by jax.distributed over loopback behave as one 8-device host."""
import json
import os
import subprocess
import sys

import numpy as np

from jaxalign.memory import knn, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import multihost_memory_worker as memory_worker  # noqa: E402


def _launch_two_processes(script: str, tmp_path, *args: str) -> list[dict]:
    """Runs `script` as 2 processes x 4 fake devices with launch/local.sh; the last JSON line of each log."""
    env = dict(os.environ, LOG_DIR=str(tmp_path))
    env.pop("XLA_FLAGS", None)  # the launcher gives each process its own 4 devices
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "4", sys.executable,
                           os.path.join(ROOT, "tests", script), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    logs = {i: (tmp_path / f"process_{i}.log").read_text() for i in range(2)}
    assert proc.returncode == 0, f"launcher failed: {proc.stderr}\n{logs}"
    return [json.loads([line for line in logs[i].splitlines() if line.startswith("{")][-1]) for i in range(2)]


def test_two_processes_form_one_global_mesh(tmp_path):
    results = _launch_two_processes("multihost_worker.py", tmp_path)
    assert [r["process"] for r in results] == [0, 1]
    for result in results:
        assert result["processes"] == 2 and result["devices"] == 8
        assert result["global_shape"] == [8]
        # Each process fed 4 of the values 0..7: only a true global array sums all 8 squares.
        assert result["sum_of_squares"] == sum(i * i for i in range(8))


def test_memory_bank_built_searched_and_saved_across_two_processes(tmp_path):
    """Each process encodes half the batches; both must end with the whole bank and the reference neighbours."""
    results = _launch_two_processes("multihost_memory_worker.py", tmp_path, str(tmp_path))
    batches = memory_worker.dataset()
    ids = np.concatenate([b["id"] for b in batches])
    keys = 2.0 * np.concatenate([b["x"] for b in batches])
    queries, exclude = memory_worker.queries()
    _, expected = knn.brute_force_numpy(queries, keys, ids, memory_worker.K, "cosine", exclude_ids=exclude)
    assert not (expected == exclude[:, None]).any()       # leave-one-out: no query finds its own row
    for result in results:
        assert result["processes"] == 2 and result["devices"] == 8
        assert result["size"] == memory_worker.NUM_ROWS and result["host_ids"] == ids.tolist()
        for method in ("exact", "binned"):
            assert result[method]["ids"] == expected.tolist(), method
            tokens = np.asarray(result[method]["tokens"])
            np.testing.assert_array_equal(tokens[..., 0], expected)      # each neighbour's own value row
            np.testing.assert_array_equal(tokens[..., 1], -expected)
        assert result["loaded_exact_ids"] == expected.tolist()
    # Process 0 wrote the bank; read here in one process it holds every row of both hosts, bit for bit.
    saved = store.load_bank(tmp_path / "bank", fingerprint="multihost-test")
    np.testing.assert_array_equal(saved.host_ids(), ids)
    real = np.asarray(saved.ids) >= 0
    np.testing.assert_array_equal(np.asarray(saved.keys)[real], keys.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(saved.values["x"])[real], keys.astype(np.float32) / 2)
