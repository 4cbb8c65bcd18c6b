"""Connectors: the trainable maps from a frozen encoder's tokens to the language model's width.

TinyLLaVA names its connectors by a string, and so does jaxalign:

- `'linear'`: one dense layer, in -> out.
- `'mlp{N}x_gelu'` (for example `'mlp2x_gelu'`, LLaVA-1.5's connector): Linear(in -> out), then N - 1 times
  GELU, Linear(out -> out). `'rag{N}x_gelu'` is accepted as the same thing: it is the name the TinyAlign code
  gives its retrieval connector (`rag2x_gelu`: 96 -> d -> d).
- `'resampler'`: a Perceiver-style resampler (Flamingo / TinyLLaVA's `resampler`): the input tokens are projected
  to the output width, then `num_latents` learned latent queries cross-attend to [input tokens; latents] in
  `num_layers` pre-norm layers (attention + MLP, both residual), followed by a final LayerNorm. Its output has a
  fixed number of tokens whatever the input length.

The same code serves the image connector (vision width -> LM width) and the retrieval connector (memory value width
-> LM width), with different configs. Parameters are described once by `ParamSpec`s (see `models/layers.py`);
resampler layers are stacked and run with `jax.lax.scan`.

Shapes: B batch, N input tokens, N' output tokens (N for linear / MLP, num_latents for the resampler).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.models import layers
from jaxalign.models.layers import EMBED, HEAD_DIM, HEADS, MLP, ParamSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MLP_NAME = re.compile(r"^(?:mlp|rag)(\d+)x_gelu$")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Shape of a connector; hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      kind: 'linear', 'mlp{N}x_gelu' / 'rag{N}x_gelu' (N >= 1 dense layers) or 'resampler'.
      in_dim: width of the input tokens (the vision tower's or the memory value's width).
      out_dim: width of the output tokens (the language model's width d).
      num_latents: resampler only: number of learned latent queries, i.e. output tokens.
      num_layers: resampler only: cross-attention layers.
      num_heads: resampler only: attention heads; out_dim must be a multiple of it.
      mlp_ratio: resampler only: hidden width of each layer's MLP, as a multiple of out_dim.
      layer_norm_eps: resampler only: epsilon of its LayerNorms.
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters may be stored float32 and are cast at use.
    """

    kind: str = "mlp2x_gelu"
    in_dim: int = 1152
    out_dim: int = 2560
    num_latents: int = 64
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in ("linear", "resampler") and not _MLP_NAME.match(self.kind):
            raise ValueError(f"ConnectorConfig.kind={self.kind!r}; expected 'linear', 'mlp{{N}}x_gelu' "
                             f"(for example 'mlp2x_gelu'), 'rag{{N}}x_gelu' or 'resampler'")
        if self.dtype not in DTYPES:
            raise ValueError(f"ConnectorConfig.dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.in_dim < 1 or self.out_dim < 1:
            raise ValueError(f"ConnectorConfig needs positive in_dim and out_dim, got {self.in_dim}, {self.out_dim}")
        if self.kind == "resampler":
            if self.out_dim % self.num_heads:
                raise ValueError(f"ConnectorConfig.out_dim={self.out_dim} is not a multiple of "
                                 f"num_heads={self.num_heads}")
            if self.num_latents < 1 or self.num_layers < 1:
                raise ValueError("a resampler connector needs num_latents >= 1 and num_layers >= 1, got "
                                 f"{self.num_latents} and {self.num_layers}")

    @property
    def num_dense_layers(self) -> int:
        """Dense layers of a linear / MLP connector (1 for 'linear', N for 'mlp{N}x_gelu')."""
        if self.kind == "linear":
            return 1
        match = _MLP_NAME.match(self.kind)
        if match is None:
            raise ValueError(f"connector kind {self.kind!r} has no dense-layer count")
        count = int(match.group(1))
        if count < 1:
            raise ValueError(f"connector kind {self.kind!r} needs at least one layer")
        return count

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """N' for N input tokens: N for linear and MLP connectors, num_latents for the resampler."""
        return self.num_latents if self.kind == "resampler" else num_input_tokens


# ----------------------------------------------------------------------------------------------- params


def _resampler_layer_specs(cfg: ConnectorConfig) -> dict:
    width, heads = cfg.out_dim, cfg.num_heads
    head_dim = width // heads

    def projection() -> dict:
        return {"kernel": ParamSpec((width, heads, head_dim), (EMBED, HEADS, HEAD_DIM)),
                "bias": ParamSpec((heads, head_dim), (HEADS, HEAD_DIM), "zeros")}

    return {
        "input_norm": layers.norm_spec(width),
        "latent_norm": layers.norm_spec(width),
        "query": projection(),
        "key": projection(),
        "value": projection(),
        "out": {"kernel": ParamSpec((heads, head_dim, width), (HEADS, HEAD_DIM, EMBED)),
                "bias": ParamSpec((width,), (EMBED,), "zeros")},
        "mlp_norm": layers.norm_spec(width),
        "mlp_in": layers.dense_spec(width, cfg.mlp_ratio * width, EMBED, MLP),
        "mlp_out": layers.dense_spec(cfg.mlp_ratio * width, width, MLP, EMBED),
    }


def param_specs(cfg: ConnectorConfig) -> dict:
    """The connector's parameters as a pytree of `ParamSpec`s.

    Linear / MLP: {'dense_0': {kernel [in, out], bias [out]}, 'dense_1': {kernel [out, out], ...}, ...}.
    Resampler: {'input_projection', 'latents' [num_latents, out], 'layers' (stacked), 'final_norm'}.
    """
    if cfg.kind == "resampler":
        return {
            "input_projection": layers.dense_spec(cfg.in_dim, cfg.out_dim, None, EMBED),
            # Flamingo and TinyLLaVA draw the latents from a unit normal; they are layer-normed before use.
            "latents": ParamSpec((cfg.num_latents, cfg.out_dim), (None, EMBED), "normal", 1.0),
            "layers": layers.stack_specs(_resampler_layer_specs(cfg), cfg.num_layers),
            "final_norm": layers.norm_spec(cfg.out_dim),
        }
    specs = {}
    for index in range(cfg.num_dense_layers):
        in_dim = cfg.in_dim if index == 0 else cfg.out_dim
        specs[f"dense_{index}"] = layers.dense_spec(in_dim, cfg.out_dim, None if index == 0 else MLP, EMBED)
    return specs


def init(cfg: ConnectorConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Random parameters for `cfg`, stored in `dtype` (float32 by default)."""
    return layers.init_params(param_specs(cfg), key, dtype)


def logical_axes(cfg: ConnectorConfig) -> dict:
    """PartitionSpecs of logical axis names, one per parameter (for `jaxalign.sharding.param_shardings`)."""
    return layers.logical_axes(param_specs(cfg))


# ---------------------------------------------------------------------------------------------- forward


def _resampler_layer(params: dict, cfg: ConnectorConfig, latents: jax.Array, inputs: jax.Array,
                     mask: jax.Array) -> jax.Array:
    """One resampler layer: latents [B, Q, E] attend to [inputs; latents] [B, N + Q, E]; mask [B, 1, 1, N + Q]."""
    dtype = cfg.compute_dtype
    normed_inputs = layers.layer_norm(params["input_norm"], inputs, cfg.layer_norm_eps)
    normed_latents = layers.layer_norm(params["latent_norm"], latents, cfg.layer_norm_eps)
    context = jnp.concatenate([normed_inputs, normed_latents], axis=1)

    def project(p: dict, x: jax.Array) -> jax.Array:
        return jnp.einsum("bte,ehd->bthd", x, p["kernel"].astype(dtype)) + p["bias"].astype(dtype)

    attended = layers.attention(project(params["query"], normed_latents), project(params["key"], context),
                                project(params["value"], context), mask)
    out = jnp.einsum("bthd,hde->bte", attended, params["out"]["kernel"].astype(dtype))
    latents = latents + out + params["out"]["bias"].astype(dtype)
    hidden = layers.layer_norm(params["mlp_norm"], latents, cfg.layer_norm_eps)
    hidden = layers.gelu_exact(layers.dense(params["mlp_in"], hidden, dtype))
    return latents + layers.dense(params["mlp_out"], hidden, dtype)


def apply(params: dict, cfg: ConnectorConfig, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Maps encoder tokens to language-model tokens.

    Args:
      params: from `init(cfg, ...)` (or imported weights of the same structure).
      cfg: the connector's config.
      x: [B, N, in_dim] input tokens (vision features or retrieved memory values).
      mask: optional [B, N] bool, True for real input tokens. Only the resampler uses it (its latents do not
        attend to masked tokens); linear and MLP connectors map every token independently, so masked tokens are
        simply mapped too and the caller keeps ignoring them.
    Returns:
      [B, N', out_dim] in the compute dtype: N' = N for linear / MLP, num_latents for the resampler.
    """
    if x.ndim != 3 or x.shape[-1] != cfg.in_dim:
        raise ValueError(f"connector input must be [batch, tokens, in_dim={cfg.in_dim}], got shape {x.shape}")
    dtype = cfg.compute_dtype
    x = x.astype(dtype)
    if cfg.kind != "resampler":
        for index in range(cfg.num_dense_layers):
            if index:
                x = layers.gelu_exact(x)
            x = layers.dense(params[f"dense_{index}"], x, dtype)
        return x

    batch, num_inputs = x.shape[:2]
    inputs = layers.dense(params["input_projection"], x, dtype)
    latents = jnp.broadcast_to(params["latents"].astype(dtype)[None], (batch, cfg.num_latents, cfg.out_dim))
    input_mask = jnp.ones((batch, num_inputs), bool) if mask is None else mask.astype(bool)
    # Keys are [inputs; latents]; the latents are always visible, so every query has something to attend to.
    attention_mask = jnp.concatenate([input_mask, jnp.ones((batch, cfg.num_latents), bool)], axis=1)
    attention_mask = attention_mask[:, None, None, :]

    def body(carry: jax.Array, layer_params: dict) -> tuple[jax.Array, None]:
        return _resampler_layer(layer_params, cfg, carry, inputs, attention_mask), None

    latents, _ = jax.lax.scan(body, latents, params["layers"])
    return layers.layer_norm(params["final_norm"], latents, cfg.layer_norm_eps)
