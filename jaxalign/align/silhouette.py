"""A hand-made image key that sees the drawn shape: its silhouette cropped to its bounding box, and its colour.

Why it exists: a memory bank can only carry what its key separates. The demo's frozen tiny ViT separates the 8
easy-vqa colours almost perfectly but the 3 shapes barely better than chance, so a bank keyed by it hands the LM
neighbours whose captions name the query's shape about half the time (`bench/RESULTS.md`). TINYALIGN.md's memory
may be keyed by any encoder; this one is the "second encoder that sees what the frozen tower misses" of issue 11:
deterministic, parameter-free, and pure `jax.numpy`, so it runs inside the jitted training step on the batch's
pixels exactly as it runs when the bank is built (queries and keys come from the same function).

The feature, per image (pixels in [0, 1]):
  1. background = per-channel median of the border pixels (easy-vqa draws one saturated shape on a pale
     background, so the border is background);
  2. mask = pixels whose largest channel difference from the background exceeds `threshold`;
  3. outline = the mask inside its bounding box, box-resampled to size x size (each output cell is the mean of the
     input pixels it covers, weighted by the covered area: an exact area average, where PIL's BOX filter counts
     an input pixel wholly or not at all, by where its centre falls), so the shape's place and scale in the image do not count;
  4. colour = the mean pixel under the mask.
  key = concat(outline.ravel() / size, colour), [size * size + 3]. Divided by size the outline's norm is at most 1,
  about the colour's, so both count in a cosine. An image with nothing drawn gets a zero key.

It is a feature of easy-vqa's synthetic pictures, not of photographs: on real images (LLaVA data) use the towers.

Public API:
  silhouette_features(pixels [B, H, W, C] in [0, 1], size=8, threshold=0.2) -> [B, size * size + C] float32
  feature_dim(size=8, channels=3) -> int
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_SIZE = 8
DEFAULT_THRESHOLD = 0.2


def feature_dim(size: int = DEFAULT_SIZE, channels: int = 3) -> int:
    return size * size + channels


def _box_weights(first: jax.Array, last: jax.Array, length: int, size: int) -> jax.Array:
    """[B, size, length]: weight of input pixel r in output cell i when pixels first..last (inclusive, [B]) are
    box-resampled to `size` cells; each row sums to 1 (0 where the span is empty)."""
    span = (last - first + 1).astype(jnp.float32)[:, None, None]                       # [B, 1, 1]
    cell = jnp.arange(size, dtype=jnp.float32)[None, :, None]                           # [1, size, 1]
    lo = first[:, None, None] + cell * span / size                                      # cell i covers [lo, hi)
    hi = first[:, None, None] + (cell + 1) * span / size
    pixel = jnp.arange(length, dtype=jnp.float32)[None, None, :]                        # pixel r covers [r, r + 1)
    overlap = jnp.clip(jnp.minimum(pixel + 1, hi) - jnp.maximum(pixel, lo), 0.0, None)  # [B, size, length]
    return overlap / jnp.maximum(overlap.sum(-1, keepdims=True), 1e-12)


def _first_last(present: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and last index where `present` [B, n] is true (0 and n - 1 for an all-false row)."""
    n = present.shape[1]
    first = jnp.argmax(present, axis=1)
    last = n - 1 - jnp.argmax(present[:, ::-1], axis=1)
    return first, last


def silhouette_features(pixels: jax.Array, size: int = DEFAULT_SIZE,
                        threshold: float = DEFAULT_THRESHOLD) -> jax.Array:
    """The silhouette key of each image (see the module docstring).

    Args:
      pixels: [B, H, W, C] float in [0, 1] (undo the tower's normalisation first).
      size: side of the resampled outline.
      threshold: largest per-channel distance from the background that still counts as background.
    Returns:
      [B, size * size + C] float32, not normalised (the bank's cosine metric normalises).
    """
    pixels = jnp.asarray(pixels, jnp.float32)
    if pixels.ndim != 4:
        raise ValueError(f"pixels have shape {tuple(pixels.shape)}; expected [batch, height, width, channels]")
    batch, height, width, channels = pixels.shape
    border = jnp.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    background = jnp.median(border, axis=1)                                             # [B, C]
    mask = (jnp.abs(pixels - background[:, None, None, :]).max(-1) > threshold)         # [B, H, W]
    drawn = mask.any(axis=(1, 2))                                                       # [B]
    top, bottom = _first_last(mask.any(axis=2))
    left, right = _first_last(mask.any(axis=1))
    rows = _box_weights(top, bottom, height, size)                                      # [B, size, H]
    cols = _box_weights(left, right, width, size)                                       # [B, size, W]
    outline = jnp.einsum("bih,bhw,bjw->bij", rows, mask.astype(jnp.float32), cols)      # [B, size, size]
    weights = mask.astype(jnp.float32)[..., None]
    colour = (pixels * weights).sum((1, 2)) / jnp.maximum(weights.sum((1, 2)), 1.0)     # [B, C]
    features = jnp.concatenate([outline.reshape(batch, size * size) / size, colour], axis=-1)
    return jax.lax.stop_gradient(jnp.where(drawn[:, None], features, 0.0))
