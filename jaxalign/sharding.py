"""Device mesh, logical-axis rules and helpers for global arrays: the one place where sharding is named.

Mesh axes (ARCHITECTURE.md): 'data' (batch), 'fsdp' (parameters and optimizer state), 'tensor' (optional model
parallelism). Models name their parameter dimensions with logical axes ('embed', 'mlp', 'heads', ...);
`LOGICAL_AXIS_RULES` maps each logical name to mesh axes, so the same model runs data-parallel, FSDP or
tensor-parallel by changing the mesh shape, not the model (MaxText's convention).

A dimension is only sharded over a mesh axis when it divides evenly; otherwise it is replicated along that
axis, so tiny test models run on any mesh.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it may be sharded over (in order of preference).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "memory_rows": ("data", "fsdp", "tensor"),
    "layers": (),
    "head_dim": (),
}


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one entry of `shape` may be -1 to take the remaining devices.

    Axes are Explicit-free (Auto) so that `jax.jit(in_shardings=..., out_shardings=...)` decides layouts, as the
    design asks; the mesh works under `jax.set_mesh` as well.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, {len(devices)} are available")
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_mesh_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                         rules: dict[str, tuple[str, ...]] | None = None) -> PartitionSpec:
    """Maps a PartitionSpec of logical names to one of mesh axes, for an array of `shape`.

    A mesh axis is used at most once per array and only where it divides the dimension evenly.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))):
        chosen: list[str] = []
        size = 1
        for axis in rules.get(name, ()) if name is not None else ():
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            chosen.append(axis)
            size *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def param_shardings(params: PyTree, axes: PyTree, mesh: Mesh) -> PyTree:
    """NamedShardings for a parameter pytree given its pytree of logical PartitionSpecs."""
    return jax.tree.map(lambda p, a: NamedSharding(mesh, logical_to_mesh_spec(a, p.shape, mesh)), params, axes)


def shard_params(params: PyTree, axes: PyTree, mesh: Mesh) -> PyTree:
    """Places every parameter on the mesh according to its logical axes."""
    return jax.device_put(params, param_shardings(params, axes, mesh))


def array_from_blocks(shape: Sequence[int], sharding: NamedSharding,
                      read_block: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array of `shape` laid out by `sharding`, each of this process's shards made by `read_block`.

    `read_block(index)` gets one slice per dimension with concrete start and stop (step 1) and returns that block
    of the global value. Devices that hold the same block (replicas along a mesh axis) share one call, so a
    loader reads each distinct block once per process.
    """
    shape = tuple(int(d) for d in shape)
    blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def block(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(d)[:2] for s, d in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)),
                                                       shape))
        if bounds not in blocks:
            blocks[bounds] = read_block(tuple(slice(start, stop) for start, stop in bounds))
        return blocks[bounds]

    return jax.make_array_from_callback(shape, sharding, block)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a global batch: leading axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def trace_in_mesh(function: Callable, mesh: Mesh) -> Callable:
    """`function` traced under `mesh`'s abstract mesh, so that code inside it can see the mesh
    (`jax.sharding.get_abstract_mesh()`): kernels the compiler cannot partition (Pallas) wrap themselves in a
    `jax.shard_map` over it. Shardings and results are unchanged."""
    @functools.wraps(function)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return function(*args, **kwargs)
    return traced


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """Makes global arrays from each process's slice of the batch (`jax.make_array_from_process_local_data`).

    Every leaf is [local_batch, ...]; the global batch is the concatenation over processes in process order.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)),
        local_batch)


def steps_need_lockstep(devices: Sequence[jax.Device] | None = None) -> bool:
    """True where a training loop must wait for each step before dispatching the next: XLA:CPU with several
    devices in this process (`--xla_force_host_platform_device_count`, the tests' fake meshes).

    Why: XLA:CPU runs each device's part of a program as a task on one thread pool of about one thread per
    device, and a collective blocks its thread until every device's part arrives. Two programs with collectives
    in flight at once, or one in flight while another thread places arrays on the devices (the prefetching
    thread), can leave every thread waiting in a rendezvous whose last participant has no thread to run on: the
    process hangs until XLA's collective timeout aborts it. Seen on jax 0.10.2 with 8 host devices on 2 cores:
    1,000 chained update steps fed by a prefetching thread hung in 6 of 6 runs (plain jit, and `jaxalign.train.loop`
    before this lockstep); waiting for each step, 12 of 12 runs finished (tests/test_train_lockstep.py).
    GPUs and TPUs run each device's programs in dispatch order on its own stream, so they never wait here.
    (The other half of the cure is a larger XLA:CPU thread pool, `jaxalign.cpu_threads`, which also covers
    collectives inside one program; this lockstep keeps the loop safe with the default pool.)
    """
    devices = list(devices if devices is not None else jax.local_devices())
    return len(devices) > 1 and all(device.platform == "cpu" for device in devices)
