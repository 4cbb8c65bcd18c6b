"""A warm-up + cosine learning rate whose horizon lives in the optimizer state, not in the compiled program.

An optax schedule closes over its step counts as Python numbers, so they become constants of the compiled update
step: two runs that differ only in length (a 40% data fraction trains 40% of the steps) compile two programs and
fill two persistent-cache entries. Here the peak rate, the warm-up and total lengths and the end ratio are float32
scalars of the optimizer state (`HorizonState`), set by `init`; every run of one model and batch shape shares one
compiled step, whatever its length.

The rate is `optimizer.warmup_cosine_schedule`'s (optax's `warmup_cosine_decay_schedule` from 0), computed with
the same operations in the same order, so the two agree to float32 rounding:

    rate(c) = peak * c / w                                               for c < w (linear warm-up)
            = peak * ((1 - e) * 0.5 * (1 + cos(pi * min(c - w, d) / d)) + e)   otherwise,  d = max(T, w + 1) - w

with w the warm-up steps, T the total steps and e the end ratio.

A horizon is the run's setting, not something learned: a resumed run takes it from its config, not from the
checkpoint (`keep_horizon`, which `jaxalign.train.loop.train` applies after a restore), so lengthening a run and
resuming it continues on the longer schedule, as with a closed-over schedule.

Public API:
  HorizonState(count, peak_lr, warmup_steps, total_steps, end_ratio)   the transformation's state (scalars)
  warmup_cosine_rate(count, peak_lr, warmup_steps, total_steps, end_ratio) -> rate (float32 scalar)
  scale_by_horizon_schedule(peak_lr, total_steps, warmup_steps=None, warmup_ratio=0.0, end_ratio=0.0)
      -> optax.GradientTransformation (updates times -rate)
  adamw(peak_lr, total_steps, warmup_ratio=0.0, end_ratio=0.0, weight_decay=0.0, b1, b2, eps, clip_norm=1.0,
        decay_mask) -> optax.GradientTransformation (`optimizer.adamw` with this schedule)
  learning_rate_in(opt_state) -> the rate at the state's count, or None when it holds no HorizonState
  keep_horizon(restored_opt_state, configured_opt_state) -> restored state with the configured horizon
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxalign.train.optimizer import warmup_length, weight_decay_mask

PyTree = Any


class HorizonState(NamedTuple):
    """Step count (int32 scalar) and the schedule's settings (float32 scalars)."""

    count: jax.Array
    peak_lr: jax.Array
    warmup_steps: jax.Array
    total_steps: jax.Array
    end_ratio: jax.Array


def warmup_cosine_rate(count: jax.Array, peak_lr: jax.Array, warmup_steps: jax.Array, total_steps: jax.Array,
                       end_ratio: jax.Array) -> jax.Array:
    """The learning rate at step `count` (see the module docstring); every argument may be traced."""
    count = jnp.asarray(count, jnp.float32)
    # Linear warm-up as optax's polynomial schedule from 0 to the peak writes it: (0 - peak) * (1 - c / w) + peak.
    # A warm-up of 0 steps never takes this branch; max(w, 1) only keeps the division finite.
    warmup_length = jnp.maximum(warmup_steps, 1.0)
    fraction_left = 1 - jnp.clip(count, 0.0, warmup_length) / warmup_length
    warming = (0.0 - peak_lr) * fraction_left + peak_lr
    # Cosine decay from the peak over the steps after warm-up, then held at the end ratio.
    decay_steps = jnp.maximum(total_steps, warmup_steps + 1) - warmup_steps
    decay_count = jnp.minimum(count - warmup_steps, decay_steps)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * decay_count / decay_steps))
    decaying = peak_lr * ((1 - end_ratio) * cosine + end_ratio)
    return jnp.where(count < warmup_steps, warming, decaying).astype(jnp.float32)


def _rate_of(state: HorizonState) -> jax.Array:
    return warmup_cosine_rate(state.count, state.peak_lr, state.warmup_steps, state.total_steps, state.end_ratio)


def scale_by_horizon_schedule(peak_lr: float, total_steps: int, warmup_steps: int | None = None,
                              warmup_ratio: float = 0.0, end_ratio: float = 0.0) -> optax.GradientTransformation:
    """Multiplies updates by -rate(count) (a descent step, like optax's `scale_by_learning_rate`), the horizon
    held in the state.

    Args:
      peak_lr: rate at the end of warm-up.
      total_steps: optimizer steps of the whole run (positive).
      warmup_steps: warm-up length; if None, `round(warmup_ratio * total_steps)`.
      warmup_ratio: warm-up length as a fraction of `total_steps` (used when `warmup_steps` is None).
      end_ratio: final rate as a fraction of `peak_lr`.

    Raises:
      ValueError: for a non-positive `total_steps` or a warm-up outside [0, total_steps].
    """
    warmup_steps = warmup_length(total_steps, warmup_steps, warmup_ratio)

    def init(params):
        del params
        scalar = lambda value: jnp.asarray(value, jnp.float32)
        return HorizonState(count=jnp.zeros([], jnp.int32), peak_lr=scalar(peak_lr),
                            warmup_steps=scalar(warmup_steps), total_steps=scalar(total_steps),
                            end_ratio=scalar(end_ratio))

    def update(updates, state, params=None):
        del params
        step_size = -_rate_of(state)
        updates = jax.tree.map(lambda update: jnp.asarray(step_size, update.dtype) * update, updates)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def adamw(peak_lr: float, total_steps: int, warmup_ratio: float = 0.0, end_ratio: float = 0.0,
          weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          clip_norm: float | None = 1.0,
          decay_mask: Callable[[PyTree], PyTree] | None = weight_decay_mask) -> optax.GradientTransformation:
    """`jaxalign.train.optimizer.adamw(warmup_cosine_schedule(...))` with the horizon as state: clipping by
    global norm, then optax's AdamW chain (Adam scaling, decoupled weight decay on `decay_mask`'s leaves, the
    scheduled rate)."""
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
              optax.add_decayed_weights(weight_decay, decay_mask),
              scale_by_horizon_schedule(peak_lr, total_steps, warmup_ratio=warmup_ratio, end_ratio=end_ratio)]
    return optax.chain(*parts)


def _is_horizon(node) -> bool:
    return isinstance(node, HorizonState)


def learning_rate_in(opt_state: PyTree) -> jax.Array | None:
    """The rate the next update applies: that of the first `HorizonState` in `opt_state` (in tree order), or None
    when there is none. Decided at trace time, from the state's structure."""
    states = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_horizon) if _is_horizon(node)]
    return _rate_of(states[0]) if states else None


def keep_horizon(restored: PyTree, configured: PyTree) -> PyTree:
    """`restored` (an optimizer state from a checkpoint) with every `HorizonState`'s settings taken from
    `configured` (the same structure, freshly initialised from the run's config); counts stay restored."""
    def take(restored_node, configured_node):
        if not _is_horizon(restored_node):
            return restored_node
        return configured_node._replace(count=restored_node.count)
    return jax.tree.map(take, restored, configured, is_leaf=_is_horizon)
