"""Text students for CLUTRR: a BiLSTM and a small transformer encoder over anonymised stories.

Both read token ids [B, L] of a story whose people are written `@ent0`, `@ent1`, ... (a random permutation per
story, see `jaxalign.distill.clutrr_batches.text_batch`) and answer the query "how is the target related to the
source". The query representation is the concatenation of
  [mean state over the source person's mentions; mean over the target's mentions; mean over the whole story]
(the latent, width 3 * state_dim), read by a 2-layer MLP classifier. The latent is what contrastive
distillation aligns with the GNN teacher's graph latent; token states pooled per person (`entity_states`)
can be aligned with the teacher's node states.

BiLSTM: one LSTM per direction per layer, each written with `jax.lax.scan` over time. A padded step leaves the
LSTM state unchanged, so the forward direction ignores the padding after a story and the backward direction
starts from its initial state at each story's last real token: a padded story gives the same states as the
unpadded one. Transformer: pre-LayerNorm blocks (Xiong et al., 2020) with learned positions and a key padding
mask, stacked along a 'layers' axis and run with `jax.lax.scan`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.models import layers
from jaxalign.models.layers import EMBED, HEADS, MLP, VOCAB, ParamSpec

_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a text student.

    Attributes:
      kind: 'bilstm' or 'transformer'.
      vocab_size: word vocabulary size (ids from `clutrr_batches.build_word_vocabulary`).
      embed: token embedding width.
      hidden: LSTM width per direction, or the transformer width.
      num_layers: LSTM layers (each bidirectional) or transformer blocks.
      num_heads: attention heads (transformer); must divide `hidden`.
      mlp: transformer feed-forward width.
      max_length: the token budget L (size of the transformer's position table).
      num_classes: answer classes.
      max_nodes: graph nodes for `entity_states` (the GNN teacher's budget).
      dropout: dropout rate on embeddings and the latent, applied only when `apply` gets an rng.
      dtype: compute dtype name; parameters stay float32.
    """

    kind: str = "bilstm"
    vocab_size: int = 1000
    embed: int = 64
    hidden: int = 64
    num_layers: int = 1
    num_heads: int = 4
    mlp: int = 128
    max_length: int = 256
    num_classes: int = 18
    max_nodes: int = 16
    dropout: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in ("bilstm", "transformer"):
            raise ValueError(f"TextEncoderConfig.kind must be 'bilstm' or 'transformer', got {self.kind!r}")
        if self.kind == "transformer" and self.hidden % self.num_heads:
            raise ValueError(f"TextEncoderConfig.hidden={self.hidden} is not a multiple of "
                             f"num_heads={self.num_heads}")

    @property
    def state_dim(self) -> int:
        """Width of one token state: both LSTM directions concatenated, or the transformer width."""
        return 2 * self.hidden if self.kind == "bilstm" else self.hidden

    @property
    def latent_dim(self) -> int:
        return 3 * self.state_dim


class TextEncoderOutput(NamedTuple):
    """logits [B, classes] float32; latent [B, 3 * state_dim]; token_states [B, L, state_dim] (zero on padding);
    entity_states [B, max_nodes, state_dim] (mean over each graph node's mentions; None without token_node)."""

    logits: jax.Array
    latent: jax.Array
    token_states: jax.Array
    entity_states: jax.Array | None


def _dense(in_dim: int, out_dim: int, in_axis: str | None = EMBED, out_axis: str | None = MLP,
           bias: bool = True) -> dict:
    return layers.dense_spec(in_dim, out_dim, in_axis, out_axis, bias=bias, scale=1.0 / max(in_dim, 1) ** 0.5)


def _lstm_specs(in_dim: int, hidden: int) -> dict:
    return {"input": _dense(in_dim, 4 * hidden), "recurrent": _dense(hidden, 4 * hidden, bias=False)}


def param_specs(config: TextEncoderConfig) -> dict:
    """ParamSpec pytree of the student."""
    specs: dict = {"embedding": ParamSpec((config.vocab_size, config.embed), (VOCAB, EMBED), "normal", 1.0)}
    if config.kind == "bilstm":
        specs["lstm"] = {
            f"layer_{i}": {"forward": _lstm_specs(config.embed if i == 0 else 2 * config.hidden, config.hidden),
                           "backward": _lstm_specs(config.embed if i == 0 else 2 * config.hidden, config.hidden)}
            for i in range(config.num_layers)}
    else:
        width = config.hidden
        block = {
            "attention_norm": layers.norm_spec(width),
            "qkv": _dense(width, 3 * width, EMBED, HEADS),
            "attention_out": _dense(width, width, HEADS, EMBED),
            "mlp_norm": layers.norm_spec(width),
            "mlp_in": _dense(width, config.mlp),
            "mlp_out": _dense(config.mlp, width, MLP, EMBED),
        }
        specs["input_projection"] = _dense(config.embed, width, EMBED, EMBED)
        specs["positions"] = ParamSpec((config.max_length, width), (None, EMBED), "normal", 0.02)
        specs["blocks"] = layers.stack_specs(block, config.num_layers)
        specs["final_norm"] = layers.norm_spec(width)
    specs["classifier"] = {"hidden": _dense(config.latent_dim, config.state_dim),
                           "output": _dense(config.state_dim, config.num_classes, MLP, None)}
    return specs


def init(config: TextEncoderConfig, key: jax.Array) -> dict:
    """Fresh parameters for `config`."""
    return layers.init_params(param_specs(config), key)


# ------------------------------------------------------------------------------------------------ pooling


def masked_mean(states: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of states [B, L, D] over positions where mask [B, L] is set; zeros where none is."""
    weights = mask.astype(states.dtype)[..., None]
    return (states * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


def entity_states(token_states: jax.Array, token_node: jax.Array, num_nodes: int) -> jax.Array:
    """Mean token state per graph node: [B, L, D] with token_node [B, L] (-1: no node) -> [B, num_nodes, D].

    A node never mentioned gets zeros (mask those with the node's mention count, or the graph's node mask).
    """
    membership = jax.nn.one_hot(token_node, num_nodes, dtype=token_states.dtype)       # -1 -> all zeros
    sums = jnp.einsum("bln,bld->bnd", membership, token_states)
    return sums / jnp.maximum(membership.sum(1), 1.0)[..., None]


# ------------------------------------------------------------------------------------------------- BiLSTM


def lstm(params: dict, inputs: jax.Array, mask: jax.Array, reverse: bool = False) -> jax.Array:
    """One LSTM direction over inputs [B, L, in] -> states [B, L, hidden] (zero where mask [B, L] is False).

    A masked step keeps the previous (h, c), so with reverse=True each sequence starts at its last real token.
    The forget gate gets a +1 bias (Jozefowicz et al., 2015) so early training remembers by default.
    """
    gate_inputs = layers.dense(params["input"], inputs)                                  # [B, L, 4 * hidden]
    recurrent = params["recurrent"]["kernel"].astype(inputs.dtype)
    batch, hidden = inputs.shape[0], recurrent.shape[0]

    def step(carry, step_inputs):
        h, c = carry
        gates_x, keep = step_inputs
        gates = gates_x + h @ recurrent
        input_gate, forget_gate, candidate, output_gate = jnp.split(gates, 4, axis=-1)
        new_c = jax.nn.sigmoid(forget_gate + 1.0) * c + jax.nn.sigmoid(input_gate) * jnp.tanh(candidate)
        new_h = jax.nn.sigmoid(output_gate) * jnp.tanh(new_c)
        keep = keep[:, None]
        return (jnp.where(keep, new_h, h), jnp.where(keep, new_c, c)), jnp.where(keep, new_h, 0.0)

    zeros = jnp.zeros((batch, hidden), inputs.dtype)
    _, outputs = jax.lax.scan(step, (zeros, zeros), (jnp.swapaxes(gate_inputs, 0, 1), jnp.swapaxes(mask, 0, 1)),
                              reverse=reverse)
    return jnp.swapaxes(outputs, 0, 1)


def _bilstm_states(params: dict, x: jax.Array, mask: jax.Array) -> jax.Array:
    for i in range(len(params["lstm"])):
        layer = params["lstm"][f"layer_{i}"]
        x = jnp.concatenate([lstm(layer["forward"], x, mask), lstm(layer["backward"], x, mask, reverse=True)], -1)
    return x


# -------------------------------------------------------------------------------------------- transformer


def _transformer_states(params: dict, x: jax.Array, mask: jax.Array, config: TextEncoderConfig) -> jax.Array:
    batch, length = mask.shape
    if length > config.max_length:
        raise ValueError(f"token batch has {length} positions but the transformer's max_length is "
                         f"{config.max_length}")
    x = layers.dense(params["input_projection"], x) + params["positions"][:length].astype(x.dtype)
    attention_mask = mask[:, None, None, :]                                               # [B, 1, 1, S]
    head_dim = config.hidden // config.num_heads

    def block(h, p):
        y = layers.layer_norm(p["attention_norm"], h, _LAYER_NORM_EPS)
        qkv = layers.dense(p["qkv"], y).reshape(batch, length, 3, config.num_heads, head_dim)
        attended = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], attention_mask)
        h = h + layers.dense(p["attention_out"], attended.reshape(batch, length, config.hidden))
        y = layers.layer_norm(p["mlp_norm"], h, _LAYER_NORM_EPS)
        return h + layers.dense(p["mlp_out"], jax.nn.gelu(layers.dense(p["mlp_in"], y))), None

    x, _ = jax.lax.scan(block, x, params["blocks"])
    return layers.layer_norm(params["final_norm"], x, _LAYER_NORM_EPS)


# -------------------------------------------------------------------------------------------------- model


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def apply(params: dict, batch: dict, config: TextEncoderConfig, rng: jax.Array | None = None) -> TextEncoderOutput:
    """Runs the student on a token batch.

    Args:
      params: from `init`.
      batch: tokens [B, L] int, token_mask [B, L], source_mentions / target_mentions [B, L] (the query
        people's positions), optional token_node [B, L] int (graph node per token, -1 for none), as made by
        `jaxalign.distill.clutrr_batches.text_batch`.
      config: the model shape.
      rng: key for dropout; None (evaluation) disables it.
    Returns:
      TextEncoderOutput(logits, latent, token_states, entity_states).
    """
    dtype = jnp.dtype(config.dtype)
    mask = batch["token_mask"].astype(bool)
    embed_rng, latent_rng = jax.random.split(rng) if rng is not None else (None, None)
    x = _dropout(params["embedding"].astype(dtype)[batch["tokens"]], config.dropout, embed_rng)
    if config.kind == "bilstm":
        states = _bilstm_states(params, x, mask)
    else:
        states = _transformer_states(params, x, mask, config)
    states = states * mask[..., None].astype(states.dtype)
    latent = jnp.concatenate([masked_mean(states, batch["source_mentions"]),
                              masked_mean(states, batch["target_mentions"]),
                              masked_mean(states, mask)], axis=-1)
    hidden = jax.nn.relu(layers.dense(params["classifier"]["hidden"], _dropout(latent, config.dropout, latent_rng)))
    logits = layers.dense(params["classifier"]["output"], hidden).astype(jnp.float32)
    entities = entity_states(states, batch["token_node"], config.max_nodes) if "token_node" in batch else None
    return TextEncoderOutput(logits, latent, states, entities)
