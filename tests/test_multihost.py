"""Two CPU processes joined by jax.distributed over loopback behave as one 8-device host."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxalign import sharding
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
    """Each process encodes half the batches and holds only those rows; the bank they build and save has the
    reference neighbours on 2 processes, and loads in this 1 process onto 8 or 2 devices with the same answers."""
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
        # Host memory: a process holds only the rows it encoded, no more than its devices' rows plus a batch...
        assert sum(result["encoded_rows"]) <= result["local_shard_rows"] + memory_worker.BATCH
        # ... and all-gathers only ids, counts and checksum bytes (1-D integers of at most one id per row).
        for shape, dtype in result["gathered_while_building_and_saving"]:
            assert len(shape) <= 1 and np.issubdtype(np.dtype(dtype), np.integer), (shape, dtype)
            assert dtype == "uint8" or (shape[0] if shape else 1) <= memory_worker.NUM_ROWS
    # Both processes wrote their shards; read here in one process (8, then 2 devices) it holds every row of both
    # hosts, bit for bit, and finds the reference neighbours.
    for devices in (8, 2):
        mesh = sharding.make_mesh((devices, 1, 1), devices=jax.devices()[:devices])
        saved = store.load_bank(tmp_path / "bank", mesh=mesh, fingerprint="multihost-test")
        np.testing.assert_array_equal(saved.host_ids(), ids)
        real = np.asarray(saved.ids) >= 0
        np.testing.assert_array_equal(np.asarray(saved.keys)[real], keys.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(saved.values["x"])[real], keys.astype(np.float32) / 2)
        hits = saved.search(queries, memory_worker.K, method="exact", exclude_ids=exclude)
        np.testing.assert_array_equal(np.asarray(hits.ids), expected)
    manifest = store.read_manifest(tmp_path / "bank")
    assert [shard["rows"] for shard in manifest["shards"]] == [16, 16, 16, 16, 3]  # 67 rows, 16 a device
    # A damaged shard file is refused, naming it.
    damaged = tmp_path / "bank" / "shards" / "00003" / "values" / "tokens.bin"
    damaged.write_bytes(bytes(reversed(damaged.read_bytes())))
    with pytest.raises(store.MemoryBankFileError, match=r"shards/00003/values/tokens\.bin is corrupted"):
        store.load_bank(tmp_path / "bank", mesh=sharding.make_mesh((8, 1, 1)))
