"""Two CPU processes joined by jax.distributed over loopback behave as one 8-device host."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_form_one_global_mesh(tmp_path):
    env = dict(os.environ, LOG_DIR=str(tmp_path))
    env.pop("XLA_FLAGS", None)  # the launcher gives each process its own 4 devices
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "4", sys.executable,
                           os.path.join(ROOT, "tests", "multihost_worker.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    logs = {i: (tmp_path / f"process_{i}.log").read_text() for i in range(2)}
    assert proc.returncode == 0, f"launcher failed: {proc.stderr}\n{logs}"
    results = [json.loads([line for line in logs[i].splitlines() if line.startswith("{")][-1]) for i in range(2)]
    assert [r["process"] for r in results] == [0, 1]
    for result in results:
        assert result["processes"] == 2 and result["devices"] == 8
        assert result["global_shape"] == [8]
        # Each process fed 4 of the values 0..7: only a true global array sums all 8 squares.
        assert result["sum_of_squares"] == sum(i * i for i in range(8))
