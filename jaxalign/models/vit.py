"""Vision transformer towers (SigLIP and CLIP variants) as pure functions of `(params, pixels)`.

Both variants share one pre-norm transformer encoder; they differ only around it:

- SigLIP: no class token, patch projection with a bias, learned position embeddings, a final `post_layernorm`
  over every token, and an optional multihead attention-pooling head (MAP: a learned probe attends over the
  tokens, then layernorm + MLP with a residual).
- CLIP: a learned class token in front of the patches, patch projection without bias, a layernorm before the
  encoder (`pre_layrnorm` in Hugging Face), quick_gelu MLPs, and `post_layernorm` applied to the class token only
  (the pooled output), optionally followed by the visual projection of CLIPModel.

The patch "convolution" (kernel = stride = patch size) is a dense layer over flattened patches, which is the same
computation and shards like any other dense layer. When patch_size does not divide image_size (SigLIP so400m's
384 / 14), the grid is image_size // patch_size patches a side and the right and bottom remainder pixels are never
seen, exactly as Hugging Face's strided conv drops them. Layers are stored stacked and run with `jax.lax.scan`.

Shapes: B batch, N = (image_size // patch_size) ** 2 patches, T tokens (N for SigLIP, N + 1 for CLIP with the class
token first), E hidden size, H heads, D = E // H head width.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxalign.models import attention as attention_kernels
from jaxalign.models import layers
from jaxalign.models.layers import EMBED, HEAD_DIM, HEADS, MLP, ParamSpec

VARIANTS = ("siglip", "clip")
DTYPES = ("float32", "bfloat16")

# Normalisation constants of the reference image processors.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape and behaviour of a vision tower; hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      image_size: input height and width in pixels (square images).
      patch_size: side of a square patch, 1 .. image_size. It need not divide image_size: the patch grid is
        image_size // patch_size a side (27 for 384 / 14) and the remaining right and bottom pixels are dropped.
      num_channels: input channels (3 for RGB).
      hidden_size: token width E.
      intermediate_size: MLP hidden width.
      num_layers: encoder layers.
      num_heads: attention heads H; hidden_size must be a multiple of it.
      layer_norm_eps: epsilon of every LayerNorm.
      hidden_act: MLP activation, named as in Hugging Face configs ('gelu_pytorch_tanh', 'quick_gelu', ...).
      variant: 'siglip' or 'clip' (see the module docstring).
      use_head: SigLIP only: whether the attention-pooling head exists (its output is `VisionOutput.pooled`).
      projection_dim: CLIP only: width of the visual projection applied to the pooled class token, or None.
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters may be stored in float32 and are cast at use.
      attention: attention kernel of the encoder layers, one of `jaxalign.models.attention.IMPLEMENTATIONS`:
        'auto' (default: cuDNN flash attention on GPU in bfloat16, splash on TPU, 'xla' or, from 1024 tokens,
        'chunked' elsewhere), 'einsum', 'xla', 'chunked', 'cudnn', 'splash'. The pooling head (one probe query)
        always uses 'einsum'. Checked when `encode` runs.
      remat: what the backward pass keeps per encoder layer, one of `layers.REMAT_POLICIES`: 'none' (default),
        'save_dots', 'nothing', 'offload' (see `layers.remat_layer`). Checked when `encode` runs.
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    variant: str = "siglip"
    use_head: bool = True
    projection_dim: int | None = None
    dtype: str = "float32"
    attention: str = "auto"
    remat: str = "none"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"VisionConfig.variant={self.variant!r}; expected one of {VARIANTS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"VisionConfig.dtype={self.dtype!r}; expected one of {DTYPES}")
        if not 0 < self.patch_size <= self.image_size:
            raise ValueError(f"VisionConfig.patch_size={self.patch_size} must be between 1 and "
                             f"image_size={self.image_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionConfig.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")
        if self.use_head and self.variant != "siglip":
            raise ValueError("VisionConfig.use_head (attention-pooling head) exists only for variant='siglip'")
        if self.projection_dim is not None and self.variant != "clip":
            raise ValueError("VisionConfig.projection_dim (visual projection) exists only for variant='clip'")
        layers.activation(self.hidden_act)  # fails early on an unknown activation name

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches along each side: image_size // patch_size (a remainder of pixels is dropped, as in HF)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N = grid_size ** 2 (729 for image 384, patch 14); CLIP's position table has N + 1 rows."""
        return self.grid_size ** 2

    @property
    def has_class_token(self) -> bool:
        return self.variant == "clip"

    @property
    def num_tokens(self) -> int:
        """Tokens the encoder sees: patches, plus the class token for CLIP."""
        return self.num_patches + int(self.has_class_token)

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)


class VisionOutput(NamedTuple):
    """What `encode` returns (a pytree, so it can leave a jitted function).

    Attributes:
      hidden_states: [B, T, E] features of the chosen layer; [B, N, E] for CLIP with `drop_class_token=True`.
      pooled: [B, E] SigLIP attention-pooling head output or CLIP post-layernormed class token (Hugging Face's
        `pooler_output`); None for SigLIP without a head, or when `layer` stops before the last layer.
      projected: [B, projection_dim] CLIP visual projection of `pooled` (CLIPModel's `image_embeds`), or None.
    """

    hidden_states: jax.Array
    pooled: jax.Array | None = None
    projected: jax.Array | None = None


# ------------------------------------------------------------------------------------------ parameters


def _attention_specs(width: int, num_heads: int) -> dict:
    head_dim = width // num_heads
    spec = {}
    for name in ("query", "key", "value"):
        spec[name] = {"kernel": ParamSpec((width, num_heads, head_dim), (EMBED, HEADS, HEAD_DIM)),
                      "bias": ParamSpec((num_heads, head_dim), (HEADS, HEAD_DIM), "zeros")}
    spec["out"] = {"kernel": ParamSpec((num_heads, head_dim, width), (HEADS, HEAD_DIM, EMBED)),
                   "bias": ParamSpec((width,), (EMBED,), "zeros")}
    return spec


def _mlp_specs(cfg: VisionConfig) -> dict:
    return {"fc1": layers.dense_spec(cfg.hidden_size, cfg.intermediate_size, EMBED, MLP),
            "fc2": layers.dense_spec(cfg.intermediate_size, cfg.hidden_size, MLP, EMBED)}


def param_specs(cfg: VisionConfig) -> dict:
    """The `ParamSpec` tree of a tower: what `init` draws and what `jaxalign.io.hf_vision` fills.

    Layout (E hidden, P = patch_size ** 2 * num_channels, L layers):
      embeddings/patch/kernel [P, E] (+ bias [E] for SigLIP), embeddings/position [T, E],
      embeddings/class_token [E] (CLIP), pre_norm (CLIP), layers/... stacked with a leading [L] axis,
      post_norm, head/... (SigLIP with use_head), projection/kernel [E, projection_dim] (CLIP, optional).
    """
    width = cfg.hidden_size
    patch_in = cfg.patch_size * cfg.patch_size * cfg.num_channels
    embeddings = {
        "patch": layers.dense_spec(patch_in, width, None, EMBED, bias=cfg.variant == "siglip"),
        "position": ParamSpec((cfg.num_tokens, width), (None, EMBED)),
    }
    if cfg.has_class_token:
        embeddings["class_token"] = ParamSpec((width,), (EMBED,))
    layer = {"norm1": layers.norm_spec(width), "attention": _attention_specs(width, cfg.num_heads),
             "norm2": layers.norm_spec(width), "mlp": _mlp_specs(cfg)}
    specs: dict = {"embeddings": embeddings}
    if cfg.variant == "clip":
        specs["pre_norm"] = layers.norm_spec(width)
    specs["layers"] = layers.stack_specs(layer, cfg.num_layers)
    specs["post_norm"] = layers.norm_spec(width)
    if cfg.variant == "siglip" and cfg.use_head:
        specs["head"] = {"probe": ParamSpec((width,), (EMBED,)), "attention": _attention_specs(width, cfg.num_heads),
                         "norm": layers.norm_spec(width), "mlp": _mlp_specs(cfg)}
    if cfg.projection_dim is not None:
        specs["projection"] = layers.dense_spec(width, cfg.projection_dim, EMBED, None, bias=False)
    return specs


def init(cfg: VisionConfig, key: jax.Array) -> dict:
    """Random float32 parameters for `cfg` (for tests and training from scratch; real towers are imported)."""
    return layers.init_params(param_specs(cfg), key)


def logical_axes(cfg: VisionConfig) -> dict:
    """PartitionSpecs of logical axis names, one per parameter (for `jaxalign.sharding.shard_params`)."""
    return layers.logical_axes(param_specs(cfg))


# ------------------------------------------------------------------------------------------ forward pass


def _multihead_attention(params: dict, queries: jax.Array, keys_values: jax.Array, dtype: Any,
                         implementation: str = "einsum") -> jax.Array:
    """Attention of queries [B, T, E] over keys_values [B, S, E], no mask -> [B, T, E], with the kernel named by
    `implementation` (see `jaxalign.models.attention`)."""
    def project(name: str, x: jax.Array) -> jax.Array:
        kernel, bias = params[name]["kernel"].astype(dtype), params[name]["bias"].astype(dtype)
        return jnp.einsum("bte,ehd->bthd", x.astype(dtype), kernel) + bias

    out = attention_kernels.dot_product_attention(project("query", queries), project("key", keys_values),
                                                  project("value", keys_values), implementation=implementation)
    out_params = params["out"]
    return (jnp.einsum("bthd,hde->bte", out, out_params["kernel"].astype(dtype))
            + out_params["bias"].astype(dtype))


def _mlp(params: dict, x: jax.Array, act: str, dtype: Any) -> jax.Array:
    return layers.dense(params["fc2"], layers.activation(act)(layers.dense(params["fc1"], x, dtype)), dtype)


def _encoder_layer(params: dict, x: jax.Array, cfg: VisionConfig) -> jax.Array:
    """One pre-norm transformer layer: x + attention(norm1(x)), then + mlp(norm2(.)). x is [B, T, E]."""
    dtype = cfg.compute_dtype
    normed = layers.layer_norm(params["norm1"], x, cfg.layer_norm_eps)
    x = x + _multihead_attention(params["attention"], normed, normed, dtype, cfg.attention)
    normed = layers.layer_norm(params["norm2"], x, cfg.layer_norm_eps)
    return x + _mlp(params["mlp"], normed, cfg.hidden_act, dtype)


def embed_patches(params: dict, cfg: VisionConfig, pixels: jax.Array) -> jax.Array:
    """Pixels [B, H, W, C] -> encoder input [B, T, E] (Hugging Face's `hidden_states[0]`).

    Patches are flattened in (row, column, channel) order, tokens in row-major patch order as Hugging Face's
    conv + flatten(2) produces them. For CLIP the class token comes first and `pre_layrnorm` is applied. When
    patch_size does not divide image_size only the top-left grid_size * patch_size pixels are used, as the strided
    conv does.
    """
    batch, height, width, channels = pixels.shape
    if (height, width, channels) != (cfg.image_size, cfg.image_size, cfg.num_channels):
        raise ValueError(f"pixels have shape {tuple(pixels.shape)}; this tower expects "
                         f"[batch, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (use vit.preprocess)")
    dtype, size, grid = cfg.compute_dtype, cfg.patch_size, cfg.grid_size
    covered = grid * size  # a strided conv never reads the remainder rows and columns
    patches = pixels[:, :covered, :covered].astype(dtype).reshape(batch, grid, size, grid, size, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, size * size * channels)
    tokens = layers.dense(params["embeddings"]["patch"], patches, dtype)
    if cfg.has_class_token:
        class_token = jnp.broadcast_to(params["embeddings"]["class_token"].astype(dtype), (batch, 1, cfg.hidden_size))
        tokens = jnp.concatenate([class_token, tokens], axis=1)
    tokens = tokens + params["embeddings"]["position"].astype(dtype)[None]
    if cfg.variant == "clip":
        tokens = layers.layer_norm(params["pre_norm"], tokens, cfg.layer_norm_eps)
    return tokens


def resolve_layer(cfg: VisionConfig, layer: int) -> int:
    """How many encoder layers `encode(..., layer=layer)` runs: an index into Hugging Face's hidden_states tuple.

    The tuple has num_layers + 1 entries: [0] the embeddings, [i] the output of layer i. Negative values count from
    the end as in Python (and in LLaVA's `vision_feature_layer`), so -2 is the output of the second-to-last layer.
    """
    count = cfg.num_layers + 1
    if not -count <= layer < count:
        raise ValueError(f"layer={layer} is out of range for a tower with {cfg.num_layers} layers "
                         f"(valid: {-count} .. {count - 1}, Hugging Face hidden_states indexing)")
    return layer % count


def encode(params: dict, cfg: VisionConfig, pixels: jax.Array, *, layer: int = -1,
           drop_class_token: bool = False) -> VisionOutput:
    """Runs the tower on normalised pixels [B, H, W, C] (float; see `preprocess`).

    Args:
      params: parameters as built by `init` or `jaxalign.io.hf_vision.load`.
      cfg: the tower's config (static under jit).
      pixels: [B, image_size, image_size, num_channels] normalised pixels (channels last).
      layer: which features to return, indexing Hugging Face's `hidden_states` tuple like LLaVA's
        `vision_feature_layer`: 0 is the embeddings, i the output of layer i, negative values count from the end.
        -1 (default) is special: it returns Hugging Face's `last_hidden_state`, which for SigLIP includes the final
        `post_layernorm` (for CLIP it equals hidden_states[-1]). To get SigLIP's raw hidden_states[-1], pass
        `layer=cfg.num_layers`. -2 is the second-to-last layer's output, as LLaVA models use. Only the layers
        needed are run.
      drop_class_token: CLIP: drop token 0 (the class token) from `hidden_states`. SigLIP has no class token, so
        this changes nothing there.
    Returns:
      VisionOutput with hidden_states [B, T, E] ([B, N, E] with the class token dropped) and, when every layer
      ran, `pooled` [B, E] and (CLIP with a projection) `projected` [B, projection_dim].
    """
    dtype = cfg.compute_dtype
    depth = resolve_layer(cfg, layer)
    hidden = embed_patches(params, cfg, pixels)
    if depth:
        # Only the first `depth` layers run: slicing the stacked parameters keeps one compiled layer body.
        needed = jax.tree.map(lambda p: p[:depth], params["layers"])
        attention_kernels.check_implementation(cfg.attention, "VisionConfig.attention")
        layer_fn = layers.remat_layer(lambda x, p: (_encoder_layer(p, x, cfg), None), cfg.remat, "VisionConfig.remat")
        hidden, _ = jax.lax.scan(layer_fn, hidden, needed)

    pooled = projected = None
    features = hidden
    if depth == cfg.num_layers:
        if cfg.variant == "siglip":
            normed = layers.layer_norm(params["post_norm"], hidden, cfg.layer_norm_eps)
            if layer == -1:
                features = normed
            if cfg.use_head:
                pooled = _attention_pool(params["head"], normed, cfg)
        else:
            pooled = layers.layer_norm(params["post_norm"], hidden[:, 0], cfg.layer_norm_eps)
            if cfg.projection_dim is not None:
                projected = layers.dense(params["projection"], pooled, dtype)
    if drop_class_token and cfg.has_class_token:
        features = features[:, 1:]
    return VisionOutput(hidden_states=features, pooled=pooled, projected=projected)


def _attention_pool(params: dict, tokens: jax.Array, cfg: VisionConfig) -> jax.Array:
    """SigLIP's MAP head: a learned probe attends over tokens [B, T, E], then x + mlp(norm(x)) -> [B, E]."""
    dtype = cfg.compute_dtype
    probe = jnp.broadcast_to(params["probe"].astype(dtype), (tokens.shape[0], 1, cfg.hidden_size))
    pooled = _multihead_attention(params["attention"], probe, tokens, dtype)
    normed = layers.layer_norm(params["norm"], pooled, cfg.layer_norm_eps)
    return (pooled + _mlp(params["mlp"], normed, cfg.hidden_act, dtype))[:, 0]


# ------------------------------------------------------------------------------------------ preprocessing


def preprocess(images: jax.Array, cfg: VisionConfig, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> jax.Array:
    """uint8 images [B, H, W, C] -> float32 pixels [B, image_size, image_size, C] ready for `encode`.

    Scales to [0, 1], resizes with bicubic interpolation (antialiased when shrinking, clipped to [0, 1] as an
    8-bit resize would be), then normalises per channel. Default mean / std follow the variant: 0.5 / 0.5 for
    SigLIP, OpenAI's CLIP statistics for CLIP. The resize is close to, not bit-identical with, the PIL resize of
    Hugging Face image processors.
    """
    if images.ndim != 4:
        raise ValueError(f"images have shape {tuple(images.shape)}; expected [batch, height, width, channels]")
    default_mean, default_std = (SIGLIP_MEAN, SIGLIP_STD) if cfg.variant == "siglip" else (CLIP_MEAN, CLIP_STD)
    mean = jnp.asarray(default_mean if mean is None else mean, jnp.float32)
    std = jnp.asarray(default_std if std is None else std, jnp.float32)
    pixels = jnp.asarray(images).astype(jnp.float32) / 255.0
    target = (images.shape[0], cfg.image_size, cfg.image_size, images.shape[3])
    if tuple(pixels.shape) != target:
        pixels = jnp.clip(jax.image.resize(pixels, target, method="bicubic"), 0.0, 1.0)
    return (pixels - mean) / std
