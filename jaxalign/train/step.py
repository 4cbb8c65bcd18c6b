"""The update step: gradients of the trainable subtree only, micro-batch accumulation, optimizer update.

A loss function has the signature `loss_fn(params, batch, rng) -> (loss, metrics)` where `loss` is a float32
scalar (a mean over the batch's examples or its tokens) and `metrics` a dict of scalars. From it:

    train_step = make_train_step(loss_fn, optimizer, mask, accum_steps=4, learning_rate_fn=schedule)
    train_step = jit_train_step(train_step, mesh, shardings, batch_sharding(mesh))
    state, metrics = train_step(state, batch)      # metrics: loss, grad_norm, learning_rate, loss_fn's own

Gradient accumulation splits every batch leaf [B, ...] into `accum_steps` micro-batches of B / accum_steps
examples and sums their gradients in a `lax.scan`, so only one micro-batch's activations live at a time. The
split is strided (micro-batch i holds examples i, i + A, i + 2A, ...) so that each device's shard of a
batch-sharded array feeds every micro-batch without communication.

What the loss is a mean over decides how micro-batches weigh, and the loss function declares it as data:
  * over examples (no 'loss_weight' metric): every micro-batch holds B / A examples, so the step averages the
    micro-batch gradients and losses;
  * over a varying number of units, such as answer tokens: the loss function reports that number as the scalar
    metric 'loss_weight' (`LOSS_WEIGHT`). The step then accumulates the gradients of loss * weight (the
    micro-batch's sum; the weight is not differentiated) and the weights, and divides once at the end, so the
    update is the gradient of the whole batch's mean over units however unequally the units fall into
    micro-batches (a micro-batch with 1 answer token no longer counts as much as one with 30). The reported
    'loss' is total sum / total weight. A batch of total weight 0 (no answer tokens) gives loss 0 and a zero
    gradient, provided the loss function returns a finite loss for it (e.g. sum / max(count, 1)).
Either way the result equals one step on the whole batch (up to float rounding). Metrics are means over
micro-batches, except 'loss_weight' and the names in `summed_metrics` (totals such as a token count or a loss
sum), which are summed.

Public API:
  LOSS_WEIGHT = 'loss_weight'   the metric key by which a loss function declares a weighted mean
  make_train_step(loss_fn, optimizer, trainable_mask, accum_steps=1, learning_rate_fn=None, summed_metrics=())
      -> train_step(state, batch) -> (state, metrics)
  jit_train_step(step_fn, mesh, state_shardings, batch_sharding) -> jitted step (donates the state)
  make_eval_step(loss_fn) -> eval_step(params, batch) -> metrics (with 'loss')
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import sharding as sharding_lib
from jaxalign.train import horizon_schedule
from jaxalign.train.optimizer import merge_trainable, split_trainable
from jaxalign.train.state import TrainState

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

# A loss function whose metrics hold this key returns a mean over that many units (e.g. answer tokens), and
# micro-batches are weighted by it.
LOSS_WEIGHT = "loss_weight"


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
                    accum_steps: int = 1, learning_rate_fn: optax.Schedule | None = None,
                    summed_metrics: Sequence[str] = ()
                    ) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds `train_step(state, batch) -> (new_state, metrics)` (not jitted; see `jit_train_step`).

    Args:
      loss_fn: `(params, batch, rng) -> (scalar mean loss, dict of scalar metrics)`. If the metrics hold
        'loss_weight' (`LOSS_WEIGHT`: how many units, e.g. tokens, the loss is a mean over), micro-batches are
        weighted by it so that the update is the gradient of the whole batch's mean over units; otherwise the
        loss is taken as a mean over examples and micro-batches weigh equally.
      optimizer: usually from `build_optimizer`; updated with zero gradients for frozen leaves (their
        transformation, `set_to_zero`, ignores them) and frozen params are passed through unchanged.
      trainable_mask: pytree of bools over params (`trainable_mask(params, rules)`).
      accum_steps: number of micro-batches each batch is split into.
      learning_rate_fn: if given, metrics include 'learning_rate' at the step being taken. If None, and the
        optimizer state holds a schedule of its own (`horizon_schedule.HorizonState`), the metric is its rate.
      summed_metrics: names of loss_fn's metrics that are totals over the batch (a token count, a loss sum):
        summed over micro-batches rather than averaged, so they read the same for any accum_steps.

    Metrics: 'loss' (the batch mean, weighted by 'loss_weight' when given), loss_fn's metrics (means over
    micro-batches; 'loss_weight' and `summed_metrics` summed), 'grad_norm' (global norm of the trainable
    gradients before clipping) and optionally 'learning_rate'.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    summed = frozenset(summed_metrics) | {LOSS_WEIGHT}

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        trainable, frozen = split_trainable(state.params, trainable_mask)
        rng, step_rng = jax.random.split(state.rng)

        def weighted_loss_of_trainable(trainable_params, micro_batch, micro_rng):
            """(loss * weight, (weight, metrics)): the micro-batch's loss sum, differentiated; weight 1 for a
            mean over examples."""
            params = merge_trainable(trainable_params, frozen, trainable_mask)
            loss, metrics = loss_fn(params, micro_batch, micro_rng)
            missing = set(summed_metrics) - set(metrics)
            if missing:
                raise ValueError(f"make_train_step: summed_metrics names {sorted(missing)} but loss_fn returns the "
                                 f"metrics {sorted(metrics)}; pass only names the loss function reports")
            weight = (jax.lax.stop_gradient(jnp.asarray(metrics[LOSS_WEIGHT], jnp.float32))
                      if LOSS_WEIGHT in metrics else jnp.ones((), jnp.float32))
            return loss * weight, (weight, metrics)

        grad_fn = jax.value_and_grad(weighted_loss_of_trainable, has_aux=True)
        if accum_steps == 1:
            (loss_sum, (weight_sum, metrics)), grad_sum = grad_fn(trainable, batch, step_rng)
        else:
            def accumulate(sums, inputs):
                index, micro_batch = inputs
                (micro_loss_sum, (micro_weight, micro_metrics)), micro_grads = grad_fn(
                    trainable, micro_batch, jax.random.fold_in(step_rng, index))
                grad_sum, loss_sum, weight_sum = sums
                sums = (jax.tree.map(jnp.add, grad_sum, micro_grads), loss_sum + micro_loss_sum,
                        weight_sum + micro_weight)
                return sums, micro_metrics

            zeros = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grad_sum, loss_sum, weight_sum), stacked_metrics = jax.lax.scan(
                accumulate, zeros, (jnp.arange(accum_steps), _split_micro_batches(batch, accum_steps)))
            metrics = {name: jax.tree.map(lambda m: jnp.sum(m, axis=0) if name in summed else jnp.mean(m, axis=0),
                                          values)
                       for name, values in stacked_metrics.items()}
        # Divide once by the whole batch's weight; a batch without weight (no answer tokens) has a zero gradient
        # sum and loss sum, and keeps them rather than dividing 0 by 0.
        divisor = jnp.where(weight_sum > 0, weight_sum, 1.0)
        grads = jax.tree.map(lambda g: (g / divisor).astype(g.dtype), grad_sum)  # divide in float32 (counts > 256)
        loss = loss_sum / divisor

        # The optimizer sees the full tree; frozen leaves get zeros that set_to_zero never reads (and XLA drops).
        full_grads = merge_trainable(grads, jax.tree.map(jnp.zeros_like, frozen), trainable_mask)
        updates, opt_state = optimizer.update(full_grads, state.opt_state, state.params)
        trainable_updates, _ = split_trainable(updates, trainable_mask)
        params = merge_trainable(optax.apply_updates(trainable, trainable_updates), frozen, trainable_mask)

        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        elif (rate := horizon_schedule.learning_rate_in(state.opt_state)) is not None:
            metrics["learning_rate"] = rate
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return train_step


def jit_train_step(step_fn: Callable, mesh: Mesh, state_shardings: TrainState,
                   batch_sharding: NamedSharding | PyTree, extra_shardings: tuple = ()) -> Callable:
    """`jax.jit` of a train step `(state, batch, *extra) -> (state, metrics)` with explicit in / out shardings,
    traced in `mesh` (`jaxalign.sharding.trace_in_mesh`: kernels that cannot be partitioned see the mesh); the
    input state is donated.

    `batch_sharding` is one sharding for every batch leaf or a pytree of them. Use
    `jaxalign.sharding.batch_sharding(mesh, 1)` as the single one: it shards the leading (batch) axis of leaves
    of any rank (`batch_sharding(mesh)` with ndim=2 rejects [B] leaves). `extra_shardings` gives one sharding
    (or pytree of them) per extra argument, e.g. a memory bank's arrays as they are laid out. Metrics come back
    replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(sharding_lib.trace_in_mesh(step_fn, mesh),
                   in_shardings=(state_shardings, batch_sharding, *extra_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(loss_fn: LossFn, seed: int = 0) -> Callable[[PyTree, PyTree], dict[str, jax.Array]]:
    """`eval_step(params, batch) -> metrics` ('loss' plus loss_fn's metrics) with a fixed key (deterministic).

    'loss' is this batch's mean; to average over several batches of a weighted loss, weigh each by its
    'loss_weight' (or sum token loss sums and counts, as `jaxalign.evaluate.lm_loss.evaluate_loss` does).
    """
    def eval_step(params: PyTree, batch: PyTree) -> dict[str, jax.Array]:
        loss, metrics = loss_fn(params, batch, jax.random.PRNGKey(seed))
        return dict(metrics, loss=loss)
    return eval_step
