"""Hugging Face causal LMs (Llama, Qwen2, Mistral, Phi-2) to and from jaxalign decoder parameters.

`load(folder)` reads a local snapshot folder (`config.json` and safetensors) without torch; `export(folder, cfg,
params)` writes one that `transformers` loads with LlamaForCausalLM, Qwen2ForCausalLM or PhiForCausalLM.

Both the transformers 4 config layout (`rope_theta`, `rope_scaling`, `partial_rotary_factor` at the top level)
and the transformers 5 layout (`rope_parameters`) are read; exports write both, so either version loads them.

Hugging Face stores a projection as `weight` [out, in]; jaxalign stores `kernel` [in, out], with attention
kernels split per head ([E, H, D] and [H, D, E]) and every layer's parameters stacked on a leading axis.
`load(folder, mesh=...)` builds those global arrays straight in their sharded layout from `param_recipes`, each
device's shard read alone from the safetensors files, in the dtype asked for (bfloat16 stays bfloat16).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.io import hf_folder
from jaxalign.io.hf_folder import CheckpointFormatError
from jaxalign.models import decoder
from jaxalign.models.decoder import DecoderConfig

MODEL_TYPES = ("llama", "qwen2", "mistral", "phi")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi": "PhiForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED = object()


def _field(hf: Mapping[str, Any], name: str, default: Any = _REQUIRED, source: str = "config.json") -> Any:
    value = hf.get(name)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointFormatError(f"{source}: field {name!r} is missing (model_type {hf.get('model_type')!r})")
        return default
    return value


def config_from_hf(hf_config: Mapping[str, Any] | Any, dtype: str = "float32", source: str = "config.json"
                   ) -> DecoderConfig:
    """A DecoderConfig from a Hugging Face config (the parsed `config.json`, or a transformers config object)."""
    hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointFormatError(f"{source}: model_type {model_type!r} is not a supported decoder LM; supported "
                                    f"model types: {', '.join(MODEL_TYPES)}")
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta") or 10000.0))
    partial_rotary_factor = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0))
    scaling = dict(hf.get("rope_scaling") or rope)
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "partial_rotary_factor")}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointFormatError(f"{source}: rope scaling type {rope_type!r} is not supported (supported: "
                                    f"{', '.join(SUPPORTED_ROPE_TYPES)})")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointFormatError(f"{source}: use_sliding_window=true is not supported (sliding-window attention)")
    if model_type == "mistral" and hf.get("sliding_window") is not None:
        raise CheckpointFormatError(f"{source}: sliding_window={hf['sliding_window']} is not supported; only "
                                    "Mistral checkpoints with sliding_window null load")
    if model_type == "phi" and hf.get("qk_layernorm"):
        raise CheckpointFormatError(f"{source}: qk_layernorm=true is not supported for Phi models")

    hidden_size = int(_field(hf, "hidden_size", source=source))
    num_heads = int(_field(hf, "num_attention_heads", source=source))
    common = dict(
        vocab_size=int(_field(hf, "vocab_size", source=source)), hidden_size=hidden_size,
        intermediate_size=int(_field(hf, "intermediate_size", source=source)),
        num_layers=int(_field(hf, "num_hidden_layers", source=source)), num_heads=num_heads,
        num_kv_heads=int(_field(hf, "num_key_value_heads", num_heads)),
        head_dim=int(_field(hf, "head_dim", hidden_size // num_heads)), rope_theta=rope_theta,
        rope_scaling=None if rope_type == "default" else scaling, partial_rotary_factor=partial_rotary_factor,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(_field(hf, "max_position_embeddings", 2048)), dtype=dtype,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"))
    if model_type == "phi":
        return DecoderConfig(family="phi", norm_eps=float(_field(hf, "layer_norm_eps", 1e-5)),
                             hidden_act=_field(hf, "hidden_act", "gelu_new"), attention_bias=True,
                             attention_output_bias=True, mlp_bias=True, lm_head_bias=True, **common)
    if model_type == "qwen2":
        biases = dict(attention_bias=True, attention_output_bias=False, mlp_bias=False)
    else:
        attention_bias = bool(hf.get("attention_bias", False))
        biases = dict(attention_bias=attention_bias, attention_output_bias=attention_bias,
                      mlp_bias=bool(hf.get("mlp_bias", False)))
    return DecoderConfig(family="llama", norm_eps=float(_field(hf, "rms_norm_eps", 1e-6)),
                         hidden_act=_field(hf, "hidden_act", "silu"), **biases, **common)


def _hf_model_type(cfg: DecoderConfig) -> str:
    if cfg.family == "phi":
        if not (cfg.attention_bias and cfg.attention_output_bias and cfg.mlp_bias and cfg.lm_head_bias):
            raise ValueError("config_to_hf: Phi models have biases on every projection and the LM head; this "
                             "config lacks some, so transformers' PhiForCausalLM cannot hold it")
        return "phi"
    if cfg.lm_head_bias:
        raise ValueError("config_to_hf: Llama / Qwen2 models have no LM-head bias; this config has one")
    if cfg.attention_bias and not cfg.attention_output_bias and not cfg.mlp_bias:
        return "qwen2"
    if cfg.attention_bias != cfg.attention_output_bias:
        raise ValueError("config_to_hf: Llama's attention_bias covers q/k/v and the output projection together; "
                         f"this config has attention_bias={cfg.attention_bias}, "
                         f"attention_output_bias={cfg.attention_output_bias}")
    return "llama"


def config_to_hf(cfg: DecoderConfig) -> dict:
    """A `config.json` dict for `cfg` that transformers (4.x and 5.x) loads as its Llama, Qwen2 or Phi model."""
    model_type = _hf_model_type(cfg)
    scaling = cfg.rope_scaling_dict
    rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": rope_parameters,
        "torch_dtype": cfg.dtype, "use_cache": True, "attention_dropout": 0.0,
    }
    if model_type == "phi":
        rope_parameters["partial_rotary_factor"] = cfg.partial_rotary_factor
        hf.update(layer_norm_eps=cfg.norm_eps, partial_rotary_factor=cfg.partial_rotary_factor, qk_layernorm=False,
                  resid_pdrop=0.0, embd_pdrop=0.0)
    else:
        hf.update(rms_norm_eps=cfg.norm_eps, head_dim=cfg.head_dim)
        if model_type == "llama":
            hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def _layer_names(cfg: DecoderConfig) -> dict[str, tuple[str, ...]]:
    """Hugging Face tensor name (after 'model.layers.{i}.') of each jaxalign layer parameter path."""
    attention_out = "dense" if cfg.family == "phi" else "o_proj"
    names = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", attention_out)):
        names[f"self_attn.{theirs}.weight"] = ("attention", ours, "kernel")
        names[f"self_attn.{theirs}.bias"] = ("attention", ours, "bias")
    mlp = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")) if cfg.family == "llama" else (
        ("up", "fc1"), ("down", "fc2"))
    for ours, theirs in mlp:
        names[f"mlp.{theirs}.weight"] = ("mlp", ours, "kernel")
        names[f"mlp.{theirs}.bias"] = ("mlp", ours, "bias")
    names["input_layernorm.weight"] = ("attention_norm", "scale")
    names["input_layernorm.bias"] = ("attention_norm", "bias")
    names["post_attention_layernorm.weight"] = ("mlp_norm", "scale")
    return names


def _top_names(cfg: DecoderConfig) -> dict[str, tuple[str, ...]]:
    final = "model.final_layernorm" if cfg.family == "phi" else "model.norm"
    return {"model.embed_tokens.weight": ("embed", "embedding"), f"{final}.weight": ("final_norm", "scale"),
            f"{final}.bias": ("final_norm", "bias"), "lm_head.weight": ("lm_head", "kernel"),
            "lm_head.bias": ("lm_head", "bias")}


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


_set = hf_folder.tree_set


def _to_ours(array: np.ndarray, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    """A Hugging Face tensor as the jaxalign parameter at `path`: weights [out, in] become kernels [in, ...]."""
    if path[-1] == "kernel":
        array = array.T
    return array.reshape(shape)


def _hf_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of a jaxalign parameter: kernels become [out, in] with heads flattened."""
    if path[-1] != "kernel" and path[-1] != "embedding":
        return (int(np.prod(shape)),)
    if path[-1] == "embedding":
        return shape
    if path[:2] == ("attention", "output"):  # [H, D, E] -> [E, H * D]
        return (shape[-1], int(np.prod(shape[:-1])))
    return (int(np.prod(shape[1:])), shape[0])  # [E, heads, D] or [in, out] -> [out, in]


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: DecoderConfig, source: str = "",
                   param_dtype: Any = jnp.float32) -> dict:
    """jaxalign parameters from Hugging Face tensors; every tensor is shape-checked against `cfg`.

    Raises CheckpointFormatError naming a missing tensor, a tensor of the wrong shape, or tensors the model has
    no place for.
    """
    specs = decoder.param_specs(cfg)
    used: set[str] = set()

    def take(name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        return _to_ours(hf_folder.take(tensors, name, _hf_shape(shape, path), source), path, shape)

    params: dict = {}
    for name, path in _top_names(cfg).items():
        spec = _get(specs, path)
        if spec is not None:
            _set(params, path, take(name, path, spec.shape))
    for name, path in _layer_names(cfg).items():
        spec = _get(specs["layers"], path)
        if spec is not None:
            per_layer = [take(f"model.layers.{i}.{name}", path, spec.shape[1:]) for i in range(cfg.num_layers)]
            _set(params, ("layers", *path), np.stack(per_layer))
    _check_all_used(tensors, used, cfg, source or "checkpoint")
    return jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)


def _check_all_used(names, used: set, cfg: DecoderConfig, source: str) -> None:
    """Tensors nobody read mean the config and the checkpoint disagree; never drop them silently. A tied
    checkpoint may still carry a copy of the embedding as lm_head.weight; old ones carry rotary tables."""
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(name for name in names
                        if name not in used and name not in ignorable and not name.endswith("inv_freq"))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise CheckpointFormatError(f"{source}: tensors {shown} ({len(unexpected)} in all) have no place in a "
                                    f"{cfg.family}-family model with this config.json; check model_type and the "
                                    "bias / tying settings")


def params_to_hf(params: dict, cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors (float32 NumPy, [out, in] weights) from jaxalign parameters."""
    tensors: dict[str, np.ndarray] = {}

    def put(name: str, path: tuple[str, ...], array: Any) -> None:
        array = np.asarray(jnp.asarray(array, jnp.float32))
        if path[-1] == "embedding":
            tensors[name] = np.ascontiguousarray(array)
        elif path[-1] == "kernel":
            tensors[name] = _to_hf_matrix(array, path)
        else:
            tensors[name] = array.reshape(-1)

    for name, path in _top_names(cfg).items():
        array = _get(params, path)
        if array is not None:
            put(name, path, array)
    for name, path in _layer_names(cfg).items():
        stacked = _get(params["layers"], path)
        if stacked is not None:
            for i in range(cfg.num_layers):
                put(f"model.layers.{i}.{name}", path, stacked[i])
    return tensors


def _to_hf_matrix(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[:2] == ("attention", "output"):  # [H, D, E] -> [E, H * D]
        return np.ascontiguousarray(array.reshape(-1, array.shape[-1]).T)
    return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)  # [in, ...] -> [out, in]


def param_recipes(reader: hf_folder.SnapshotReader, cfg: DecoderConfig) -> dict:
    """A `hf_folder.TensorRecipe` per jaxalign parameter: the Hugging Face tensor(s) it comes from and how, so a
    loader can read any slice of it alone. Only the safetensors headers are read; shapes and leftover tensors
    are checked as `params_from_hf` checks them.

    `_to_ours` as (transpose, reshape): a kernel is the [out, in] weight transposed, then split into heads where
    the jaxalign shape has them; everything else is only reshaped.
    """
    specs = decoder.param_specs(cfg)
    used: set[str] = set()

    def recipe(names: list[str], path: tuple[str, ...], shape: tuple[int, ...], stacked: bool = False
               ) -> hf_folder.TensorRecipe:
        hf_shape = _hf_shape(tuple(shape[1:] if stacked else shape), path)
        perm = (1, 0) if path[-1] == "kernel" else tuple(range(len(hf_shape)))
        made = hf_folder.TensorRecipe(tuple(names), tuple(shape), hf_shape, perm, stacked)
        hf_folder.check_recipe(reader, made)
        used.update(names)
        return made

    recipes: dict = {}
    for name, path in _top_names(cfg).items():
        spec = _get(specs, path)
        if spec is not None:
            _set(recipes, path, recipe([name], path, spec.shape))
    for name, path in _layer_names(cfg).items():
        spec = _get(specs["layers"], path)
        if spec is not None:
            names = [f"model.layers.{i}.{name}" for i in range(cfg.num_layers)]
            _set(recipes, ("layers", *path), recipe(names, path, spec.shape, stacked=True))
    _check_all_used(reader, used, cfg, reader.source)
    return recipes


def load(folder: str, dtype: str = "float32", param_dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None
         ) -> tuple[DecoderConfig, dict]:
    """(config, params) of the Hugging Face causal LM snapshot in `folder` (no torch needed).

    Args:
      folder: the snapshot folder.
      dtype: the compute dtype ('float32' or 'bfloat16'), stored in the config.
      param_dtype: the params' dtype: float32 master weights for a model that trains, the compute dtype for a
        frozen one (None: the compute dtype).
      mesh: None reads every tensor whole into single-device arrays. With a mesh, each parameter is a global
        array laid out by `decoder.logical_axes(cfg)` and every device's shard is read alone from the
        safetensors files (only this process's devices' shards), cast per shard, never through a float32 copy.
    """
    cfg = config_from_hf(hf_folder.read_config(folder), dtype=dtype, source=f"{folder}/config.json")
    param_dtype = dtype if param_dtype is None else param_dtype
    if mesh is not None:
        with hf_folder.SnapshotReader(folder) as reader:
            return cfg, hf_folder.load_sharded(reader, param_recipes(reader, cfg), decoder.logical_axes(cfg), mesh,
                                               dtype=param_dtype)
    params = params_from_hf(hf_folder.read_tensors(folder), cfg, source=folder, param_dtype=param_dtype)
    return cfg, params


def export(folder: str, cfg: DecoderConfig, params: dict) -> None:
    """Writes `config.json` and `model.safetensors` that transformers loads as the matching *ForCausalLM."""
    hf_folder.write_folder(folder, config_to_hf(cfg), params_to_hf(params, cfg))
