"""TinyAlign's update step as one jitted program over (state, batch, memory bank): what the trainer runs and what
`bench/train_step.py` compiles and times, so the benchmark measures exactly the trainer's step.

The bank is an argument of the jitted step (not a closed-over constant), so its row-sharded keys stay where
they are and the search runs inside the step. The state is donated: its buffers are reused for the new state.

Public API:
  make_update_step(cfg, optimizer, mask, accum_steps, learning_rate_fn, params_fn=None)
      -> step(state, batch, memory)
  jit_update_step(step, state_shardings, mesh, memory) -> jitted step(state, batch, memory) -> (state, metrics)
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from jaxalign import sharding
from jaxalign.align import loss as loss_lib
from jaxalign.align import memory_keys
from jaxalign.align.model import TinyAlignConfig
from jaxalign.train.step import jit_train_step, make_train_step

PyTree = Any


def make_update_step(cfg: TinyAlignConfig, optimizer: optax.GradientTransformation, mask: PyTree,
                     accum_steps: int, learning_rate_fn: optax.Schedule | None = None,
                     params_fn: Callable[[PyTree], PyTree] | None = None) -> Callable:
    """`step(state, batch, memory) -> (state, metrics)`: token-weighted answer loss, `accum_steps` micro-batches,
    gradients of the trainable parts only (`mask`), the optimizer update. Trace it in the run's mesh
    (`jit_update_step` does) so that kernels the compiler cannot partition run per device.

    `params_fn`: the state's params -> the model's params, applied inside the loss so that gradients flow back
    through it (LoRA: adapters merged into their kernels, `jaxalign.train.lora`); None: the params as they are."""
    def step(state, batch, memory):
        loss_fn = loss_lib.make_loss_fn(cfg, memory, train=True)
        if params_fn is not None:
            model_loss = loss_fn

            def loss_fn(params, batch, rng):
                return model_loss(params_fn(params), batch, rng)
        train_step = make_train_step(loss_fn, optimizer, mask,
                                     accum_steps=accum_steps, learning_rate_fn=learning_rate_fn,
                                     summed_metrics=loss_lib.SUMMED_METRICS)
        return train_step(state, batch)
    return step


def jit_update_step(step: Callable, state_shardings: PyTree, mesh: Mesh,
                    memory: memory_keys.RetrievalMemory | None) -> Callable:
    """`jax.jit` of `step` with the state's shardings, batch rows over every mesh axis, the bank as it is laid out
    (arrays or `jax.ShapeDtypeStruct`s with shardings), replicated metrics; the state is donated. The step is
    traced in `mesh` (`jaxalign.train.step.jit_train_step`)."""
    memory_shardings = jax.tree.map(lambda leaf: leaf.sharding, memory)
    return jit_train_step(step, mesh, state_shardings, sharding.batch_sharding(mesh, 1), (memory_shardings,))
