"""Splicing image and retrieved tokens into the language model's input sequence, with static shapes.

The text of a sample holds an image sentinel (the `<image>` marker, id `IMAGE_TOKEN_ID` = -200) and optionally a
retrieval sentinel (`<rag>`, id -300). The LM input is

    [prefix text][image tokens][retrieved tokens][rest of text][padding]

where each sentinel is replaced by the tokens it stands for, and the result is cut to `max_length` after the
insertion (as in the official TinyLLaVA / TinyAlign code). Image and retrieved positions carry no loss.

Everything is computed with per-row gather indices (no Python loop over the batch, jit-able): every source element
(text position, image token, retrieved token) gets an integer sort key that encodes where it goes; a stable
argsort of the keys gives, for each output slot, the source element to gather. Elements that do not go anywhere
(sentinels, padding, masked retrieved tokens, tokens of a row without an anchor) get the largest key and sort past
the content, where the output is padding.

Placement rules:
- Image tokens replace the image sentinel at `image_index[b]`; `image_index[b] = -1` means the row has no image
  (no image tokens are inserted; the row is just shorter and padded at the end).
- Retrieved tokens replace the retrieval sentinel at `retrieval_index[b]` when retrieval indices are given and
  the row has one (>= 0); otherwise they go right after the image tokens. A row with neither an image nor a
  retrieval sentinel gets no retrieved tokens. Masked retrieved tokens (`retrieved_mask` False, for example the
  padding of token-id values) are left out and the following tokens move up.
- Retrieval sentinels are removed even when no retrieved tokens are given (the 'off' control then yields the
  plain TinyLLaVA sequence from a template that has `<rag>`).
- The output is always padded on one side (`padding_side`), whatever the input padding was. Padding slots have
  zero embeddings, attention mask 0, label `ignore_label`, position 0 and token kind -1.

Shapes: B batch, L text positions, Ni image tokens, Nr retrieved tokens, d width, L_out output length.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.data.chat_templates import IGNORE_LABEL

TEXT, IMAGE, RETRIEVED, PAD = 0, 1, 2, -1  # values of `SplicedInputs.token_kind`
_DROP = jnp.iinfo(jnp.int32).max


class SplicedInputs(NamedTuple):
    """The LM inputs after splicing (a pytree: can be returned from jitted functions).

    Attributes:
      inputs_embeds: [B, L_out, d] in the dtype of the text embeddings.
      attention_mask: [B, L_out] int32, 1 on real tokens (text, image, retrieved) and 0 on padding.
      labels: [B, L_out] int32: the text labels moved with their tokens; ignore_label at image, retrieved and
        padding positions. Not shifted (the loss shifts them).
      positions: [B, L_out] int32, 0, 1, 2, ... over the real tokens, 0 on padding.
      token_kind: [B, L_out] int32: TEXT (0), IMAGE (1), RETRIEVED (2) or PAD (-1).
    """

    inputs_embeds: jax.Array
    attention_mask: jax.Array
    labels: jax.Array
    positions: jax.Array
    token_kind: jax.Array


def spliced_length(text_length: int, num_image_tokens: int, num_retrieved_tokens: int,
                   has_retrieval_sentinel: bool, max_length: int | None = None) -> int:
    """The static output length L_out = min(L - sentinels + Ni + Nr, max_length).

    A row without an image keeps its text, so L_out is never below the longest possible text of such a row
    (L, minus the retrieval sentinel when there is one).
    """
    sentinels = 1 + int(has_retrieval_sentinel)
    length = max(text_length - sentinels + num_image_tokens + num_retrieved_tokens,
                 text_length - int(has_retrieval_sentinel))
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        length = min(length, max_length)
    return length


def sentinel_index(ids: jax.Array, sentinel_id: int) -> jax.Array:
    """[B] position of the first `sentinel_id` in each row of ids [B, L], or -1 where the row has none."""
    found = ids == sentinel_id
    return jnp.where(found.any(-1), jnp.argmax(found, axis=-1), -1).astype(jnp.int32)


def replace_sentinels(ids: jax.Array, replacement_id: int) -> jax.Array:
    """ids with every negative id (the sentinels) replaced by `replacement_id`, so that they can be embedded.

    The embeddings at sentinel positions never reach the LM (the splice drops them); any valid id will do.
    """
    return jnp.where(ids < 0, replacement_id, ids)


def splice_inputs(text_embeddings: jax.Array, attention_mask: jax.Array, labels: jax.Array, image_index: jax.Array,
                  image_tokens: jax.Array, retrieved_tokens: jax.Array | None = None,
                  retrieved_mask: jax.Array | None = None, retrieval_index: jax.Array | None = None,
                  max_length: int | None = None, padding_side: str = "right", ignore_label: int = IGNORE_LABEL
                  ) -> SplicedInputs:
    """Builds `[prefix][image tokens][retrieved tokens][rest][padding]` for every row (see the module docstring).

    Args:
      text_embeddings: [B, L, d] LM embeddings of the text ids (sentinels replaced before embedding, see
        `replace_sentinels`).
      attention_mask: [B, L] 1 / True for real text tokens (padding may be on either side).
      labels: [B, L] int labels of the text (ignore_label where unsupervised).
      image_index: [B] int position of the image sentinel, -1 for a row without an image.
      image_tokens: [B, Ni, d] connector outputs.
      retrieved_tokens: optional [B, Nr, d] retrieval-connector outputs, in rank order. None: no retrieval.
      retrieved_mask: optional [B, Nr] bool, False for retrieved tokens to leave out.
      retrieval_index: optional [B] int position of the retrieval sentinel (-1 for none). None when the template
        has no retrieval sentinel (retrieved tokens then follow the image tokens).
      max_length: optional static cap on the output length (truncation after insertion).
      padding_side: 'right' (training) or 'left' (batched generation).
      ignore_label: label of image, retrieved and padding positions.
    Returns:
      `SplicedInputs` with L_out = `spliced_length(L, Ni, Nr, retrieval_index is not None, max_length)`.
    """
    batch, length, width = text_embeddings.shape
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}; expected 'right' or 'left'")
    if image_tokens.ndim != 3 or image_tokens.shape[0] != batch or image_tokens.shape[2] != width:
        raise ValueError(f"image_tokens must be [{batch}, tokens, {width}] like the text embeddings, got "
                         f"{image_tokens.shape}")
    for name, array in (("attention_mask", attention_mask), ("labels", labels)):
        if array.shape != (batch, length):
            raise ValueError(f"{name} must be [{batch}, {length}] like the text embeddings, got {array.shape}")
    num_image = image_tokens.shape[1]
    if retrieved_tokens is None:
        retrieved_tokens = jnp.zeros((batch, 0, width), text_embeddings.dtype)
        retrieved_mask = None
    elif retrieved_tokens.ndim != 3 or retrieved_tokens.shape[0] != batch or retrieved_tokens.shape[2] != width:
        raise ValueError(f"retrieved_tokens must be [{batch}, tokens, {width}], got {retrieved_tokens.shape} "
                         "(map memory values to the LM width with the retrieval connector first)")
    num_retrieved = retrieved_tokens.shape[1]
    if retrieved_mask is None:
        retrieved_mask = jnp.ones((batch, num_retrieved), bool)
    elif retrieved_mask.shape != (batch, num_retrieved):
        raise ValueError(f"retrieved_mask must be [{batch}, {num_retrieved}], got {retrieved_mask.shape}")
    out_length = spliced_length(length, num_image, num_retrieved, retrieval_index is not None, max_length)

    # ---- sort keys: each text position t owns the key range [t * slots, (t + 1) * slots); a sentinel's range
    # receives the tokens inserted in its place, in the order image tokens, then retrieved tokens.
    slots = num_image + num_retrieved + 1
    if length * slots >= _DROP:
        raise ValueError(f"sequence too long to splice: {length} positions x {slots} slots overflow int32 keys")
    image_index = jnp.asarray(image_index, jnp.int32).reshape(batch)
    has_image = image_index >= 0
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    is_sentinel = (positions == image_index[:, None]) & has_image[:, None]
    if retrieval_index is not None:
        retrieval_index = jnp.asarray(retrieval_index, jnp.int32).reshape(batch)
        has_retrieval_sentinel = retrieval_index >= 0
        is_sentinel = is_sentinel | ((positions == retrieval_index[:, None]) & has_retrieval_sentinel[:, None])
    else:
        has_retrieval_sentinel = jnp.zeros((batch,), bool)
        retrieval_index = jnp.full((batch,), -1, jnp.int32)
    text_keep = attention_mask.astype(bool) & ~is_sentinel
    text_keys = jnp.where(text_keep, positions * slots, _DROP)

    image_keys = image_index[:, None] * slots + 1 + jnp.arange(num_image, dtype=jnp.int32)[None, :]
    image_keys = jnp.where(has_image[:, None], image_keys, _DROP)

    # Retrieved tokens: at the retrieval sentinel, or after the image tokens when the row has no such sentinel.
    anchor_key = jnp.where(has_retrieval_sentinel, retrieval_index * slots + 1, image_index * slots + 1 + num_image)
    has_anchor = has_retrieval_sentinel | has_image
    retrieved_keys = anchor_key[:, None] + jnp.arange(num_retrieved, dtype=jnp.int32)[None, :]
    retrieved_keys = jnp.where(has_anchor[:, None] & retrieved_mask.astype(bool), retrieved_keys, _DROP)

    keys = jnp.concatenate([text_keys, image_keys, retrieved_keys], axis=1)  # [B, L + Ni + Nr]
    order = jnp.argsort(keys, axis=-1, stable=True)[:, :out_length]
    num_real = jnp.minimum((keys != _DROP).sum(-1), out_length).astype(jnp.int32)  # [B]
    slot = jnp.arange(out_length, dtype=jnp.int32)[None, :]
    if padding_side == "left":
        # Content moves to the end of the row: output slot j shows content slot j - (L_out - num_real).
        shift = (out_length - num_real)[:, None]
        real = slot >= shift
        order = jnp.take_along_axis(order, jnp.clip(slot - shift, 0, out_length - 1), axis=1)
    else:
        real = slot < num_real[:, None]

    # ---- gather every output from the concatenated sources with the same indices.
    dtype = text_embeddings.dtype
    sources = jnp.concatenate([text_embeddings, image_tokens.astype(dtype), retrieved_tokens.astype(dtype)], axis=1)
    inputs_embeds = jnp.take_along_axis(sources, order[:, :, None], axis=1)
    inputs_embeds = jnp.where(real[:, :, None], inputs_embeds, jnp.zeros((), dtype))
    source_labels = jnp.concatenate([labels.astype(jnp.int32),
                                     jnp.full((batch, num_image + num_retrieved), ignore_label, jnp.int32)], axis=1)
    out_labels = jnp.where(real, jnp.take_along_axis(source_labels, order, axis=1), ignore_label)
    source_kinds = jnp.concatenate([jnp.full((batch, length), TEXT, jnp.int32),
                                    jnp.full((batch, num_image), IMAGE, jnp.int32),
                                    jnp.full((batch, num_retrieved), RETRIEVED, jnp.int32)], axis=1)
    token_kind = jnp.where(real, jnp.take_along_axis(source_kinds, order, axis=1), PAD)
    out_positions = jnp.where(real, jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, 0)
    return SplicedInputs(inputs_embeds=inputs_embeds, attention_mask=real.astype(jnp.int32), labels=out_labels,
                         positions=out_positions, token_kind=token_kind)
