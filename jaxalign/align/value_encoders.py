"""Memory values: what a retrieved memory entry contributes to the language model's input.

Two builders, one per mode.

**Faithful** (`PerceiverValueConfig`, `init_perceiver_values`, `perceiver_values`): the official TinyAlign value
encoder, a randomly initialised and never trained Perceiver. The official code (`PerceiverMultiModalEncoder` in its
memory-bank script) assembles it from Hugging Face's Perceiver blocks inside a plain `torch.nn.Module`:
`PerceiverMultimodalPreprocessor(min_padding_size=4)` over `PerceiverImagePreprocessor(prep_type='conv1x1',
out_channels=256, position_encoding_type='trainable', project_pos_dim=256)` and `PerceiverTextPreprocessor`
(d_model 128, 512 positions), then `PerceiverEmbeddings` (32 x 96 latents) and `PerceiverEncoder` (qk and v
channels 96, 8 + 8 heads, 8 self-attention layers, widening factor 1, exact GELU). Here, the same computation:
(a) the image, each pixel mapped by the 1x1 convolution to 256 channels, concatenated with a learned 256-channel
position table passed through `positions_projection` (a 256 -> 256 dense layer); (b) the caption's byte ids
embedded to 128 channels plus learned positions. Each modality is padded to the common width (widest + 4 = 516)
with its learned padding vector, image tokens first (the modalities in sorted name order), and the latents read
them with one cross-attention (pre-LayerNorms on latents and inputs, query residual) and 8 self-attention layers,
each followed by a residual LayerNorm + MLP. Output: [N, 32, 96] float32, stored in the bank.

Initialisation: as the official module, which is not a `PreTrainedModel`, so Hugging Face's `_init_weights`
(normal, std 0.02) never runs and every tensor keeps its PyTorch constructor's draw: latents, position tables,
padding vectors and byte embeddings N(0, 1) (`torch.randn`, `nn.Embedding`); every dense and convolution kernel and
bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (`kaiming_uniform_(a=sqrt(5))` and the bias rule of `nn.Linear` /
`nn.Conv2d`); LayerNorms 1 / 0 (eps 1e-5). The draws come from `cfg.seed` (NumPy), so the values are reproducible;
they cannot be bit-identical to the PyTorch original, whose random stream differs (and which draws a 30522-row byte
table of which only the 262 Perceiver byte ids are ever read; here the table has those 262 rows).
`tests/test_perceiver_official_parity.py` copies these parameters into the official module and compares outputs.

This reproduces a **known defect** on purpose: the encoder is never trained, so the cross-attention over ~150K
inputs averages them into nearly the same summary for every entry and the output is dominated by the (shared)
latent array, so the values of different entries are nearly identical (mean pairwise cosine similarity above 0.9).
They carry almost no information about the entry; a model trained with them mostly gets "more tokens". Use it only
to compare with the official code.

**Default** (`caption_token_values`, `retrieved_tokens_from_ids`, `pooled_image_values`): values made with the
frozen encoders the model itself uses. The recommended value of an entry is the token ids of its caption (stage 1)
or answer (stage 2), padded to a fixed length; at search time the gathered ids are embedded with the LM's own
embedding table. Why this choice:
- shared space: the LM reads the neighbour's text in its own input space, so the retrieval connector starts from
  something the LM already understands (it can be near the identity) instead of learning a map from noise;
- informative: the caption / answer of a visually and textually similar sample is exactly the side information the
  method wants to provide, and it differs from entry to entry;
- not random, cheap and exact: ids are small to store ([N, Lv] int32), need no encoder pass at build time, and the
  embedding is always the current one (stage 2 fine-tunes the LM; stored embeddings would go stale).
  Leave-one-out at training time is essential with these values: a sample's own entry holds its answer.
`pooled_image_values` is the image-side alternative: frozen vision features averaged into a few tokens.

Shapes: N entries, H x W image pixels, C image channels, Lb caption bytes, Lv value tokens, k neighbours,
d LM width.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import layers
from jaxalign.models.layers import EMBED, HEAD_DIM, HEADS, MLP, ParamSpec

# Perceiver byte tokenizer (Hugging Face `PerceiverTokenizer`): 6 special ids, then byte b has id b + 6.
BYTE_PAD_ID, BYTE_CLS_ID, BYTE_SEP_ID, BYTE_OFFSET, BYTE_VOCAB = 0, 4, 5, 6, 262
VALUE_PAD_ID = -1  # padding of token-id values; negative so it can never be confused with a real token id
# The Perceiver's initialisation scheme (the official plain nn.Module: tables N(0, 1), linear and conv layers
# PyTorch's default); part of a faithful bank's fingerprint, so banks made with another scheme are rebuilt.
PERCEIVER_INIT = "torch-default-v1"


# =========================================================================== faithful: random Perceiver


@dataclasses.dataclass(frozen=True)
class PerceiverValueConfig:
    """The official random value encoder (defaults: the official sizes). Counts are configurable for tests.

    Attributes:
      num_latents, latent_dim: the 32 x 96 latent array, i.e. the shape of one value.
      num_cross_heads: heads of the single cross-attention (latents read the inputs).
      num_self_layers, num_self_heads: the self-attention layers over the latents.
      image_size: images are [image_size, image_size, image_channels] (384 in the official code).
      image_channels: input channels of the 1x1 convolution (3 for RGB).
      image_projection_channels: width of the 1x1 convolution's output (256).
      image_position_channels: width of the learned image position table and of its `positions_projection`
        (256 -> 256 in the official code), concatenated after the convolution's channels.
      text_channels: width of the byte embeddings and their position embeddings (128, `d_model`).
      max_text_bytes: caption length in byte ids, [CLS] and [SEP] included (512 learned positions).
      min_padding: extra padding channels added to the widest modality (4 in the official code; Hugging Face's
        default is 2).
      widening_factor: MLP hidden width of each layer as a multiple of latent_dim (Perceiver default 1, the
        official value for both the cross- and the self-attention layers).
      layer_norm_eps: epsilon of the LayerNorms (`nn.LayerNorm`'s default; the Perceiver blocks ignore
        `PerceiverConfig.layer_norm_eps`).
      seed: the random seed the parameters are drawn from.

    The attention's query / key and value widths equal latent_dim (the official `qk_channels = v_channels = 96`).
    """

    num_latents: int = 32
    latent_dim: int = 96
    num_cross_heads: int = 8
    num_self_layers: int = 8
    num_self_heads: int = 8
    image_size: int = 384
    image_channels: int = 3
    image_projection_channels: int = 256
    image_position_channels: int = 256
    text_channels: int = 128
    max_text_bytes: int = 512
    min_padding: int = 4
    widening_factor: int = 1
    layer_norm_eps: float = 1e-5
    seed: int = 0

    def __post_init__(self):
        for heads in (self.num_cross_heads, self.num_self_heads):
            if self.latent_dim % heads:
                raise ValueError(f"PerceiverValueConfig.latent_dim={self.latent_dim} is not a multiple of {heads} "
                                 "heads")
        if self.num_self_layers < 1:
            raise ValueError("PerceiverValueConfig.num_self_layers must be >= 1")

    @property
    def input_width(self) -> int:
        """The common width both modalities are padded to."""
        image = self.image_projection_channels + self.image_position_channels
        return max(image, self.text_channels) + self.min_padding


def _torch_default(shape: tuple[int, ...], axes: tuple[str | None, ...], fan_in: int) -> ParamSpec:
    """A kernel or bias as PyTorch's `nn.Linear` / `nn.Conv2d` draw it: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the
    kernel's `kaiming_uniform_(a=sqrt(5))` has exactly that bound)."""
    return ParamSpec(shape, axes, "uniform", 1.0 / np.sqrt(fan_in))


def _unit_normal(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> ParamSpec:
    """A table as `torch.randn` / `nn.Embedding` draw it: N(0, 1)."""
    return ParamSpec(shape, axes, "normal", 1.0)


def _dense_specs(in_dim: int, out_dim: int, in_axis: str | None, out_axis: str | None) -> dict:
    return {"kernel": _torch_default((in_dim, out_dim), (in_axis, out_axis), in_dim),
            "bias": _torch_default((out_dim,), (out_axis,), in_dim)}


def _perceiver_layer_specs(query_dim: int, key_dim: int | None, num_heads: int, widening: int) -> dict:
    """One `PerceiverLayer`: LayerNorms, attention (q/k/v width = query_dim), output projection, MLP.

    key_dim None makes a self-attention layer (keys and values are the normed latents, no second LayerNorm).
    """
    cross = key_dim is not None
    key_dim = key_dim if cross else query_dim
    head_dim = query_dim // num_heads

    def projection(in_dim: int) -> dict:
        return {"kernel": _torch_default((in_dim, num_heads, head_dim), (EMBED, HEADS, HEAD_DIM), in_dim),
                "bias": _torch_default((num_heads, head_dim), (HEADS, HEAD_DIM), in_dim)}

    specs = {"query_norm": layers.norm_spec(query_dim), "query": projection(query_dim),
             "key": projection(key_dim), "value": projection(key_dim),
             "out": {"kernel": _torch_default((num_heads, head_dim, query_dim), (HEADS, HEAD_DIM, EMBED), query_dim),
                     "bias": _torch_default((query_dim,), (EMBED,), query_dim)},
             "mlp_norm": layers.norm_spec(query_dim),
             "mlp_in": _dense_specs(query_dim, widening * query_dim, EMBED, MLP),
             "mlp_out": _dense_specs(widening * query_dim, query_dim, MLP, EMBED)}
    if cross:
        specs["key_norm"] = layers.norm_spec(key_dim)
    return specs


def perceiver_value_specs(cfg: PerceiverValueConfig) -> dict:
    """`ParamSpec`s of the random value encoder, with the official module's initialisation (module docstring):
    tables N(0, 1), kernels and biases U(+-1/sqrt(fan_in)), LayerNorms 1 / 0."""
    width = cfg.input_width
    num_pixels = cfg.image_size * cfg.image_size
    image_width = cfg.image_projection_channels + cfg.image_position_channels
    positions = cfg.image_position_channels
    return {
        # The 1x1 convolution: fan_in = input channels x 1 x 1.
        "image_projection": _dense_specs(cfg.image_channels, cfg.image_projection_channels, None, EMBED),
        "image_positions": _unit_normal((num_pixels, positions), (None, EMBED)),
        "image_position_projection": _dense_specs(positions, positions, None, EMBED),
        "image_padding": _unit_normal((width - image_width,), (EMBED,)),
        "byte_embedding": _unit_normal((BYTE_VOCAB, cfg.text_channels), (None, EMBED)),
        "byte_positions": _unit_normal((cfg.max_text_bytes, cfg.text_channels), (None, EMBED)),
        "text_padding": _unit_normal((width - cfg.text_channels,), (EMBED,)),
        "latents": _unit_normal((cfg.num_latents, cfg.latent_dim), (None, EMBED)),
        "cross": _perceiver_layer_specs(cfg.latent_dim, width, cfg.num_cross_heads, cfg.widening_factor),
        "self": layers.stack_specs(
            _perceiver_layer_specs(cfg.latent_dim, None, cfg.num_self_heads, cfg.widening_factor),
            cfg.num_self_layers),
    }


def init_perceiver_values(cfg: PerceiverValueConfig) -> dict:
    """The encoder's parameters, drawn from `cfg.seed` (same seed, same parameters, on any backend).

    Tables N(0, 1), kernels and biases uniform in +-1/sqrt(fan_in), LayerNorms scale 1 and bias 0: the
    distributions the official (PyTorch) module is drawn from.
    """
    # Drawn with NumPy: identical on every backend and host, fast for the official 37M-parameter position table,
    # and free of the per-shape random-kernel compilations of `layers.init_params` (this encoder is never trained).
    rng = np.random.default_rng(cfg.seed)

    def draw(spec: ParamSpec) -> jax.Array:
        if spec.init == "normal":
            return jnp.asarray(rng.standard_normal(spec.shape, np.float32) * np.float32(spec.scale))
        if spec.init == "uniform":
            return jnp.asarray(rng.uniform(-spec.scale, spec.scale, spec.shape).astype(np.float32))
        if spec.init in ("ones", "zeros"):
            return jnp.full(spec.shape, 1.0 if spec.init == "ones" else 0.0, jnp.float32)
        raise ValueError(f"unexpected initialiser {spec.init!r} in the value encoder's specs")

    return jax.tree.map(draw, perceiver_value_specs(cfg), is_leaf=layers.is_spec)


def caption_bytes(captions: Sequence[str], max_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Captions as Perceiver byte ids: [CLS] utf-8 bytes + 6 [SEP], cut to `max_length`, padded with 0.

    Returns:
      ids [N, max_length] int32 and mask [N, max_length] bool (True on real ids).
    """
    if max_length < 2:
        raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
    ids = np.full((len(captions), max_length), BYTE_PAD_ID, np.int32)
    for row, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {row} is {type(caption).__name__}, expected str")
        encoded = np.frombuffer(caption.encode("utf-8"), np.uint8)[: max_length - 2].astype(np.int32) + BYTE_OFFSET
        ids[row, : len(encoded) + 2] = np.concatenate([[BYTE_CLS_ID], encoded, [BYTE_SEP_ID]])
    return ids, ids != BYTE_PAD_ID


def _perceiver_layer(params: dict, cfg: PerceiverValueConfig, latents: jax.Array, inputs: jax.Array | None,
                     mask: jax.Array | None) -> jax.Array:
    """Perceiver IO's pre-norm layer: latents [N, Q, w] attend to inputs [N, S, c] (mask [N, 1, 1, S]), or to
    themselves when inputs is None; attention and MLP are both residual."""
    normed_latents = layers.layer_norm(params["query_norm"], latents, cfg.layer_norm_eps)
    normed_inputs = (normed_latents if inputs is None
                     else layers.layer_norm(params["key_norm"], inputs, cfg.layer_norm_eps))

    def project(p: dict, x: jax.Array) -> jax.Array:
        return jnp.einsum("bte,ehd->bthd", x, p["kernel"]) + p["bias"]

    attended = layers.attention(project(params["query"], normed_latents), project(params["key"], normed_inputs),
                                project(params["value"], normed_inputs), mask)
    out = jnp.einsum("bthd,hde->bte", attended, params["out"]["kernel"]) + params["out"]["bias"]
    latents = latents + out
    hidden = layers.layer_norm(params["mlp_norm"], latents, cfg.layer_norm_eps)
    hidden = layers.dense(params["mlp_out"], layers.gelu_exact(layers.dense(params["mlp_in"], hidden)))
    return latents + hidden


def perceiver_values(params: dict, cfg: PerceiverValueConfig, images: jax.Array, byte_ids: jax.Array,
                     byte_mask: jax.Array) -> jax.Array:
    """Faithful memory values of N entries (jit-able; call it on batches of entries).

    Faithful to the official code's known defect: the values of different entries are nearly identical (mean
    pairwise cosine similarity > 0.9), see the module docstring.

    Args:
      params: from `init_perceiver_values(cfg)`.
      cfg: the encoder config.
      images: [N, image_size, image_size, image_channels] pixel values (any fixed normalisation).
      byte_ids, byte_mask: [N, max_text_bytes] from `caption_bytes`. The cross-attention ignores the padding
        bytes, which gives what the official code computes for one unpadded caption at a time (it encodes
        entries one by one, with no mask).
    Returns:
      [N, num_latents, latent_dim] float32.
    """
    count = images.shape[0]
    expected = (count, cfg.image_size, cfg.image_size, cfg.image_channels)
    if images.shape != expected:
        raise ValueError(f"perceiver_values: images must be {expected}, got {images.shape}")
    if byte_ids.shape != (count, cfg.max_text_bytes) or byte_mask.shape != byte_ids.shape:
        raise ValueError(f"perceiver_values: byte_ids and byte_mask must be {(count, cfg.max_text_bytes)}, got "
                         f"{byte_ids.shape} and {byte_mask.shape}")
    width = cfg.input_width
    pixels = images.astype(jnp.float32).reshape(count, -1, cfg.image_channels)
    num_pixels = pixels.shape[1]
    image_width = cfg.image_projection_channels + cfg.image_position_channels
    # `positions_projection` of the image preprocessor (project_pos_dim 256): a dense layer on the position table,
    # applied once per call, before the table is shared by the batch's images.
    positions = layers.dense(params["image_position_projection"], params["image_positions"])
    image = jnp.concatenate([
        layers.dense(params["image_projection"], pixels),
        jnp.broadcast_to(positions[None], (count, num_pixels, cfg.image_position_channels)),
        jnp.broadcast_to(params["image_padding"], (count, num_pixels, width - image_width))], axis=-1)
    text = jnp.take(params["byte_embedding"], byte_ids, axis=0) + params["byte_positions"][None]
    text = jnp.concatenate([text, jnp.broadcast_to(params["text_padding"],
                                                   (count, cfg.max_text_bytes, width - cfg.text_channels))], axis=-1)
    inputs = jnp.concatenate([image, text], axis=1)
    mask = jnp.concatenate([jnp.ones((count, num_pixels), bool), byte_mask.astype(bool)], axis=1)
    latents = jnp.broadcast_to(params["latents"][None], (count, cfg.num_latents, cfg.latent_dim))
    latents = _perceiver_layer(params["cross"], cfg, latents, inputs, mask[:, None, None, :])

    def body(carry: jax.Array, layer_params: dict) -> tuple[jax.Array, None]:
        return _perceiver_layer(layer_params, cfg, carry, None, None), None

    latents, _ = jax.lax.scan(body, latents, params["self"])
    return latents.astype(jnp.float32)


# =========================================================================== default: frozen-encoder values


def caption_token_values(tokenized: Sequence[Sequence[int]], max_len: int, pad_id: int = VALUE_PAD_ID
                         ) -> np.ndarray:
    """Token-id values of N entries: each caption / answer cut to `max_len` ids and padded with `pad_id`.

    Args:
      tokenized: N token-id lists (the tokenizer's ids of each entry's caption or answer, no sentinels).
      max_len: Lv, the value length (longer texts are cut at the end).
      pad_id: padding id; keep the default -1 so padding can never be mistaken for a real token.
    Returns:
      [N, max_len] int32.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    values = np.full((len(tokenized), max_len), pad_id, np.int32)
    for row, ids in enumerate(tokenized):
        ids = np.asarray(ids, np.int64)[:max_len]
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError(f"entry {row}: token ids must be in [0, 2**31), got min {ids.min()}, max {ids.max()}")
        if ids.size and pad_id >= 0 and (ids == pad_id).any():
            raise ValueError(f"entry {row} contains pad_id={pad_id} as a real token; use the default pad_id=-1")
        values[row, : ids.size] = ids
    return values


def retrieved_tokens_from_ids(lm_embed_fn: Callable[[jax.Array], jax.Array], ids: jax.Array,
                              pad_id: int = VALUE_PAD_ID) -> tuple[jax.Array, jax.Array]:
    """Embeds gathered token-id values with the LM's own embedding table, flattened in rank order.

    Args:
      lm_embed_fn: ids [B, T] -> embeddings [B, T, d], for example
        `functools.partial(decoder.embed, lm_params, lm_cfg)`.
      ids: [B, k, Lv] gathered values (neighbour 0 first), padded with `pad_id`.
      pad_id: the padding id of the values.
    Returns:
      tokens [B, k * Lv, d] (zeros at padding) and mask [B, k * Lv] bool (True on real tokens); pass them to
      the retrieval connector and to `splice_inputs(retrieved_tokens=..., retrieved_mask=...)`.
    """
    if ids.ndim != 3:
        raise ValueError(f"ids must be [batch, k, value_length], got shape {ids.shape}")
    batch, k, value_length = ids.shape
    flat = ids.reshape(batch, k * value_length)
    mask = flat != pad_id
    tokens = lm_embed_fn(jnp.where(mask, flat, 0))
    return jnp.where(mask[:, :, None], tokens, jnp.zeros((), tokens.dtype)), mask


def pooled_image_values(features: jax.Array, num_tokens: int) -> jax.Array:
    """Image-side values: frozen vision features [N, T, w] averaged over contiguous groups into [N, P, w].

    T must be a multiple of P = num_tokens (for example 729 SigLIP patches and P = 27 row-means).
    """
    count, num_features, width = features.shape
    if num_tokens < 1 or num_features % num_tokens:
        raise ValueError(f"pooled_image_values: {num_features} feature tokens cannot be split into {num_tokens} "
                         "equal groups; choose num_tokens dividing the token count")
    grouped = features.astype(jnp.float32).reshape(count, num_tokens, num_features // num_tokens, width)
    return grouped.mean(axis=2)


def flatten_retrieved(values: jax.Array) -> jax.Array:
    """Gathered values [B, k, P, w] as [B, k * P, w] in rank order (neighbour 0's tokens first), as the
    official code flattens its [B, k, 32, 96] values."""
    if values.ndim != 4:
        raise ValueError(f"values must be [batch, k, tokens, width], got shape {values.shape}")
    batch, k, tokens, width = values.shape
    return values.reshape(batch, k * tokens, width)
