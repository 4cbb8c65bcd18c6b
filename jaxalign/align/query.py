"""Retrieval queries: one vector per sample, pooled from its image tokens and its prompt-text embeddings.

TinyAlign builds the query it sends to the memory bank from the sample itself:

1. normalise every image token (connector output) and every text token (LM input embedding) to unit L2 norm;
2. weight them (0.4 for image tokens, 0.6 for text tokens in the official code) and stack them into
   M [n, d], n = image tokens + text tokens;
3. A = softmax(M Mᵀ) over the last axis (no 1/sqrt(d) scaling), w = mean of A's rows [n], q = w · M [d];
4. L2-normalise q. The result is wrapped in `stop_gradient`: retrieval is not differentiated through.

Two modes share that pooling and differ only in which tokens take part:

- **faithful** (`faithful_query`): exactly the official code. The text slice is every position from
  `text_start` (35 for the Phi template; see `TINYALIGN.md`) to the end of the padded sequence, so padding and,
  in training, the answer tokens are part of the query.
- **default** (`masked_query`): the caller passes a token mask that keeps only prompt text tokens (no padding, no
  answer tokens, no template markers) and image tokens; the softmax ignores masked columns and the mean ignores
  masked rows, so the query does not depend on padding or on the answer. The weights are configurable.

Because every row of M has norm 0.4 or 0.6, the softmax is nearly uniform and q is close to the (normalised) mean
of M; that is the official behaviour and is kept in both modes.

Cost: M Mᵀ is [B, n, n] float32; for the official sizes (728 image tokens, ~3000 text positions) that is about
58 MB per sample. It is computed once per step under `stop_gradient`.

Shapes: B batch, Ni image tokens, L text positions, d width (the LM width: both inputs live in the LM input space).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxalign.data.chat_templates import IGNORE_LABEL

QUERY_MODES = ("faithful", "default")
# What the default mode's keys and queries are made from: the frozen towers (image features + prompt text), or the
# hand-made silhouette of the image alone (`jaxalign.align.silhouette`: easy-vqa's drawn shapes).
KEY_ENCODERS = ("towers", "silhouette")
_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class QueryConfig:
    """How queries are built; hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      mode: 'faithful' (official pooling, no mask, text from `text_start` to the end) or 'default' (masked).
      image_weight: weight of the normalised image tokens (official: 0.4, the `alpha` of the scripts).
      text_weight: weight of the normalised text tokens (official: 0.6 = 1 - alpha).
      text_start: faithful mode: first text position of the query's text slice when the batch gives none
        (`retrieval_text_start` = 35 in the official Phi template; it depends on tokenizer and template).
      key_encoder: default mode: 'towers' (the weighted image and text halves above) or 'silhouette' (the
        image's hand-made silhouette and colour, `jaxalign.align.silhouette`; the weights are then unused).
    """

    mode: str = "default"
    image_weight: float = 0.4
    text_weight: float = 0.6
    text_start: int = 35
    key_encoder: str = "towers"

    def __post_init__(self):
        if self.mode not in QUERY_MODES:
            raise ValueError(f"QueryConfig.mode={self.mode!r}; expected one of {QUERY_MODES}")
        if self.image_weight < 0 or self.text_weight < 0 or self.image_weight + self.text_weight <= 0:
            raise ValueError(f"QueryConfig weights must be >= 0 and not both 0, got image_weight="
                             f"{self.image_weight}, text_weight={self.text_weight}")
        if self.text_start < 0:
            raise ValueError(f"QueryConfig.text_start={self.text_start} must be >= 0")
        if self.key_encoder not in KEY_ENCODERS:
            raise ValueError(f"QueryConfig.key_encoder={self.key_encoder!r}; expected one of {KEY_ENCODERS}")
        if self.key_encoder != "towers" and self.mode == "faithful":
            raise ValueError(f"key_encoder={self.key_encoder!r} is a default-mode key; faithful mode pools the "
                             "towers' tokens as the official code does (use key_encoder='towers')")


def unit_rows(x: jax.Array) -> jax.Array:
    """x / |x| over the last axis, in float32; all-zero rows stay zero (every key and query is normalised by it)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def pool_tokens(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The softmax-mean pooling of TinyAlign over the rows of `tokens` where `mask` is True.

    Args:
      tokens: [B, n, d] the (already normalised and weighted) matrix M per sample.
      mask: [B, n] bool. Masked rows take no part: they are left out of the softmax's columns and of the mean.
        With an all-True mask this is exactly `mean_rows(softmax(M Mᵀ)) · M`.
    Returns:
      [B, d] float32, not normalised. A sample with no unmasked row gives zeros.
    """
    tokens = tokens.astype(jnp.float32)
    mask = mask.astype(bool)
    logits = jnp.einsum("bid,bjd->bij", tokens, tokens, precision=jax.lax.Precision.HIGHEST)
    logits = jnp.where(mask[:, None, :], logits, -jnp.inf)
    # A fully masked row would be softmax over -inf only (NaN); give it a harmless finite row, then drop it.
    logits = jnp.where(mask[:, :, None], logits, 0.0)
    attention = jax.nn.softmax(logits, axis=-1)
    row_weights = mask.astype(jnp.float32) / jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)
    column_weights = jnp.einsum("bi,bij->bj", row_weights, attention, precision=jax.lax.Precision.HIGHEST)
    column_weights = jnp.where(mask, column_weights, 0.0)
    return jnp.einsum("bj,bjd->bd", column_weights, tokens, precision=jax.lax.Precision.HIGHEST)


def masked_query(image_tokens: jax.Array, text_embeddings: jax.Array, text_mask: jax.Array,
                 image_mask: jax.Array | None = None, image_weight: float = 0.4, text_weight: float = 0.6
                 ) -> jax.Array:
    """Default-mode query: pooling over image tokens and the prompt text tokens selected by `text_mask`.

    Args:
      image_tokens: [B, Ni, d] connector outputs of the sample's image.
      text_embeddings: [B, L, d] LM input embeddings of the sample's text (sentinel ids replaced before embedding).
      text_mask: [B, L] bool, True for prompt text tokens only: no padding, no answer tokens, no markers
        (for example from `prompt_text_mask`).
      image_mask: optional [B, Ni] bool; False for samples without an image (their image tokens are ignored).
      image_weight, text_weight: weights of the normalised image and text tokens.
    Returns:
      [B, d] float32 unit vectors (zeros for a sample with no token at all), under `stop_gradient`.
    """
    _check_shapes(image_tokens, text_embeddings)
    if text_mask.shape != text_embeddings.shape[:2]:
        raise ValueError(f"text_mask shape {text_mask.shape} does not match text_embeddings "
                         f"{text_embeddings.shape[:2]}")
    batch, num_image = image_tokens.shape[:2]
    if image_mask is None:
        image_mask = jnp.ones((batch, num_image), bool)
    elif image_mask.shape != (batch, num_image):
        raise ValueError(f"image_mask shape {image_mask.shape} does not match image_tokens {(batch, num_image)}")
    stacked = jnp.concatenate([image_weight * unit_rows(image_tokens),
                               text_weight * unit_rows(text_embeddings)], axis=1)
    mask = jnp.concatenate([image_mask.astype(bool), text_mask.astype(bool)], axis=1)
    return jax.lax.stop_gradient(unit_rows(pool_tokens(stacked, mask)))


def faithful_query(image_tokens: jax.Array, text_embeddings: jax.Array, text_start: int | jax.Array = 35,
                   image_weight: float = 0.4, text_weight: float = 0.6,
                   text_end: int | jax.Array | None = None) -> jax.Array:
    """Faithful-mode query, as the official code computes it.

    The text slice runs from `text_start` to the end of the padded sequence: padding and answer tokens are
    included, on purpose (that is what the official code does). Every image token is included. The official
    batches are padded to their longest sample; a batch padded further (to a length bucket) passes `text_end`,
    the batch's longest sample, so that the padding the official code never sees stays out of the query.

    Args:
      image_tokens: [B, Ni, d] connector outputs.
      text_embeddings: [B, L, d] LM input embeddings of the padded text.
      text_start: the first text position of the slice: an int (the official constant, 35 for the Phi
        template) or an int array [B] (for example `text_start` from `jaxalign.data.chat_templates`).
    Returns:
      [B, d] float32 unit vectors, under `stop_gradient`.
    """
    _check_shapes(image_tokens, text_embeddings)
    batch, length = text_embeddings.shape[:2]
    start = jnp.broadcast_to(jnp.asarray(text_start, jnp.int32).reshape(-1, 1), (batch, 1))
    # The mask only cuts off the prefix before text_start (and what lies past text_end); with a scalar start and
    # a batch padded to its longest sample it is exactly the official slice.
    text_mask = jnp.arange(length)[None, :] >= start
    if text_end is not None:
        text_mask = text_mask & (jnp.arange(length)[None, :] < jnp.asarray(text_end, jnp.int32))
    return masked_query(image_tokens, text_embeddings, text_mask, None, image_weight, text_weight)


def build_query(cfg: QueryConfig, image_tokens: jax.Array, text_embeddings: jax.Array, *,
                text_mask: jax.Array | None = None, image_mask: jax.Array | None = None,
                text_start: int | jax.Array | None = None) -> jax.Array:
    """The query of `cfg.mode`: `faithful_query` or `masked_query`.

    Args:
      cfg: mode and weights.
      image_tokens: [B, Ni, d].
      text_embeddings: [B, L, d].
      text_mask: default mode (required): [B, L] prompt-text mask.
      image_mask: default mode: optional [B, Ni] mask (samples without an image).
      text_start: faithful mode: int or [B] ints; `cfg.text_start` when None.
    Returns:
      [B, d] float32 unit query vectors, under `stop_gradient`.
    """
    if cfg.mode == "faithful":
        start = cfg.text_start if text_start is None else text_start
        return faithful_query(image_tokens, text_embeddings, start, cfg.image_weight, cfg.text_weight)
    if text_mask is None:
        raise ValueError("the default query mode needs text_mask [batch, length]: True for prompt text tokens "
                         "(no padding, no answer); build it with prompt_text_mask(...)")
    return masked_query(image_tokens, text_embeddings, text_mask, image_mask, cfg.image_weight, cfg.text_weight)


def prompt_text_mask(attention_mask: jax.Array, labels: jax.Array, input_ids: jax.Array | None = None,
                     ignore_label: int = IGNORE_LABEL, text_start: int | jax.Array | None = None) -> jax.Array:
    """True for the prompt text tokens a default-mode query should see.

    A token is kept when it is real (attention_mask), not supervised (labels == ignore_label: answer tokens carry
    labels), not a sentinel (input_ids >= 0: the image and retrieval markers have negative ids) and, when
    `text_start` is given, at or after it.

    Args:
      attention_mask: [B, L] 1 / True for real tokens.
      labels: [B, L] ignore_label for prompt tokens, the target id for answer tokens.
      input_ids: optional [B, L] ids with negative sentinels.
      ignore_label: the label of unsupervised tokens (`IGNORE_LABEL`, -100).
      text_start: optional int or [B] ints: first position to keep.
    Returns:
      [B, L] bool.
    """
    mask = attention_mask.astype(bool) & (labels == ignore_label)
    if input_ids is not None:
        mask = mask & (input_ids >= 0)
    if text_start is not None:
        start = jnp.broadcast_to(jnp.asarray(text_start, jnp.int32).reshape(-1, 1), (mask.shape[0], 1))
        mask = mask & (jnp.arange(mask.shape[1])[None, :] >= start)
    return mask


def _check_shapes(image_tokens: jax.Array, text_embeddings: jax.Array) -> None:
    if image_tokens.ndim != 3 or text_embeddings.ndim != 3:
        raise ValueError(f"query inputs must be [batch, tokens, width]; got image_tokens {image_tokens.shape} and "
                         f"text_embeddings {text_embeddings.shape}")
    if image_tokens.shape[0] != text_embeddings.shape[0] or image_tokens.shape[2] != text_embeddings.shape[2]:
        raise ValueError(f"image_tokens {image_tokens.shape} and text_embeddings {text_embeddings.shape} must share "
                         "batch and width (map image features to the LM width with the connector first)")
