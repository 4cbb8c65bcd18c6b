"""One process of the loopback multi-host check (run by tests/test_multihost.py, not collected by pytest).

Each process owns 4 fake CPU devices; together they form one 8-device mesh. Each feeds its own slice of a
global batch and both must see the same global reduction, proving that `jax.distributed` plus
`jax.make_array_from_process_local_data` really join the processes.
"""
import json
import sys

from jaxalign import distributed

assert distributed.initialize_from_environment(), "the launcher did not set JAXALIGN_COORDINATOR"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxalign import sharding  # noqa: E402

mesh = sharding.make_mesh((-1, 1, 1))
process = jax.process_index()
local = {"x": np.arange(4, dtype=np.float32) + 4 * process}  # process 0: 0..3, process 1: 4..7
batch = sharding.global_batch(local, mesh)
total = jax.jit(lambda b: jnp.sum(b["x"] ** 2), out_shardings=sharding.replicated(mesh))(batch)
print(json.dumps({"process": process, "processes": jax.process_count(), "devices": jax.device_count(),
                  "global_shape": list(batch["x"].shape), "sum_of_squares": float(total)}))
sys.stdout.flush()
