"""Low-rank adapters (LoRA, Hu et al. 2021) on chosen kernels: the base weights stay frozen and each adapted kernel
W gains a trained low-rank term, W + (alpha / rank) A @ B.

Which kernels are adapted is data, like the freeze rules (`jaxalign.train.optimizer`): regular expressions that
fully match '/'-joined parameter paths, e.g. 'lm/layers/attention/(query|value)/kernel'. A regex that matches no
parameter is an error naming it, so a misspelt target can never silently train nothing.

Shapes. A kernel's dimensions are read from its logical axes (`jaxalign.models.layers`): leading 'layers' axes are
a stack of independent kernels (one adapter per layer); the output is the trailing (heads, head_dim) pair of an
attention input projection ([E, H, D]) and the last dimension otherwise; the input is what lies between (E for
[E, H, D], (H, D) for the attention output [H, D, E], `in` for a dense [in, out]). For a kernel
W [*stack, *in, *out] and rank r:

  A: [*stack, *in, r]   normal, standard deviation 1 / sqrt(prod(in))
  B: [*stack, r, *out]  zeros, so an adapted model starts equal to its base

Adapters form a tree shaped like the parameters they adapt, with {'a': A, 'b': B} in place of each adapted kernel:
{'lm': {'layers': {'attention': {'query': {'kernel': {'a': A, 'b': B}}}}}}.

The adapted model runs on merged weights: `merge(params, adapters, scale)` returns params with
W + scale * A @ B in place of each adapted kernel, in W's dtype. A trainer calls it inside its loss, so gradients
reach A and B (W is frozen: no gradient, no optimizer state, no float32 master copy); an export writes its result.
Training thus computes exactly what the merged export computes (with a bfloat16 base the merged kernel is rounded
to bfloat16 as the exported one is). The price of merging, against the factored x W + scale (x A) B inside the
model: each step forms the full gradient of every adapted kernel (2 x in x out products per token, what a full
fine-tune computes for that kernel) and one kernel-sized temporary. The memory LoRA saves is kept (no optimizer
state or master copy of the base); the FLOPs are not: with every projection of Qwen2-0.5B adapted, a step does
94% of a full fine-tune's products (`bench/train_step.py --estimate`). A factored form in the decoder's
projections is the change to make if LoRA steps must also be cheaper.

Public API:
  LoraConfig(targets, rank=8, alpha=16.0);  .scale (alpha / rank)
  target_paths(params, targets) -> ['lm/layers/attention/query/kernel', ...]
  kernel_layout(axes) -> KernelLayout(stack, inputs, outputs): dimension counts of a kernel
  adapter_specs(params, param_axes, config) -> ParamSpec tree of the adapters (shapes, logical axes, initialisers)
  init_adapters(params, param_axes, config, key) -> adapters (float32)
  merge(params, adapters, scale) -> params with every adapted kernel replaced by W + scale * A @ B
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxalign.models import layers
from jaxalign.models.layers import HEAD_DIM, HEADS, KV_HEADS, LAYERS, ParamSpec
from jaxalign.train import optimizer as opt_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters and how large they are.

    Attributes:
      targets: regular expressions, each fully matching the '/'-joined paths of kernels to adapt.
      rank: r, the inner width of A @ B.
      alpha: the adapters' product is scaled by alpha / rank (so changing the rank keeps the update's size).
    """

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: name the kernels to adapt, e.g. "
                             "('lm/layers/attention/(query|value)/kernel',)")
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)


class KernelLayout(NamedTuple):
    """How many leading dimensions of a kernel are a stack of kernels, how many are its input and its output."""

    stack: int
    inputs: int
    outputs: int


def _flat(tree: PyTree) -> dict[str, Any]:
    """{'a/b/kernel': leaf} of a pytree (dicts keyed by strings)."""
    return dict(zip(jax.tree.leaves(opt_lib.param_paths(tree)), jax.tree.leaves(tree)))


def _flat_axes(params: PyTree, param_axes: PyTree) -> dict[str, tuple]:
    """{'a/b/kernel': logical axis names} for every parameter, from an axes tree shaped like `params`."""
    treedef = jax.tree.structure(params)
    return dict(zip(jax.tree.leaves(opt_lib.param_paths(params)),
                    (tuple(axes) for axes in treedef.flatten_up_to(param_axes))))


def target_paths(params: PyTree, targets: Sequence[str]) -> list[str]:
    """The paths of the parameters the `targets` regexes fully match, in tree order.

    Raises:
      ValueError: a regex does not compile, or matches no parameter (the message names it and lists the kernel
        paths there are).
    """
    paths = list(_flat(params))
    matched: list[str] = []
    for pattern in targets:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"LoRA target {pattern!r} is not a valid regular expression: {error}") from error
        hits = [path for path in paths if regex.fullmatch(path)]
        if not hits:
            kernels = [path for path in paths if path.endswith("kernel")]
            raise ValueError(f"LoRA target {pattern!r} matches no parameter (it must match a whole '/'-joined path); "
                             f"the kernels are: {kernels[:24]}{' ...' if len(kernels) > 24 else ''}")
        matched += [path for path in hits if path not in matched]
    return [path for path in paths if path in matched]


def kernel_layout(axes: Sequence[str | None]) -> KernelLayout:
    """(stack, inputs, outputs) dimension counts of a kernel with these logical axes (see the module docstring)."""
    axes = tuple(axes)
    stack = 0
    while stack < len(axes) and axes[stack] == LAYERS:
        stack += 1
    rest = axes[stack:]
    outputs = 2 if len(rest) >= 2 and rest[-1] == HEAD_DIM and rest[-2] in (HEADS, KV_HEADS) else 1
    return KernelLayout(stack, len(rest) - outputs, outputs)


def adapter_specs(params: PyTree, param_axes: PyTree, config: LoraConfig) -> dict:
    """`ParamSpec`s of the adapters of `config.targets` in `params` (arrays or ShapeDtypeStructs), nested like params.

    Raises:
      ValueError: a target matches nothing, or matches a parameter that is not a kernel (no input dimension left
        after its stack dimensions, e.g. a bias or a norm scale).
    """
    axes_of = _flat_axes(params, param_axes)
    shapes = {path: tuple(leaf.shape) for path, leaf in _flat(params).items()}
    specs: dict = {}
    for path in target_paths(params, config.targets):
        axes, shape = axes_of[path], shapes[path]
        stack, inputs, outputs = kernel_layout(axes)
        if inputs < 1:
            raise ValueError(f"LoRA targets {list(config.targets)} match {path} of shape {shape} (axes {axes}), which "
                             "is not a kernel [..., in, out]: adapt projection kernels only")
        cut = stack + inputs
        fan_in = math.prod(shape[stack:cut])
        a = ParamSpec((*shape[:cut], config.rank), (*axes[:cut], None), "normal", 1.0 / math.sqrt(fan_in))
        b = ParamSpec((*shape[:stack], config.rank, *shape[cut:]), (*axes[:stack], None, *axes[cut:]), "zeros")
        node = specs
        for name in path.split("/"):
            node = node.setdefault(name, {})
        node.update(a=a, b=b)
    return specs


def init_adapters(params: PyTree, param_axes: PyTree, config: LoraConfig, key: jax.Array) -> dict:
    """Adapters (float32) for `config.targets`: A random, B zero (see `adapter_specs`)."""
    return layers.init_params(adapter_specs(params, param_axes, config), key)


def _low_rank_product(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """A [*stack, *in, r] @ B [*stack, r, *out] -> [*stack, *in, *out] in float32."""
    stack = a.ndim + b.ndim - 2 - len(kernel_shape)
    rank = a.shape[-1]
    a2 = a.reshape(*a.shape[:stack], -1, rank).astype(jnp.float32)
    b2 = b.reshape(*b.shape[:stack], rank, -1).astype(jnp.float32)
    return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)


def merge(params: PyTree, adapters: dict, scale: float) -> PyTree:
    """`params` with W + scale * A @ B (computed in float32, stored in W's dtype) in place of each adapted kernel.

    `adapters` is a tree like `init_adapters` makes; params it does not name are returned as they are (the same
    arrays). Differentiable in `adapters` (and `params`), so a loss of the merged params trains the adapters.

    Raises:
      ValueError: an adapter names a parameter `params` does not have, or its shapes do not fit the kernel.
    """
    flat_params, flat_adapters = _flat(params), _flat(adapters)
    merged: dict[str, jax.Array] = {}
    for path, a in flat_adapters.items():
        kernel_path, _, role = path.rpartition("/")
        if role != "a":
            continue
        if kernel_path not in flat_params or f"{kernel_path}/b" not in flat_adapters:
            raise ValueError(f"LoRA adapter {kernel_path} names no parameter of the model it is merged into, or "
                             "has no B")
        kernel, b = flat_params[kernel_path], flat_adapters[f"{kernel_path}/b"]
        stack = a.ndim + b.ndim - 2 - kernel.ndim
        if stack < 0 or tuple(a.shape[:-1]) + tuple(b.shape[stack + 1:]) != tuple(kernel.shape):
            raise ValueError(f"LoRA adapter {kernel_path}: A {a.shape} @ B {b.shape} does not make the kernel's "
                             f"shape {kernel.shape}")
        delta = _low_rank_product(a, b, kernel.shape)
        merged[kernel_path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return jax.tree.map(lambda path, leaf: merged.get(path, leaf), opt_lib.param_paths(params), params)
