"""LoRA in TinyAlign runs: where the adapters of `config.model.lora` enter a run's params, its update step and
everything that runs its model (the adapters themselves and their merging are `jaxalign.train.lora`).

A LoRA run keeps the LM's base weights frozen (stored in the compute dtype, like any frozen tower) and trains
low-rank adapters on the kernels `config.model.lora.targets` names, together with the connectors. The adapters sit
in the params under 'lora', in a tree shaped like the params they adapt ('lora/lm/layers/attention/query/kernel/a'
and '.../b'), so that the freeze rules train them ('lora' takes the place of 'lm' among the trained parts,
`tinyalign_setup.trainable_parts`) and the checkpoints hold them with the connectors, never the LM. Whatever runs
the model (the loss, evaluation, generation, `jaxalign predict`, the Hugging Face export) runs `model_params(params,
lora)`: the adapters merged into the LM, 'lora' gone.

Public API:
  lora_config(config) -> LoraConfig | None (None: no LoRA, `config.model.lora.targets` empty)
  add_adapters(params, param_axes, lora, key) -> (params, param_axes) with the 'lora' part
  model_params(params, lora) -> the params the model runs on
  adapter_count(params) -> number of adapter parameters
  make_update_step(cfg, lora, optimizer, mask, accum_steps, learning_rate_fn) -> step(state, batch, memory)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import ml_collections
import optax

from jaxalign.align import update_step
from jaxalign.align.model import TinyAlignConfig
from jaxalign.models import layers
from jaxalign.train import lora as lora_lib

PyTree = Any
PART = "lora"


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
    """The run's `LoraConfig` from `config.model.lora` (None when its targets are empty, or for a config saved before
    the field existed).

    Raises:
      ValueError: the targets name weights outside the LM (LoRA adapts the LM only: the connectors train in full
        and the vision tower, whose features key the memory bank, stays frozen).
    """
    settings = config.model.get("lora")
    if settings is None or not settings.targets:
        return None
    targets = (settings.targets,) if isinstance(settings.targets, str) else tuple(settings.targets)
    outside = [target for target in targets if not target.startswith("lm/")]
    if outside:
        raise ValueError(f"config.model.lora.targets {outside} do not start with 'lm/': LoRA adapts the LM's kernels "
                         "only, e.g. 'lm/layers/attention/(query|value)/kernel'")
    return lora_lib.LoraConfig(targets=targets, rank=int(settings.rank), alpha=float(settings.alpha))


def add_adapters(params: dict, param_axes: dict, lora: lora_lib.LoraConfig, key: jax.Array
                 ) -> tuple[dict, dict]:
    """(params, param_axes) with the adapters of `lora` (A random, B zero: the model is unchanged) as 'lora'."""
    specs = lora_lib.adapter_specs(params, param_axes, lora)
    return ({**params, PART: layers.init_params(specs, key)},
            {**param_axes, PART: layers.logical_axes(specs)})


def model_params(params: dict, lora: lora_lib.LoraConfig | None) -> dict:
    """The params the model runs on: the adapters merged into the kernels they adapt, the 'lora' part dropped
    (params without one are returned as they are)."""
    if lora is None or PART not in params:
        return params
    rest = {name: part for name, part in params.items() if name != PART}
    return lora_lib.merge(rest, params[PART], lora.scale)


def adapter_count(params: dict) -> int:
    """How many adapter parameters `params` hold (0 without LoRA)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params.get(PART, {})))


def make_update_step(cfg: TinyAlignConfig, lora: lora_lib.LoraConfig | None, optimizer: optax.GradientTransformation,
                     mask: PyTree, accum_steps: int, learning_rate_fn: optax.Schedule | None = None) -> Callable:
    """`step(state, batch, memory) -> (state, metrics)`: `jaxalign.align.update_step.make_update_step`, whose loss
    runs on `model_params` when `lora` is set, so the gradients of the adapters come through the merged kernels
    (the frozen base gets none). Jit it with `update_step.jit_update_step`."""
    params_fn = None if lora is None else functools.partial(model_params, lora=lora)
    return update_step.make_update_step(cfg, optimizer, mask, accum_steps, learning_rate_fn, params_fn=params_fn)
