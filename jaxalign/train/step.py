"""The update step: gradients of the trainable subtree only, micro-batch accumulation, optimizer update.

A loss function has the signature `loss_fn(params, batch, rng) -> (loss, metrics)` where `loss` is a float32
scalar (a mean over the batch) and `metrics` a dict of scalars. From it:

    train_step = make_train_step(loss_fn, optimizer, mask, accum_steps=4, learning_rate_fn=schedule)
    train_step = jit_train_step(train_step, mesh, shardings, batch_sharding(mesh))
    state, metrics = train_step(state, batch)      # metrics: loss, grad_norm, learning_rate, loss_fn's own

Gradient accumulation splits every batch leaf [B, ...] into `accum_steps` micro-batches of B / accum_steps
examples and sums their gradients in a `lax.scan`, so only one micro-batch's activations live at a time. The
split is strided (micro-batch i holds examples i, i + A, i + 2A, ...) so that each device's shard of a
batch-sharded array feeds every micro-batch without communication. For a loss that is a mean over examples the
result equals one step on the whole batch (up to float rounding).

Public API:
  make_train_step(loss_fn, optimizer, trainable_mask, accum_steps=1, learning_rate_fn=None)
      -> train_step(state, batch) -> (state, metrics)
  jit_train_step(step_fn, mesh, state_shardings, batch_sharding) -> jitted step (donates the state)
  make_eval_step(loss_fn) -> eval_step(params, batch) -> metrics (with 'loss')
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.train.optimizer import merge_trainable, split_trainable
from jaxalign.train.state import TrainState

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _split_micro_batches(batch: PyTree, accum_steps: int) -> PyTree:
    """[B, ...] -> [accum_steps, B / accum_steps, ...], micro-batch i taking examples i, i + A, ..."""
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch leaf of shape {x.shape} has a leading (batch) size not divisible by "
                             f"accum_steps={accum_steps}; choose a batch size that is a multiple of it")
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, trainable_mask: PyTree,
                    accum_steps: int = 1, learning_rate_fn: optax.Schedule | None = None
                    ) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds `train_step(state, batch) -> (new_state, metrics)` (not jitted; see `jit_train_step`).

    Args:
      loss_fn: `(params, batch, rng) -> (scalar mean loss, dict of scalar metrics)`.
      optimizer: usually from `build_optimizer`; updated with zero gradients for frozen leaves (their
        transformation, `set_to_zero`, ignores them) and frozen params are passed through unchanged.
      trainable_mask: pytree of bools over params (`trainable_mask(params, rules)`).
      accum_steps: number of micro-batches each batch is split into.
      learning_rate_fn: if given, metrics include 'learning_rate' at the step being taken.

    Metrics: 'loss' and loss_fn's metrics (means over micro-batches), 'grad_norm' (global norm of the
    trainable gradients before clipping) and optionally 'learning_rate'.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        trainable, frozen = split_trainable(state.params, trainable_mask)
        rng, step_rng = jax.random.split(state.rng)

        def loss_of_trainable(trainable_params, micro_batch, micro_rng):
            params = merge_trainable(trainable_params, frozen, trainable_mask)
            loss, metrics = loss_fn(params, micro_batch, micro_rng)
            return loss, metrics

        grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(trainable, batch, step_rng)
        else:
            def accumulate(grad_sum, inputs):
                index, micro_batch = inputs
                (micro_loss, micro_metrics), micro_grads = grad_fn(
                    trainable, micro_batch, jax.random.fold_in(step_rng, index))
                return jax.tree.map(jnp.add, grad_sum, micro_grads), (micro_loss, micro_metrics)

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            grad_sum, (losses, stacked_metrics) = jax.lax.scan(
                accumulate, zeros, (jnp.arange(accum_steps), _split_micro_batches(batch, accum_steps)))
            grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
            loss = jnp.mean(losses)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), stacked_metrics)

        # The optimizer sees the full tree; frozen leaves get zeros that set_to_zero never reads (and XLA drops).
        full_grads = merge_trainable(grads, jax.tree.map(jnp.zeros_like, frozen), trainable_mask)
        updates, opt_state = optimizer.update(full_grads, state.opt_state, state.params)
        trainable_updates, _ = split_trainable(updates, trainable_mask)
        params = merge_trainable(optax.apply_updates(trainable, trainable_updates), frozen, trainable_mask)

        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return train_step


def jit_train_step(step_fn: Callable, mesh: Mesh, state_shardings: TrainState,
                   batch_sharding: NamedSharding | PyTree) -> Callable:
    """`jax.jit` of a train step with explicit in / out shardings; the input state is donated.

    `batch_sharding` is one sharding for every batch leaf or a pytree of them. Use
    `jaxalign.sharding.batch_sharding(mesh, 1)` as the single one: it shards the leading (batch) axis of leaves
    of any rank (`batch_sharding(mesh)` with ndim=2 rejects [B] leaves). Metrics come back replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(loss_fn: LossFn, seed: int = 0) -> Callable[[PyTree, PyTree], dict[str, jax.Array]]:
    """`eval_step(params, batch) -> metrics` ('loss' plus loss_fn's metrics) with a fixed key (deterministic)."""
    def eval_step(params: PyTree, batch: PyTree) -> dict[str, jax.Array]:
        loss, metrics = loss_fn(params, batch, jax.random.PRNGKey(seed))
        return dict(metrics, loss=loss)
    return eval_step
