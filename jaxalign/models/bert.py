"""BERT encoder (Devlin et al., 2019) as pure functions of `(params, input_ids, attention_mask)`.

The Hugging Face `BertModel` computation without the pooler: embeddings (word + absolute position + token type,
then LayerNorm) and post-LayerNorm layers,

    x = LayerNorm(x + Dense(SelfAttention(x, padding mask)))
    x = LayerNorm(x + Dense(gelu(Dense(x))))

stacked along a leading 'layers' axis and run with `jax.lax.scan`. `jaxalign.io.hf_bert` reads and writes Hugging
Face snapshots (BERT, MiniLM, sentence-transformers BERT folders) into this layout.

Dropout follows Hugging Face's `hidden_dropout_prob` (after the embedding LayerNorm and on both residual branches)
and runs only when `apply` gets an rng; attention-probability dropout is not modelled.

Shapes: B batch, L tokens, E hidden width, H heads, D = E // H head width, I intermediate width, V vocabulary.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxalign.models import attention as attention_kernels
from jaxalign.models import layers
from jaxalign.models.layers import EMBED, HEAD_DIM, HEADS, MLP, VOCAB, ParamSpec

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder; hashable, so it can be a static argument of `jax.jit`.

    Attributes (Hugging Face `BertConfig` names in brackets):
      vocab_size: word-piece vocabulary V [vocab_size].
      hidden: width E [hidden_size].
      num_layers: encoder layers [num_hidden_layers].
      num_heads: attention heads H; must divide `hidden` [num_attention_heads].
      intermediate: feed-forward width I [intermediate_size].
      max_positions: rows of the position table, the longest input [max_position_embeddings].
      type_vocab_size: token-type (segment) ids [type_vocab_size].
      layer_norm_eps: epsilon of every LayerNorm [layer_norm_eps].
      hidden_act: feed-forward activation; 'gelu' is the exact (erf) GELU, as in Hugging Face [hidden_act].
      dropout: hidden dropout rate, applied only when `apply` gets an rng [hidden_dropout_prob].
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters may stay float32 and are cast at use.
      attention: kernel name from `jaxalign.models.attention.IMPLEMENTATIONS` ('auto' picks per backend).
    """

    vocab_size: int = 30522
    hidden: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    dropout: float = 0.0
    dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        if self.hidden % self.num_heads:
            raise ValueError(f"BertConfig.hidden={self.hidden} is not a multiple of num_heads={self.num_heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"BertConfig.dtype={self.dtype!r}; expected one of {DTYPES}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig.dropout={self.dropout} must be in [0, 1)")
        layers.activation(self.hidden_act)  # fails early on an unknown activation name
        attention_kernels.check_implementation(self.attention, "BertConfig.attention")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


# ------------------------------------------------------------------------------------------ parameters


def param_specs(cfg: BertConfig) -> dict:
    """The `ParamSpec` tree of an encoder: what `init` draws and what `jaxalign.io.hf_bert` fills.

    Layout: embeddings/{word [V, E], position [max_positions, E], token_type [type_vocab_size, E], norm};
    layers/... stacked with a leading [num_layers] axis: attention/{query, key, value}/kernel [E, H, D] and
    bias [H, D], attention/out/kernel [H, D, E], attention_norm, mlp/{in [E, I], out [I, E]}, mlp_norm.
    """
    width, heads, head_dim = cfg.hidden, cfg.num_heads, cfg.head_dim
    attention = {name: {"kernel": ParamSpec((width, heads, head_dim), (EMBED, HEADS, HEAD_DIM)),
                        "bias": ParamSpec((heads, head_dim), (HEADS, HEAD_DIM), "zeros")}
                 for name in ("query", "key", "value")}
    attention["out"] = {"kernel": ParamSpec((heads, head_dim, width), (HEADS, HEAD_DIM, EMBED)),
                        "bias": ParamSpec((width,), (EMBED,), "zeros")}
    layer = {"attention": attention, "attention_norm": layers.norm_spec(width),
             "mlp": {"in": layers.dense_spec(width, cfg.intermediate, EMBED, MLP),
                     "out": layers.dense_spec(cfg.intermediate, width, MLP, EMBED)},
             "mlp_norm": layers.norm_spec(width)}
    embeddings = {"word": ParamSpec((cfg.vocab_size, width), (VOCAB, EMBED)),
                  "position": ParamSpec((cfg.max_positions, width), (None, EMBED)),
                  "token_type": ParamSpec((cfg.type_vocab_size, width), (None, EMBED)),
                  "norm": layers.norm_spec(width)}
    return {"embeddings": embeddings, "layers": layers.stack_specs(layer, cfg.num_layers)}


def init(cfg: BertConfig, key: jax.Array) -> dict:
    """Random float32 parameters (std 0.02, BERT's initializer_range) for tests and training from scratch."""
    return layers.init_params(param_specs(cfg), key)


def logical_axes(cfg: BertConfig) -> dict:
    """PartitionSpecs of logical axis names, one per parameter (for `jaxalign.sharding.shard_params`)."""
    return layers.logical_axes(param_specs(cfg))


# ------------------------------------------------------------------------------------------ forward pass


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout of x at `rate`; the identity when rng is None (evaluation) or rate is 0."""
    if rng is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def embed(params: dict, cfg: BertConfig, input_ids: jax.Array, token_type_ids: jax.Array | None = None
          ) -> jax.Array:
    """Token ids [B, L] (and token types [B, L], default 0) -> LayerNormed embeddings [B, L, E].

    Positions are the token indices 0 .. L-1, as Hugging Face uses for right-padded batches.
    """
    length = input_ids.shape[1]
    if length > cfg.max_positions:
        raise ValueError(f"input has {length} tokens but the position table has {cfg.max_positions} rows "
                         f"(BertConfig.max_positions); truncate the input")
    dtype = jnp.dtype(cfg.dtype)
    table = params["embeddings"]
    token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    x = (table["word"].astype(dtype)[input_ids] + table["token_type"].astype(dtype)[token_type_ids]
         + table["position"].astype(dtype)[None, :length])
    return layers.layer_norm(table["norm"], x, cfg.layer_norm_eps)


def _self_attention(params: dict, x: jax.Array, key_valid: jax.Array, cfg: BertConfig) -> jax.Array:
    """Bidirectional attention of x [B, L, E] over its real tokens (key_valid [B, L]) -> [B, L, E], out bias
    included."""
    dtype = x.dtype

    def project(name: str) -> jax.Array:
        return (jnp.einsum("ble,ehd->blhd", x, params[name]["kernel"].astype(dtype))
                + params[name]["bias"].astype(dtype))

    attended = attention_kernels.dot_product_attention(project("query"), project("key"), project("value"),
                                                       implementation=cfg.attention, key_valid=key_valid)
    return (jnp.einsum("blhd,hde->ble", attended, params["out"]["kernel"].astype(dtype))
            + params["out"]["bias"].astype(dtype))


def _layer(params: dict, x: jax.Array, key_valid: jax.Array, rng: jax.Array | None, cfg: BertConfig
           ) -> jax.Array:
    """One post-LayerNorm BERT layer on x [B, L, E]; rng (or None) drives the two hidden dropouts."""
    attention_rng, mlp_rng = jax.random.split(rng) if rng is not None else (None, None)
    attended = dropout(_self_attention(params["attention"], x, key_valid, cfg), cfg.dropout, attention_rng)
    x = layers.layer_norm(params["attention_norm"], x + attended, cfg.layer_norm_eps)
    hidden = layers.activation(cfg.hidden_act)(layers.dense(params["mlp"]["in"], x))
    out = dropout(layers.dense(params["mlp"]["out"], hidden), cfg.dropout, mlp_rng)
    return layers.layer_norm(params["mlp_norm"], x + out, cfg.layer_norm_eps)


def apply(params: dict, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None,
          *, cfg: BertConfig, rng: jax.Array | None = None) -> jax.Array:
    """Runs the encoder: Hugging Face `BertModel(...).last_hidden_state`.

    Args:
      params: from `init` or `jaxalign.io.hf_bert.load`.
      input_ids: [B, L] int word-piece ids (with [CLS] / [SEP] as the tokenizer adds them).
      attention_mask: [B, L], nonzero on real tokens; no query attends a padded key.
      token_type_ids: [B, L] int segment ids; None means all 0 (one segment).
      cfg: the encoder's shape (static under jit).
      rng: key for hidden dropout at rate `cfg.dropout`; None (evaluation) disables it.
    Returns:
      [B, L, E] hidden states in cfg.dtype. States at padded positions are computed but meaningless: mask them.
    """
    key_valid = jnp.asarray(attention_mask).astype(bool)
    # A row with no real token (batch padding) would give every query no key, which some kernels (cuDNN with
    # length 0) answer with NaN that then leaks into gradients through masked sums; let such rows see slot 0.
    key_valid = key_valid.at[:, 0].set(key_valid[:, 0] | ~key_valid.any(axis=1))
    embed_rng, layer_rngs = (None, None)
    if rng is not None and cfg.dropout > 0.0:
        embed_rng, layers_rng = jax.random.split(rng)
        layer_rngs = jax.random.split(layers_rng, cfg.num_layers)
    x = dropout(embed(params, cfg, input_ids, token_type_ids), cfg.dropout, embed_rng)

    # One compiled layer body for every layer; the per-layer dropout keys travel with the stacked weights.
    def body(h, layer_inputs):
        layer_params, layer_rng = layer_inputs
        return _layer(layer_params, h, key_valid, layer_rng, cfg), None

    x, _ = jax.lax.scan(body, x, (params["layers"], layer_rngs))
    return x
