"""The training state pytree and its placement on a device mesh.

`TrainState` holds everything that changes during training and must be checkpointed for an exact resume:
the step counter, parameters, optimizer state and the random key. The key is a raw uint32 key
(`jax.random.PRNGKey` layout, shape [2]) so it checkpoints as a plain array.

Public API:
  TrainState(step, params, opt_state, rng)
  create_train_state(params, optimizer, rng) -> TrainState
  state_shardings(state, param_axes, mesh) -> TrainState of NamedShardings
  abstract_state(state, shardings=None) -> TrainState of jax.ShapeDtypeStruct (with shardings), for restores
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import sharding as sharding_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Step counter (int32 scalar), params, optimizer state and a raw uint32 random key [2]."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array


def create_train_state(params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A step-0 state; `rng` may be a raw uint32 key or a typed key (stored raw either way)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jnp.asarray(rng, jnp.uint32))


def _key_tuple(path: tuple) -> tuple:
    return tuple(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in path)


def state_shardings(state: TrainState, param_axes: PyTree, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of `state` (arrays or ShapeDtypeStructs).

    Params follow their logical axes (`jaxalign.sharding.param_shardings`). An optimizer-state leaf that mirrors
    a parameter (Adam's mu / nu: its path ends with the parameter's path and it has the same shape) gets that
    parameter's sharding; everything else (step counts, scalars, the key) is replicated.
    """
    params_sharding = sharding_lib.param_shardings(state.params, param_axes, mesh)
    by_path: dict[tuple, tuple[tuple, NamedSharding]] = {}
    for (path, leaf), leaf_sharding in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                           jax.tree.leaves(params_sharding)):
        by_path[_key_tuple(path)] = (tuple(leaf.shape), leaf_sharding)
    longest = max((len(key) for key in by_path), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def opt_leaf_sharding(path, leaf) -> NamedSharding:
        key = _key_tuple(path)
        for length in range(min(longest, len(key)), 0, -1):
            match = by_path.get(key[-length:])
            if match is not None and match[0] == tuple(getattr(leaf, "shape", ())):
                return match[1]
        return replicated

    opt_sharding = jax.tree_util.tree_map_with_path(opt_leaf_sharding, state.opt_state)
    return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding, rng=replicated)


def abstract_state(state: TrainState, shardings: TrainState | None = None) -> TrainState:
    """ShapeDtypeStructs of `state` (which may itself be abstract), carrying `shardings` when given.

    This is the restore target of `jaxalign.train.checkpoint.Checkpointer`: restored arrays land directly on
    the current mesh with these shardings.
    """
    def abstract(leaf, leaf_sharding=None):
        leaf_sharding = leaf_sharding if leaf_sharding is not None else getattr(leaf, "sharding", None)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf_sharding)
    if shardings is None:
        return jax.tree.map(abstract, state)
    return jax.tree.map(abstract, state, shardings)
