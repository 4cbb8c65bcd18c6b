"""Hugging Face SigLIP / CLIP vision towers <-> jaxalign `vit` configs and parameters (no torch needed).

Reads `SiglipVisionModel`, `CLIPVisionModel` and `CLIPVisionModelWithProjection` snapshots, and the vision half of
full `SiglipModel` / `CLIPModel` snapshots (their vision tensors sit under 'vision_model.', CLIP's projection is
'visual_projection.weight'). Tensor names are accepted with or without the 'vision_model.' prefix: transformers 4
writes it, transformers 5 writes tower-only models without it. Export writes the prefixed names, which both
versions load.

Layout conversions (Hugging Face -> jaxalign): nn.Linear weights [out, in] are transposed to kernels [in, out];
attention projections become [E, H, D] (query / key / value) and [H, D, E] (output); the patch conv weight
[E, C, P, P] becomes a dense kernel [P * P * C, E] over (row, column, channel)-flattened patches; per-layer tensors
are stacked along a leading layer axis; the MAP head's packed `in_proj_weight` [3E, E] is split into q / k / v.

`load(folder)` reads every tensor whole (float32 NumPy); `load(folder, mesh=...)` reads each device's shard alone
in the stored or compute dtype, from the per-parameter `param_recipes` (the same conversions as transposes and
reshapes of slices).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from jaxalign.io import hf_folder
from jaxalign.io.hf_folder import CheckpointFormatError
from jaxalign.io.hf_folder import tree_get as _get, tree_set as _set
from jaxalign.models import layers, vit
from jaxalign.models.vit import VisionConfig

MODEL_TYPES = ("siglip_vision_model", "siglip", "clip_vision_model", "clip")
PREFIX = "vision_model."
PROJECTION_NAME = "visual_projection.weight"
# First name parts of a tower's own tensors (after the prefix); a full model's text tower is not among them.
_TOWER_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")

# Defaults of transformers' SiglipVisionConfig / CLIPVisionConfig: real configs often leave these fields out.
_DEFAULTS = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


def config_from_hf(hf_config: dict, dtype: str = "float32") -> VisionConfig:
    """A `VisionConfig` from a parsed Hugging Face `config.json` (tower-only or full SigLIP / CLIP model).

    Full 'siglip' / 'clip' configs contribute their 'vision_config' sub-dict. CLIP gets a projection only when the
    snapshot has one: a full CLIPModel or a CLIPVisionModelWithProjection.
    """
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointFormatError(
            f"config.json: model_type {model_type!r} is not a vision tower jaxalign can read; supported model "
            f"types: {', '.join(MODEL_TYPES)}")
    variant = "siglip" if model_type.startswith("siglip") else "clip"
    vision = (hf_config.get("vision_config") or {}) if model_type in ("siglip", "clip") else hf_config
    fields = {**_DEFAULTS[variant], **{k: v for k, v in vision.items() if v is not None}}
    projection_dim = None
    if model_type == "clip":
        projection_dim = int(hf_config.get("projection_dim", 512))
    elif model_type == "clip_vision_model" and any(
            "WithProjection" in name for name in hf_config.get("architectures") or ()):
        projection_dim = int(fields.get("projection_dim", 512))
    if fields["hidden_act"] not in layers.ACTIVATIONS:
        raise CheckpointFormatError(f"config.json: hidden_act {fields['hidden_act']!r} is not supported; known: "
                                    f"{sorted(layers.ACTIVATIONS)}")
    return VisionConfig(
        image_size=int(fields["image_size"]), patch_size=int(fields["patch_size"]),
        num_channels=int(fields["num_channels"]), hidden_size=int(fields["hidden_size"]),
        intermediate_size=int(fields["intermediate_size"]), num_layers=int(fields["num_hidden_layers"]),
        num_heads=int(fields["num_attention_heads"]), layer_norm_eps=float(fields["layer_norm_eps"]),
        hidden_act=fields["hidden_act"], variant=variant,
        use_head=variant == "siglip" and bool(fields.get("vision_use_head", True)),
        projection_dim=projection_dim, dtype=dtype)


def config_to_hf(cfg: VisionConfig) -> dict:
    """A `config.json` dict that transformers' SiglipVisionModel / CLIPVisionModel(WithProjection) loads."""
    config = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_channels=cfg.num_channels,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
                  layer_norm_eps=cfg.layer_norm_eps, attention_dropout=0.0, dtype="float32")
    if cfg.variant == "siglip":
        return dict(config, architectures=["SiglipVisionModel"], model_type="siglip_vision_model",
                    vision_use_head=cfg.use_head)
    if cfg.projection_dim is not None:
        return dict(config, architectures=["CLIPVisionModelWithProjection"], model_type="clip_vision_model",
                    projection_dim=cfg.projection_dim)
    return dict(config, architectures=["CLIPVisionModel"], model_type="clip_vision_model")


# ------------------------------------------------------------------------------------------ tensor table

# (to jaxalign, to Hugging Face) layout conversions; `cfg` gives the head count and patch geometry.
_Convert = Callable[[np.ndarray, VisionConfig], np.ndarray]
_LAYOUTS: dict[str, tuple[_Convert, _Convert]] = {
    "copy": (lambda a, c: a, lambda a, c: a),
    "linear": (lambda a, c: a.T, lambda a, c: a.T),
    "qkv": (lambda a, c: a.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
            lambda a, c: a.reshape(c.hidden_size, c.hidden_size).T),
    "qkv_bias": (lambda a, c: a.reshape(c.num_heads, c.head_dim), lambda a, c: a.reshape(-1)),
    "out": (lambda a, c: a.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
            lambda a, c: a.reshape(c.hidden_size, c.hidden_size).T),
    "conv": (lambda a, c: a.transpose(2, 3, 1, 0).reshape(-1, c.hidden_size),
             lambda a, c: a.reshape(c.patch_size, c.patch_size, c.num_channels, c.hidden_size).transpose(3, 2, 0, 1)),
    "probe": (lambda a, c: a.reshape(-1), lambda a, c: a.reshape(1, 1, -1)),
}


def _hf_shape(cfg: VisionConfig, layout: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of a tensor whose jaxalign shape is `ours` (as `take` must check it)."""
    return tuple(_LAYOUTS[layout][1](np.zeros(ours, np.float32), cfg).shape)


def _attention_entries(hf: str, ours: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], str]]:
    entries = []
    for hf_name, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        entries += [(f"{hf}.{hf_name}.weight", (*ours, name, "kernel"), "qkv"),
                    (f"{hf}.{hf_name}.bias", (*ours, name, "bias"), "qkv_bias")]
    return entries + [(f"{hf}.out_proj.weight", (*ours, "out", "kernel"), "out"),
                      (f"{hf}.out_proj.bias", (*ours, "out", "bias"), "copy")]


def _norm_entries(hf: str, ours: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], str]]:
    return [(f"{hf}.weight", (*ours, "scale"), "copy"), (f"{hf}.bias", (*ours, "bias"), "copy")]


def _mlp_entries(hf: str, ours: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], str]]:
    return [(f"{hf}.{fc}.{kind}", (*ours, fc, "kernel" if kind == "weight" else "bias"),
             "linear" if kind == "weight" else "copy") for fc in ("fc1", "fc2") for kind in ("weight", "bias")]


def _tensor_table(cfg: VisionConfig) -> tuple[list, list]:
    """(tower tensors, per-layer tensors) as (Hugging Face name, jaxalign path, layout).

    Per-layer names hold '{i}' for the layer index; their jaxalign paths are under 'layers' (stacked). The MAP head's
    packed in_proj tensors are handled separately.
    """
    tower = [("embeddings.patch_embedding.weight", ("embeddings", "patch", "kernel"), "conv"),
             ("embeddings.position_embedding.weight", ("embeddings", "position"), "copy")]
    if cfg.variant == "siglip":
        tower.append(("embeddings.patch_embedding.bias", ("embeddings", "patch", "bias"), "copy"))
    else:
        tower.append(("embeddings.class_embedding", ("embeddings", "class_token"), "copy"))
        tower += _norm_entries("pre_layrnorm", ("pre_norm",))
    tower += _norm_entries("post_layernorm", ("post_norm",))
    if cfg.variant == "siglip" and cfg.use_head:
        tower += [("head.probe", ("head", "probe"), "probe"),
                  ("head.attention.out_proj.weight", ("head", "attention", "out", "kernel"), "out"),
                  ("head.attention.out_proj.bias", ("head", "attention", "out", "bias"), "copy")]
        tower += _norm_entries("head.layernorm", ("head", "norm")) + _mlp_entries("head.mlp", ("head", "mlp"))
    per_layer = (_norm_entries("encoder.layers.{i}.layer_norm1", ("norm1",))
                 + _attention_entries("encoder.layers.{i}.self_attn", ("attention",))
                 + _norm_entries("encoder.layers.{i}.layer_norm2", ("norm2",))
                 + _mlp_entries("encoder.layers.{i}.mlp", ("mlp",)))
    return tower, per_layer


class _Converter:
    """Hugging Face tensor -> ours for `hf_folder.params_from_table`, by layout."""

    def __init__(self, cfg: VisionConfig):
        self.cfg = cfg

    def __call__(self, array: np.ndarray, layout: str) -> np.ndarray:
        return np.asarray(_LAYOUTS[layout][0](array, self.cfg))

    def hf_shape(self, layout: str, ours: tuple[int, ...]) -> tuple[int, ...]:
        return _hf_shape(self.cfg, layout, ours)


# ------------------------------------------------------------------------------------------ import / export


def detect_prefix(tensors: Mapping[str, np.ndarray], source: str = "") -> str:
    """'vision_model.' or '' : where the tower's tensors are in this checkpoint."""
    for prefix in (PREFIX, ""):
        if prefix + "embeddings.patch_embedding.weight" in tensors:
            return prefix
    sample = sorted(tensors)[:8]
    raise CheckpointFormatError(
        f"{source or 'checkpoint'}: no vision tower found (neither 'vision_model.embeddings.patch_embedding.weight' "
        f"nor 'embeddings.patch_embedding.weight'); first tensor names: {sample}")


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: VisionConfig, source: str = "",
                   prefix: str | None = None) -> dict:
    """jaxalign parameters (float32 NumPy arrays) from Hugging Face tensors, every shape checked against `cfg`.

    Args:
      tensors: name -> array, as `hf_folder.read_tensors` returns them.
      cfg: the tower's config (usually `config_from_hf` of the same snapshot).
      source: the file the tensors came from, named in errors.
      prefix: the tower's name prefix; None detects 'vision_model.' or none. Composite checkpoints (for example
        LLaVA's 'vision_tower.vision_model.') pass theirs.
    Raises:
      CheckpointFormatError: a tensor is missing or has the wrong shape, or a tower tensor is left unused (the
        config and the checkpoint disagree, for example a head the config says is absent).
    """
    prefix = detect_prefix(tensors, source) if prefix is None else prefix
    tower, per_layer = _tensor_table(cfg)
    converter = _Converter(cfg)
    params, used = hf_folder.params_from_table(tensors, prefix, layers.shapes(vit.param_specs(cfg)), tower, per_layer,
                                               cfg.num_layers, converter, source)

    def convert(name: str, layout: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        return converter(np.asarray(hf_folder.take(tensors, name, converter.hf_shape(layout, shape), source),
                                    np.float32), layout)

    if cfg.variant == "siglip" and cfg.use_head:
        width = cfg.hidden_size
        packed_weight = convert(prefix + "head.attention.in_proj_weight", "copy", (3 * width, width))
        packed_bias = convert(prefix + "head.attention.in_proj_bias", "copy", (3 * width,))
        for index, name in enumerate(("query", "key", "value")):
            rows = slice(index * width, (index + 1) * width)
            _set(params, ("head", "attention", name, "kernel"), _LAYOUTS["qkv"][0](packed_weight[rows], cfg))
            _set(params, ("head", "attention", name, "bias"), _LAYOUTS["qkv_bias"][0](packed_bias[rows], cfg))
    if cfg.projection_dim is not None:
        projection = convert(PROJECTION_NAME, "linear", (cfg.hidden_size, cfg.projection_dim))
        _set(params, ("projection", "kernel"), projection)

    _check_all_used(tensors, used, prefix, cfg, source or "checkpoint")
    return params


def _check_all_used(names, used: set, prefix: str, cfg: VisionConfig, source: str) -> None:
    """Tower tensors nobody read mean the config and the checkpoint disagree; never drop them silently.
    position_ids are non-persistent buffers that some older checkpoints still carry."""
    unused = sorted(name for name in names if name not in used and not name.endswith("position_ids")
                    and name.startswith(tuple(prefix + root for root in _TOWER_ROOTS)))
    if unused:
        raise CheckpointFormatError(
            f"{source}: {len(unused)} vision tensor(s) do not fit the config "
            f"(variant={cfg.variant}, use_head={cfg.use_head}, layers={cfg.num_layers}): {unused[:8]}")


def params_to_hf(params: dict, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors (float32, 'vision_model.' prefix; CLIP projection as 'visual_projection.weight')."""
    expected = layers.shapes(vit.param_specs(cfg))
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    want = jax.tree.map(lambda s: tuple(s.shape), expected)
    if got != want:
        raise ValueError("params do not match the config's parameter shapes; export the params that were built "
                         "for this config")
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
    tower, per_layer = _tensor_table(cfg)
    tensors: dict[str, np.ndarray] = {}
    for name, path, layout in tower:
        tensors[PREFIX + name] = _LAYOUTS[layout][1](_get(host, path), cfg)
    for name, path, layout in per_layer:
        stacked = _get(host["layers"], path)
        for i in range(cfg.num_layers):
            tensors[PREFIX + name.format(i=i)] = _LAYOUTS[layout][1](stacked[i], cfg)
    if cfg.variant == "siglip" and cfg.use_head:
        attention = host["head"]["attention"]
        names = ("query", "key", "value")
        tensors[PREFIX + "head.attention.in_proj_weight"] = np.concatenate(
            [_LAYOUTS["qkv"][1](attention[n]["kernel"], cfg) for n in names])
        tensors[PREFIX + "head.attention.in_proj_bias"] = np.concatenate(
            [_LAYOUTS["qkv_bias"][1](attention[n]["bias"], cfg) for n in names])
    if cfg.projection_dim is not None:
        tensors[PROJECTION_NAME] = host["projection"]["kernel"].T
    return {name: np.ascontiguousarray(array, np.float32) for name, array in tensors.items()}


def param_recipes(reader: hf_folder.SnapshotReader, cfg: VisionConfig, prefix: str | None = None) -> dict:
    """A `hf_folder.TensorRecipe` per jaxalign parameter: the Hugging Face tensor(s) it comes from and how, so a
    loader can read any slice of it alone. Only the safetensors headers are read; every shape is checked as
    `params_from_hf` checks it, and tower tensors the config has no place for are an error there as here.

    The layouts of `_LAYOUTS` as (transpose, reshape): 'linear' / 'qkv' / 'out' transpose [out, in] -> [in, out]
    and split heads, 'conv' transposes [E, C, P, P] -> [P, P, C, E] and flattens, the rest only reshape.
    """
    source = reader.source
    prefix = detect_prefix(reader, source) if prefix is None else prefix
    expected = layers.shapes(vit.param_specs(cfg))
    tower, per_layer = _tensor_table(cfg)
    recipes: dict = {}
    used: set[str] = set()

    def recipe(names: list[str], layout: str, shape: tuple[int, ...], stacked: bool = False, **region
               ) -> hf_folder.TensorRecipe:
        hf_shape = _hf_shape(cfg, layout, tuple(shape[1:] if stacked else shape))
        perm = _TRANSPOSES[layout] or tuple(range(len(hf_shape)))
        made = hf_folder.TensorRecipe(tuple(names), tuple(shape), hf_shape, perm, stacked, **region)
        hf_folder.check_recipe(reader, made)
        used.update(names)
        return made

    for name, path, layout in tower:
        _set(recipes, path, recipe([prefix + name], layout, _get(expected, path).shape))
    for name, path, layout in per_layer:
        names = [prefix + name.format(i=i) for i in range(cfg.num_layers)]
        _set(recipes, ("layers", *path), recipe(names, layout, _get(expected["layers"], path).shape, stacked=True))
    if cfg.variant == "siglip" and cfg.use_head:
        width = cfg.hidden_size
        attention = ("head", "attention")
        for index, name in enumerate(("query", "key", "value")):  # rows of the packed in_proj tensors
            _set(recipes, (*attention, name, "kernel"), recipe(
                [prefix + "head.attention.in_proj_weight"], "qkv", _get(expected, (*attention, name, "kernel")).shape,
                row_offset=index * width, stored_shape=(3 * width, width)))
            _set(recipes, (*attention, name, "bias"), recipe(
                [prefix + "head.attention.in_proj_bias"], "qkv_bias", _get(expected, (*attention, name, "bias")).shape,
                row_offset=index * width, stored_shape=(3 * width,)))
    if cfg.projection_dim is not None:
        _set(recipes, ("projection", "kernel"), recipe([PROJECTION_NAME], "linear",
                                                       (cfg.hidden_size, cfg.projection_dim)))
    _check_all_used(reader, used, prefix, cfg, source)
    return recipes


# The transpose each layout applies to the Hugging Face tensor before reshaping it (None: none).
_TRANSPOSES: dict[str, tuple[int, ...] | None] = {
    "copy": None, "linear": (1, 0), "qkv": (1, 0), "qkv_bias": None, "out": (1, 0), "conv": (2, 3, 1, 0),
    "probe": None}


def load(folder: str, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None, param_dtype: Any = None
         ) -> tuple[VisionConfig, dict]:
    """(config, params) of the vision tower in a local Hugging Face snapshot folder.

    Args:
      folder: the snapshot folder.
      dtype: the tower's compute dtype ('float32' or 'bfloat16'), stored in the config.
      mesh: None reads every tensor whole and returns float32 NumPy params (or `param_dtype` ones). With a mesh,
        each parameter is a global array laid out by `vit.logical_axes(cfg)` and every device's shard is read
        alone from the safetensors file (only this process's devices' shards), never through a float32 copy.
      param_dtype: the params' dtype; None means float32 without a mesh and the compute dtype `dtype` with one
        (a frozen tower is kept as it computes: a bfloat16 checkpoint stays bfloat16, a float32 one is cast per
        shard).
    """
    cfg = config_from_hf(hf_folder.read_config(folder), dtype=dtype)
    if mesh is not None:
        with hf_folder.SnapshotReader(folder) as reader:
            recipes = param_recipes(reader, cfg)
            return cfg, hf_folder.load_sharded(reader, recipes, vit.logical_axes(cfg), mesh,
                                               dtype=dtype if param_dtype is None else param_dtype)
    files = hf_folder.weight_files(folder)
    tensors = hf_folder.read_tensors(folder)
    source = files[0] if len(files) == 1 else f"{folder} ({len(files)} safetensors shards)"
    params = params_from_hf(tensors, cfg, source)
    if param_dtype is not None:
        params = jax.tree.map(lambda array: np.asarray(array, param_dtype), params)
    return cfg, params


def export(folder: str, cfg: VisionConfig, params: dict) -> None:
    """Writes `config.json` and `model.safetensors` that transformers' vision model classes load."""
    hf_folder.write_folder(folder, config_to_hf(cfg), params_to_hf(params, cfg))
