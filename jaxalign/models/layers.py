"""Parameter specs and the small pure functions every jaxalign model is built from.

A model module describes its parameters once, as a pytree of `ParamSpec` leaves. From that one description
come both the parameters (`init_params`) and their logical sharding axes (`logical_axes`), so the two can
never disagree. `jaxalign.sharding` maps logical axis names ('embed', 'mlp', 'heads', ...) to mesh axes.

Layer stacks are stored stacked, with a leading 'layers' axis, and run with `jax.lax.scan`: one compiled
layer body instead of one per layer keeps compile times short on CPU and TPU alike.

Shape names used in docstrings: B batch, T query tokens, S key tokens, H query heads, K key/value heads,
D head width, E embedding width.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxalign.models import attention as attention_kernels

PyTree = Any

# Logical axis names used by the models. `jaxalign.sharding.LOGICAL_AXIS_RULES` maps them to mesh axes.
EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """What one parameter array is: its shape, logical axis names and initialiser.

    Attributes:
      shape: the array shape.
      axes: one logical axis name (or None) per dimension, for example ('embed', 'mlp').
      init: 'normal' (std = `scale`), 'zeros', 'ones' or 'uniform' (in [-scale, scale]).
      scale: standard deviation or bound of the initialiser.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"
    scale: float = 0.02

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ParamSpec shape {self.shape} and axes {self.axes} differ in rank")


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def stack_specs(specs: PyTree, num_layers: int) -> PyTree:
    """Adds a leading 'layers' dimension to every spec in `specs` (for scanned layer stacks)."""
    return jax.tree.map(
        lambda s: dataclasses.replace(s, shape=(num_layers, *s.shape), axes=(LAYERS, *s.axes)), specs, is_leaf=is_spec
    )


def init_params(specs: PyTree, key: jax.Array, dtype: Any = jnp.float32) -> PyTree:
    """Draws parameters for a pytree of `ParamSpec`s; each leaf gets its own fold of `key`.

    All draws run in one jitted program, cached per list of specs: drawing leaf by leaf compiles one random
    kernel per distinct shape, which costs seconds per model on CPU.
    """
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    for spec in leaves:
        if spec.init not in _INITIALISERS:
            raise ValueError(f"unknown initialiser {spec.init!r} (expected one of {sorted(_INITIALISERS)})")
    draw = _jitted_draw(tuple((s.shape, s.init, s.scale) for s in leaves), jnp.dtype(dtype).name)
    return jax.tree.unflatten(treedef, draw(key))


_INITIALISERS = ("normal", "uniform", "zeros", "ones")


@functools.lru_cache(maxsize=64)
def _jitted_draw(leaf_specs: tuple, dtype_name: str) -> Callable[[jax.Array], list[jax.Array]]:
    """One program drawing every leaf: a single flat normal and a single flat uniform draw, sliced per leaf.

    One random kernel per distribution instead of one per shape keeps the compile to about a second.
    """
    sizes = [int(np.prod(shape)) for shape, _, _ in leaf_specs]

    def draw(key):
        normal_key, uniform_key = jax.random.split(key)
        total = {kind: sum(n for n, (_, init, _) in zip(sizes, leaf_specs) if init == kind) for kind in _INITIALISERS}
        flat = {"normal": jax.random.normal(normal_key, (total["normal"],), jnp.float32),
                "uniform": jax.random.uniform(uniform_key, (total["uniform"],), jnp.float32, -1.0, 1.0)}
        offsets = {"normal": 0, "uniform": 0}
        arrays = []
        for size, (shape, init, scale) in zip(sizes, leaf_specs):
            if init in flat:
                values = flat[init][offsets[init]:offsets[init] + size].reshape(shape) * scale
                offsets[init] += size
            else:
                values = (jnp.zeros if init == "zeros" else jnp.ones)(shape, jnp.float32)
            arrays.append(values.astype(dtype_name))
        return arrays

    return jax.jit(draw)


def logical_axes(specs: PyTree) -> PyTree:
    """The logical axis names of every parameter, as `PartitionSpec`s of logical names."""
    return jax.tree.map(lambda s: PartitionSpec(*s.axes), specs, is_leaf=is_spec)


def shapes(specs: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct` per parameter (float32), for checking imported weights against a config."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), specs, is_leaf=is_spec)


def dense_spec(in_dim: int, out_dim: int, in_axis: str | None, out_axis: str | None, bias: bool = True,
               scale: float = 0.02) -> dict[str, ParamSpec]:
    """Specs of a dense layer: kernel [in, out] (and bias [out])."""
    spec = {"kernel": ParamSpec((in_dim, out_dim), (in_axis, out_axis), "normal", scale)}
    if bias:
        spec["bias"] = ParamSpec((out_dim,), (out_axis,), "zeros")
    return spec


def norm_spec(dim: int, bias: bool = True, init: str = "ones") -> dict[str, ParamSpec]:
    """Specs of a LayerNorm (scale and bias) or RMSNorm (scale only) over the last axis."""
    spec = {"scale": ParamSpec((dim,), (EMBED,), init)}
    if bias:
        spec["bias"] = ParamSpec((dim,), (EMBED,), "zeros")
    return spec


# ----------------------------------------------------------------------------------------------- layers


def dense(params: dict, x: jax.Array, dtype: Any = None) -> jax.Array:
    """x [..., in] @ kernel [in, out] (+ bias) -> [..., out], computed in `dtype` (default: x's dtype)."""
    dtype = dtype or x.dtype
    y = jnp.matmul(x.astype(dtype), params["kernel"].astype(dtype))
    if "bias" in params:
        y = y + params["bias"].astype(dtype)
    return y


def layer_norm(params: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32, output in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * params["scale"].astype(jnp.float32)
    if "bias" in params:
        y = y + params["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(params: dict, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis (Llama / Qwen2 convention: normalise in float32, then scale)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y.astype(x.dtype) * params["scale"].astype(x.dtype))


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function named as in Hugging Face configs ('gelu', 'silu', 'quick_gelu', ...)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------- attention


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float | None = None
              ) -> jax.Array:
    """Multi-head attention with grouped key/value heads.

    Args:
      q: [B, T, H, D] queries.
      k, v: [B, S, K, D] keys and values; H must be a multiple of K (grouped-query attention).
      mask: boolean, broadcastable to [B, 1, T, S]; True where a query may attend. None attends everywhere.
      scale: logit scale, default 1 / sqrt(D).
    Returns:
      [B, T, H, D] in q's dtype. Logits and softmax are computed in float32.

    This is the 'einsum' implementation of `jaxalign.models.attention`, which also holds the memory-light ones.
    """
    return attention_kernels.einsum_attention(q, k, v, mask, scale)


def causal_mask(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[B, 1, T, S] True where key position <= query position. Positions are [B, T] and [B, S]."""
    return (key_positions[:, None, None, :] <= query_positions[:, None, :, None])


# ---------------------------------------------------------------------------------------------- remat

# What the backward pass of a scanned layer keeps, by name (`DecoderConfig.remat`, `VisionConfig.remat`):
#   'none': everything (no jax.checkpoint; fastest, most memory).
#   'save_dots': the outputs of matmuls against weights (projections, MLP), i.e. dots without batch dimensions;
#     attention's batched q.k / p.v products and the elementwise work are recomputed. The usual trade-off:
#     little recompute, and no [T, S] attention array is kept whatever the attention implementation.
#   'nothing': only the layer inputs; the whole layer runs again in the backward pass (least memory).
#   'offload': as 'save_dots', but the saved matmul outputs move to pinned host memory and come back for the
#     backward pass. Needs a backend with a 'pinned_host' memory space (GPU, TPU and, in recent JAX, CPU);
#     elsewhere it raises.
REMAT_POLICIES = ("none", "save_dots", "nothing", "offload")


def remat_layer(layer_fn: Callable, remat: str, field: str = "remat") -> Callable:
    """`layer_fn` wrapped in `jax.checkpoint` with the policy named `remat` (see REMAT_POLICIES); 'none' returns it
    unchanged. Meant for a `lax.scan` body, as MaxText does; `field` names the config field in errors."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"{field}={remat!r} is not a rematerialisation policy; expected one of {REMAT_POLICIES}")
    if remat == "none":
        return layer_fn
    policies = jax.checkpoint_policies
    if remat == "save_dots":
        policy = policies.dots_with_no_batch_dims_saveable
    elif remat == "nothing":
        policy = policies.nothing_saveable
    else:
        memory_kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
        if "pinned_host" not in memory_kinds:
            raise ValueError(f"{field}='offload' needs a 'pinned_host' memory space, and {jax.default_backend()} "
                             f"devices have {sorted(memory_kinds)}; use 'save_dots' or 'nothing'")
        policy = policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return jax.checkpoint(layer_fn, policy=policy, prevent_cse=False)


# ---------------------------------------------------------------------------------------------- rotary


def rotary_inverse_frequencies(rotary_dim: int, base: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] for rotary embeddings, with optional Hugging Face `rope_scaling`.

    Supported scalings: None / 'default', 'linear' (positions divided by `factor`) and 'llama3'
    (frequency-dependent smoothing, as in Llama 3.1).
    """
    inv = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv.astype(np.float32)
    if kind == "linear":
        return (inv / float(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rotary_sin_cos(positions: jax.Array, inverse_frequencies: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin and cos tables [B, T, rotary_dim] for integer positions [B, T] (Hugging Face layout: halves repeated)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies)[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates the first rotary_dim channels of x [B, T, H, D] ('rotate_half' convention); the rest pass through.

    Partial rotary (Phi-2) is the case rotary_dim = sin.shape[-1] < D.
    """
    rotary_dim = sin.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = (x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
