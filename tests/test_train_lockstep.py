"""The training loop on XLA:CPU with several devices: steps fed by the prefetching thread must not hang.

There, overlapping programs with collectives (or one in flight while the prefetching thread places the next batch
on the devices) can leave every XLA:CPU thread waiting in a rendezvous; the loop then waits for each step
(`jaxalign.sharding.steps_need_lockstep`). The run happens in a child process with a short collective timeout, so
a hang shows as XLA's abort within seconds instead of stalling the suite.
"""
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from jaxalign import sharding

CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from jaxalign import sharding
    from jaxalign.train import optimizer as opt_lib
    from jaxalign.train.loop import train
    from jaxalign.train.state import create_train_state, state_shardings
    from jaxalign.train.step import jit_train_step, make_train_step

    mesh = sharding.make_mesh((8, 1, 1))
    params = {"w": 0.1 * jnp.ones((256, 256)), "out": 0.1 * jnp.ones((256, 1))}
    axes = {"w": P("embed", "mlp"), "out": P("mlp", None)}
    rules = [(".*", opt_lib.adamw(1e-3))]
    optimizer = opt_lib.build_optimizer(params, rules)
    mask = opt_lib.trainable_mask(params, rules)

    def loss_fn(params, batch, rng):
        loss = jnp.mean((jnp.tanh(batch["x"] @ params["w"]) @ params["out"] - batch["y"]) ** 2)
        return loss, {}

    shardings = state_shardings(create_train_state(params, optimizer, jax.random.PRNGKey(0)), axes, mesh)
    step = jit_train_step(make_train_step(loss_fn, optimizer, mask), mesh, shardings,
                          sharding.batch_sharding(mesh, 1))
    state = jax.device_put(create_train_state(params, optimizer, jax.random.PRNGKey(0)), shardings)

    def batches(start):
        rng = np.random.default_rng(start)
        while True:  # placed on the mesh here, i.e. on the prefetching thread, as the trainers' iterators do
            yield sharding.global_batch({"x": rng.standard_normal((256, 256), np.float32),
                                         "y": rng.standard_normal((256, 1), np.float32)}, mesh)

    result = train(state=state, train_step=step, batch_iterator_factory=batches, total_steps=int(sys.argv[1]),
                   workdir=sys.argv[2], log_every=100, checkpoint_every=10_000, progress=False, prefetch=2)
    print("finished at step", int(result.state.step), "lockstep", sharding.steps_need_lockstep())
""")


def test_lockstep_only_on_a_multi_device_cpu(eight_devices):
    assert sharding.steps_need_lockstep()                      # the suite's 8 host devices
    assert not sharding.steps_need_lockstep(jax.devices()[:1])  # one device: no collectives to wait in

    class Accelerator:
        platform = "gpu"

    assert not sharding.steps_need_lockstep([Accelerator(), Accelerator()])


def test_prefetched_steps_with_collectives_finish_on_eight_cpu_devices(tmp_path):
    # Without the lockstep this run hung in 2 of 2 tries (1,000 steps at this size; 64-wide steps did not).
    steps = 1000
    # PJRT_NPROC empty: XLA's default thread pool (jaxalign.cpu_threads leaves a set variable alone), so this
    # tests the lockstep by itself.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PJRT_NPROC="", XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=10 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=10"))
    child = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(tmp_path / "run")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert f"finished at step {steps} lockstep True" in child.stdout
