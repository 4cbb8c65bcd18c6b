"""Decoder-only language models of the Llama / Qwen2 and Phi-2 families, as pure functions with a KV cache.

Two block layouts share one implementation:

* family 'llama' (Llama, Qwen2, Mistral, TinyLlama): RMSNorm before attention and before the MLP, rotary
  embeddings over the whole head (base `rope_theta`, optional `rope_scaling`), grouped-query attention, SwiGLU
  MLP, optional q/k/v biases (Qwen2 has them), tied or untied embeddings.
* family 'phi' (Phi-2): one LayerNorm feeding attention and MLP in parallel, partial rotary embeddings
  (`partial_rotary_factor`), a GELU MLP, biases everywhere including the LM head, a final LayerNorm.

Parameters are stored stacked over layers (a leading 'layers' axis) and the layer stack runs under
`jax.lax.scan`. Padding follows one rule: `attention_mask` [B, T] is 1 on real tokens; positions default to
the running count of real tokens, so left and right padding give the same result on real tokens.

A `KVCache` holds keys and values for every layer plus, per slot, the token position and whether the slot
holds a real token. `forward(..., cache=cache)` writes its T tokens at the cache's write index (prefill:
the whole prompt, decode: one token) and attends to every valid slot whose position is not later than the
query's.

Shape names: B batch, T tokens, S cache slots, L layers, H query heads, K key/value heads, D head width,
E embedding width, F MLP width, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.models import attention as attention_kernels
from jaxalign.models import layers
from jaxalign.models.layers import EMBED, HEAD_DIM, HEADS, KV_HEADS, MLP, VOCAB, ParamSpec

FAMILIES = ("llama", "phi")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder LM. Hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      family: 'llama' (Llama / Qwen2 / Mistral block) or 'phi' (Phi-2 block).
      vocab_size, hidden_size, intermediate_size, num_layers: sizes V, E, F, L.
      num_heads, num_kv_heads, head_dim: H, K and D (D defaults to hidden_size // num_heads).
      rope_theta: rotary base.
      rope_scaling: Hugging Face `rope_scaling` (a dict is accepted and stored as sorted items).
      partial_rotary_factor: share of each head's width that is rotated (Phi-2: 0.4).
      norm_eps: epsilon of the RMSNorm / LayerNorm.
      hidden_act: MLP activation, named as in Hugging Face ('silu', 'gelu_new', ...).
      attention_bias: biases on the q/k/v projections.
      attention_output_bias: bias on the attention output projection.
      mlp_bias: biases on the MLP projections.
      lm_head_bias: bias on the LM head (Phi-2).
      tie_word_embeddings: the LM head reuses the input embedding matrix.
      max_position_embeddings: longest context the checkpoint was trained for (informational).
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters may be stored in float32 and are cast at use.
      bos_token_id, eos_token_id, pad_token_id: special token ids (eos may be a tuple of ids).
      attention: attention kernel of the uncached forward pass (training, scoring), one of
        `jaxalign.models.attention.IMPLEMENTATIONS`: 'auto' (default: cuDNN flash attention on GPU in bfloat16,
        splash on TPU, 'chunked' from 1024 tokens and 'xla' below elsewhere), 'einsum', 'xla', 'chunked', 'cudnn',
        'splash'. Cached decoding uses this kernel when it honours positions ('einsum', 'xla', 'chunked') and
        'einsum' otherwise, so generation does not depend on it.
      remat: what the backward pass keeps per layer, one of `layers.REMAT_POLICIES`: 'none' (default),
        'save_dots', 'nothing', 'offload' (see `layers.remat_layer`).
    """

    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    partial_rotary_factor: float = 1.0
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_output_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    attention: str = "auto"
    remat: str = "none"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"DecoderConfig.family={self.family!r}; expected one of {FAMILIES}")
        attention_kernels.check_implementation(self.attention, "DecoderConfig.attention")
        if self.remat not in layers.REMAT_POLICIES:
            raise ValueError(f"DecoderConfig.remat={self.remat!r}; expected one of {layers.REMAT_POLICIES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"DecoderConfig.dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ValueError(f"DecoderConfig: rotary width {self.rotary_dim} (head_dim {self.head_dim} x "
                             f"partial_rotary_factor {self.partial_rotary_factor}) must be a positive even number")
        layers.activation(self.hidden_act)  # fails early on an unknown activation name
        layers.rotary_inverse_frequencies(self.rotary_dim, self.rope_theta, self.rope_scaling_dict)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)


class KVCache(NamedTuple):
    """Keys and values of every layer for up to S tokens per row.

    Attributes:
      keys, values: [L, B, S, K, D].
      positions: [B, S] int32 token position held by each slot.
      valid: [B, S] bool, True where the slot holds a real (non-padding) token.
      index: int32 scalar, the slot the next write starts at (shared by all rows).
      next_position: [B] int32, the position the next real token of each row takes by default.
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    valid: jax.Array
    index: jax.Array
    next_position: jax.Array


class DecoderOutput(NamedTuple):
    """logits [B, T, V] float32 (None when skipped), hidden [B, T, E] after the final norm (None unless asked),
    cache (the updated KVCache, or None)."""

    logits: jax.Array | None
    hidden: jax.Array | None
    cache: KVCache | None


# --------------------------------------------------------------------------------------------- parameters


def param_specs(cfg: DecoderConfig) -> dict:
    """`ParamSpec` pytree of the model; layer parameters carry a leading 'layers' axis."""
    e, f, h, k, d, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.vocab_size)
    norm_bias = cfg.family == "phi"

    def projection(heads: int, heads_axis: str) -> dict:
        spec = {"kernel": ParamSpec((e, heads, d), (EMBED, heads_axis, HEAD_DIM))}
        if cfg.attention_bias:
            spec["bias"] = ParamSpec((heads, d), (heads_axis, HEAD_DIM), "zeros")
        return spec

    attention = {"query": projection(h, HEADS), "key": projection(k, KV_HEADS), "value": projection(k, KV_HEADS),
                 "output": {"kernel": ParamSpec((h, d, e), (HEADS, HEAD_DIM, EMBED))}}
    if cfg.attention_output_bias:
        attention["output"]["bias"] = ParamSpec((e,), (EMBED,), "zeros")
    if cfg.family == "llama":
        mlp = {"gate": layers.dense_spec(e, f, EMBED, MLP, cfg.mlp_bias),
               "up": layers.dense_spec(e, f, EMBED, MLP, cfg.mlp_bias),
               "down": layers.dense_spec(f, e, MLP, EMBED, cfg.mlp_bias)}
        block = {"attention_norm": layers.norm_spec(e, bias=False), "attention": attention,
                 "mlp_norm": layers.norm_spec(e, bias=False), "mlp": mlp}
    else:
        mlp = {"up": layers.dense_spec(e, f, EMBED, MLP, cfg.mlp_bias),
               "down": layers.dense_spec(f, e, MLP, EMBED, cfg.mlp_bias)}
        block = {"attention_norm": layers.norm_spec(e, bias=True), "attention": attention, "mlp": mlp}
    specs = {"embed": {"embedding": ParamSpec((v, e), (VOCAB, EMBED))},
             "layers": layers.stack_specs(block, cfg.num_layers),
             "final_norm": layers.norm_spec(e, bias=norm_bias)}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = layers.dense_spec(e, v, EMBED, VOCAB, cfg.lm_head_bias)
    return specs


def init(cfg: DecoderConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Random parameters (stored in `dtype`, float32 by default) for `cfg`."""
    return layers.init_params(param_specs(cfg), key, dtype)


def logical_axes(cfg: DecoderConfig) -> dict:
    """PartitionSpecs of logical axis names, one per parameter (for `jaxalign.sharding.shard_params`)."""
    return layers.logical_axes(param_specs(cfg))


# ------------------------------------------------------------------------------------------------ KV cache


def init_cache(cfg: DecoderConfig, batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens (prompt plus generated tokens)."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   positions=jnp.zeros((batch, max_length), jnp.int32),
                   valid=jnp.zeros((batch, max_length), bool),
                   index=jnp.zeros((), jnp.int32), next_position=jnp.zeros((batch,), jnp.int32))


def cache_logical_axes(cfg: DecoderConfig) -> KVCache:
    """Logical axes of a KVCache's arrays, to shard a cache like the activations it came from."""
    del cfg
    P = jax.sharding.PartitionSpec
    kv = P("layers", "batch", None, KV_HEADS, HEAD_DIM)
    return KVCache(keys=kv, values=kv, positions=P("batch", None), valid=P("batch", None), index=P(),
                   next_position=P("batch"))


# ------------------------------------------------------------------------------------------------- forward


def embed(params: dict, cfg: DecoderConfig, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, E] (compute dtype) of ids [B, T]."""
    return jnp.take(params["embed"]["embedding"], input_ids, axis=0).astype(cfg.compute_dtype)


def hidden_states_to_logits(params: dict, cfg: DecoderConfig, hidden: jax.Array) -> jax.Array:
    """LM-head logits [..., V] in float32 from final-normed hidden states [..., E].

    Kept apart from `forward` so a trainer can compute a chunked cross-entropy without materialising [B, T, V].
    """
    dtype = cfg.compute_dtype
    hidden = hidden.astype(dtype)
    if cfg.tie_word_embeddings:
        return jnp.einsum("...e,ve->...v", hidden, params["embed"]["embedding"].astype(dtype),
                          preferred_element_type=jnp.float32)
    head = params["lm_head"]
    logits = jnp.einsum("...e,ev->...v", hidden, head["kernel"].astype(dtype), preferred_element_type=jnp.float32)
    if "bias" in head:
        logits = logits + head["bias"].astype(jnp.float32)
    return logits


def _norm(cfg: DecoderConfig, params: dict, x: jax.Array) -> jax.Array:
    if cfg.family == "phi":
        return layers.layer_norm(params, x, cfg.norm_eps)
    return layers.rms_norm(params, x, cfg.norm_eps)


def _project(params: dict, x: jax.Array, dtype: Any) -> jax.Array:
    """x [B, T, E] -> [B, T, heads, D] with a kernel [E, heads, D]."""
    y = jnp.einsum("bte,ehd->bthd", x, params["kernel"].astype(dtype))
    return y + params["bias"].astype(dtype) if "bias" in params else y


def _attention_block(params: dict, cfg: DecoderConfig, x: jax.Array, sin: jax.Array, cos: jax.Array,
                     attend: Callable, cached: tuple[jax.Array, jax.Array] | None, index: jax.Array | None):
    """Self-attention of x [B, T, E]; with `cached` ([B, S, K, D] keys and values) writes the new keys and
    values at slot `index` and attends to the whole cache. `attend(q, k, v)` is the masked attention kernel.
    Returns ([B, T, E], updated cache slices or None)."""
    dtype = cfg.compute_dtype
    q = layers.apply_rotary(_project(params["query"], x, dtype), sin, cos)
    k = layers.apply_rotary(_project(params["key"], x, dtype), sin, cos)
    v = _project(params["value"], x, dtype)
    if cached is not None:
        cached_keys, cached_values = cached
        k = jax.lax.dynamic_update_slice(cached_keys, k.astype(cached_keys.dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(cached_values, v.astype(cached_values.dtype), (0, index, 0, 0))
        cached = (k, v)
    out = attend(q, k.astype(dtype), v.astype(dtype))
    out = jnp.einsum("bthd,hde->bte", out, params["output"]["kernel"].astype(dtype))
    if "bias" in params["output"]:
        out = out + params["output"]["bias"].astype(dtype)
    return out, cached


def _mlp_block(params: dict, cfg: DecoderConfig, x: jax.Array) -> jax.Array:
    dtype, act = cfg.compute_dtype, layers.activation(cfg.hidden_act)
    if cfg.family == "llama":
        hidden = act(layers.dense(params["gate"], x, dtype)) * layers.dense(params["up"], x, dtype)
    else:
        hidden = act(layers.dense(params["up"], x, dtype))
    return layers.dense(params["down"], hidden, dtype)


def _default_positions(mask: jax.Array, cache: KVCache | None) -> jax.Array:
    """Running count of real tokens minus one (pads take their neighbour's position; they are masked anyway),
    continuing from the cache's next position."""
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    if cache is not None:
        positions = positions + cache.next_position[:, None]
    return positions


def forward(params: dict, cfg: DecoderConfig, *, input_ids: jax.Array | None = None,
            inputs_embeds: jax.Array | None = None, attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None, cache: KVCache | None = None, return_hidden: bool = False,
            compute_logits: bool = True) -> DecoderOutput:
    """Runs the LM on ids [B, T] or embeddings [B, T, E] (exactly one of them).

    Args:
      params: parameters of `param_specs(cfg)`.
      cfg: the architecture.
      input_ids: [B, T] token ids.
      inputs_embeds: [B, T, E] input embeddings (a VLM splices image tokens here).
      attention_mask: [B, T], 1 / True on real tokens and 0 on padding (left or right); default all real.
      positions: [B, T] int token positions; default: the running count of real tokens minus one (continuing
        from `cache.next_position` when a cache is given), which makes left padding transparent.
      cache: a KVCache from `init_cache`; the T new tokens are written at `cache.index`.
      return_hidden: also return the final-normed hidden states [B, T, E].
      compute_logits: set False to skip the [B, T, V] logits (use `hidden_states_to_logits` on chunks).
    Returns:
      DecoderOutput(logits, hidden, cache).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("decoder.forward: pass exactly one of input_ids [batch, tokens] or inputs_embeds "
                         "[batch, tokens, width]")
    if cache is not None and not isinstance(cache.index, jax.core.Tracer):
        # Under jit the write index is traced and cannot be checked; eagerly, an overflowing write would be
        # clipped by dynamic_update_slice and silently overwrite the last slots.
        capacity, used = cache.keys.shape[2], int(cache.index)
        new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if used + new > capacity:
            raise ValueError(f"decoder.forward: the KV cache holds {capacity} tokens; {used} are used and {new} "
                             "more do not fit (make the cache with a larger max_length)")
    x = embed(params, cfg, input_ids) if input_ids is not None else inputs_embeds.astype(cfg.compute_dtype)
    batch, length = x.shape[:2]
    mask = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        positions = _default_positions(mask, cache)
    positions = positions.astype(jnp.int32)
    inverse_frequencies = layers.rotary_inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    sin, cos = layers.rotary_sin_cos(positions, inverse_frequencies)

    if cache is None:
        key_positions, key_valid, index = positions, mask, None
        implementation = cfg.attention
    else:
        index = cache.index
        key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
        key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
        # Cache slots are not query tokens, so only kernels that read positions apply; by default decoding keeps
        # the reference kernel.
        implementation = cfg.attention if cfg.attention in ("einsum", "xla", "chunked") else "einsum"
    # A query attends valid keys whose position is not later than its own. 'cudnn' and 'splash' compare token
    # indices instead, which agrees as long as real tokens' positions increase along the row (default positions
    # and align.splice's positions do).
    attend = functools.partial(attention_kernels.dot_product_attention, implementation=implementation, causal=True,
                               key_valid=key_valid, query_positions=positions, key_positions=key_positions)

    @functools.partial(layers.remat_layer, remat=cfg.remat, field="DecoderConfig.remat")
    def layer(x, inputs):
        layer_params, cached = inputs
        h = _norm(cfg, layer_params["attention_norm"], x)
        attended, cached = _attention_block(layer_params["attention"], cfg, h, sin, cos, attend, cached, index)
        if cfg.family == "phi":
            x = x + attended + _mlp_block(layer_params["mlp"], cfg, h)
        else:
            x = x + attended
            x = x + _mlp_block(layer_params["mlp"], cfg, _norm(cfg, layer_params["mlp_norm"], x))
        return x, cached

    cached_inputs = None if cache is None else (cache.keys, cache.values)
    x, new_cached = jax.lax.scan(layer, x, (params["layers"], cached_inputs))
    hidden = _norm(cfg, params["final_norm"], x)

    new_cache = None
    if cache is not None:
        written_end = jnp.max(jnp.where(mask, positions + 1, 0), axis=1)
        new_cache = KVCache(keys=new_cached[0], values=new_cached[1], positions=key_positions, valid=key_valid,
                            index=cache.index + length,
                            next_position=jnp.maximum(cache.next_position, written_end).astype(jnp.int32))
    logits = hidden_states_to_logits(params, cfg, hidden) if compute_logits else None
    return DecoderOutput(logits=logits, hidden=hidden if return_hidden else None, cache=new_cache)
