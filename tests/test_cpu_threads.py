"""jaxalign.cpu_threads: enough XLA:CPU threads for fake host devices, so collectives that may run in either
order do not hang (the cause of the aborted CI run with the quick demo)."""
import os
import subprocess
import sys
import textwrap

from jaxalign import cpu_threads

# 300 independent jitted programs with an all-reduce over 8 devices, dispatched back to back: with XLA's default
# pool on 2 cores this hung in 4 of 4 runs.
CHILD = textwrap.dedent("""
    import jaxalign  # first, as users' scripts do: sets PJRT_NPROC before JAX's CPU backend starts
    import os
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",))
    w = jax.device_put(np.ones((256, 256), np.float32), NamedSharding(mesh, P()))
    xs = [jax.device_put(np.full((64, 256), i, np.float32), NamedSharding(mesh, P("d"))) for i in range(300)]
    jax.block_until_ready(xs)
    f = jax.jit(lambda w, x: jnp.mean(jnp.tanh(x @ w) @ w))
    outs = [f(w, x) for x in xs]
    print("PJRT_NPROC", os.environ["PJRT_NPROC"], "sum", float(sum(outs)))
""")


def test_sets_the_pool_only_for_several_fake_devices():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=600"}
    assert cpu_threads.ensure_threads_for_host_devices(env) == 64 and env["PJRT_NPROC"] == "64"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=16"}
    assert cpu_threads.ensure_threads_for_host_devices(env) == 128 and env["PJRT_NPROC"] == "128"
    for untouched in ({}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                      {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "4"}):
        before = dict(untouched)
        assert cpu_threads.ensure_threads_for_host_devices(untouched) is None and untouched == before


def test_independent_collective_programs_finish_after_importing_jaxalign(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "PJRT_NPROC"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8 "
               "--xla_cpu_collective_timeout_seconds=10 --xla_cpu_collective_call_terminate_timeout_seconds=10")
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    # mean(tanh(x @ w) @ w) with x = i everywhere: tanh(256 i) is 0 at i = 0 and 1 after, times 256 columns.
    assert child.stdout.split() == ["PJRT_NPROC", "64", "sum", str(float(299 * 256))]
