"""Hugging Face BERT snapshots <-> jaxalign `bert` configs and parameters (no torch needed).

Reads the encoder of `BertModel`, `BertFor...` and sentence-transformers BERT folders (all-MiniLM-L6-v2 and
kin). Tensor names are accepted with the 'bert.' prefix (task models such as BertForMaskedLM write it) or
without (BertModel and sentence-transformers folders), and old checkpoints' `LayerNorm.gamma` / `LayerNorm.beta`
are read as `LayerNorm.weight` / `LayerNorm.bias`. The pooler and task heads (`pooler.*`, `cls.*`) are not
part of `jaxalign.models.bert` and are skipped; any other encoder tensor that the config has no place for is an
error, never dropped silently.

Layout conversions (Hugging Face -> jaxalign): nn.Linear weights [out, in] become kernels [in, out]; query / key /
value projections become [E, H, D] with biases [H, D]; the attention output projection becomes [H, D, E];
per-layer tensors are stacked along a leading layer axis.

`export` writes a folder that `transformers.BertModel.from_pretrained(folder, add_pooling_layer=False)` loads.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np

from jaxalign.io import hf_folder
from jaxalign.io.hf_folder import CheckpointFormatError
from jaxalign.io.hf_folder import tree_get as _get
from jaxalign.models import bert, layers
from jaxalign.models.bert import BertConfig

PREFIXES = ("bert.", "")
# First name parts of the encoder's own tensors (after the prefix); tensors under other roots (pooler, cls) are
# heads this module does not read.
_ENCODER_ROOTS = ("embeddings.", "encoder.")
# Defaults of transformers' BertConfig, for configs that leave a field out.
_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                 hidden_act="gelu", hidden_dropout_prob=0.1, position_embedding_type="absolute")


def config_from_hf(hf_config: dict, dtype: str = "float32", source: str = "config.json") -> BertConfig:
    """A `BertConfig` from a parsed Hugging Face BERT `config.json` (`source` names the file in errors)."""
    if hf_config.get("model_type") != "bert":
        raise CheckpointFormatError(f"{source}: model_type {hf_config.get('model_type')!r} is not 'bert'; "
                                    "jaxalign.io.hf_bert reads BERT encoders only")
    fields = {**_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
    if fields["position_embedding_type"] != "absolute":
        raise CheckpointFormatError(f"{source}: position_embedding_type {fields['position_embedding_type']!r} is "
                                    "not supported (only 'absolute')")
    if fields.get("is_decoder"):
        raise CheckpointFormatError(f"{source}: is_decoder is true; jaxalign's BERT is a bidirectional encoder")
    if fields["hidden_act"] not in layers.ACTIVATIONS:
        raise CheckpointFormatError(f"{source}: hidden_act {fields['hidden_act']!r} is not supported; known: "
                                    f"{sorted(layers.ACTIVATIONS)}")
    return BertConfig(
        vocab_size=int(fields["vocab_size"]), hidden=int(fields["hidden_size"]),
        num_layers=int(fields["num_hidden_layers"]), num_heads=int(fields["num_attention_heads"]),
        intermediate=int(fields["intermediate_size"]), max_positions=int(fields["max_position_embeddings"]),
        type_vocab_size=int(fields["type_vocab_size"]), layer_norm_eps=float(fields["layer_norm_eps"]),
        hidden_act=fields["hidden_act"], dropout=float(fields["hidden_dropout_prob"]), dtype=dtype)


def config_to_hf(cfg: BertConfig) -> dict:
    """A `config.json` dict that transformers' BertModel loads."""
    return dict(
        architectures=["BertModel"], model_type="bert", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.dropout,
        # jaxalign has one dropout rate; Hugging Face's BERT uses the same value for both by default.
        attention_probs_dropout_prob=cfg.dropout, position_embedding_type="absolute", pad_token_id=0,
        initializer_range=0.02, dtype="float32")


# ------------------------------------------------------------------------------------------ tensor table

# (to jaxalign, to Hugging Face) layout conversions.
_Convert = Callable[[np.ndarray, BertConfig], np.ndarray]
_LAYOUTS: dict[str, tuple[_Convert, _Convert]] = {
    "copy": (lambda a, c: a, lambda a, c: a),
    "linear": (lambda a, c: a.T, lambda a, c: a.T),
    "qkv": (lambda a, c: a.T.reshape(c.hidden, c.num_heads, c.head_dim),
            lambda a, c: a.reshape(c.hidden, c.hidden).T),
    "qkv_bias": (lambda a, c: a.reshape(c.num_heads, c.head_dim), lambda a, c: a.reshape(-1)),
    "out": (lambda a, c: a.T.reshape(c.num_heads, c.head_dim, c.hidden),
            lambda a, c: a.reshape(c.hidden, c.hidden).T),
}
_Entry = tuple[str, tuple[str, ...], str]  # (Hugging Face name, jaxalign path, layout)


def _norm(hf: str, ours: tuple[str, ...]) -> list[_Entry]:
    return [(f"{hf}.weight", (*ours, "scale"), "copy"), (f"{hf}.bias", (*ours, "bias"), "copy")]


def _linear(hf: str, ours: tuple[str, ...]) -> list[_Entry]:
    return [(f"{hf}.weight", (*ours, "kernel"), "linear"), (f"{hf}.bias", (*ours, "bias"), "copy")]


def _tensor_table() -> tuple[list[_Entry], list[_Entry]]:
    """(embedding entries, per-layer entries whose names hold '{i}')."""
    embeddings = [("embeddings.word_embeddings.weight", ("embeddings", "word"), "copy"),
                  ("embeddings.position_embeddings.weight", ("embeddings", "position"), "copy"),
                  ("embeddings.token_type_embeddings.weight", ("embeddings", "token_type"), "copy"),
                  *_norm("embeddings.LayerNorm", ("embeddings", "norm"))]
    layer = "encoder.layer.{i}"
    per_layer = []
    for name in ("query", "key", "value"):
        per_layer += [(f"{layer}.attention.self.{name}.weight", ("attention", name, "kernel"), "qkv"),
                      (f"{layer}.attention.self.{name}.bias", ("attention", name, "bias"), "qkv_bias")]
    per_layer += [(f"{layer}.attention.output.dense.weight", ("attention", "out", "kernel"), "out"),
                  (f"{layer}.attention.output.dense.bias", ("attention", "out", "bias"), "copy"),
                  *_norm(f"{layer}.attention.output.LayerNorm", ("attention_norm",)),
                  *_linear(f"{layer}.intermediate.dense", ("mlp", "in")),
                  *_linear(f"{layer}.output.dense", ("mlp", "out")),
                  *_norm(f"{layer}.output.LayerNorm", ("mlp_norm",))]
    return embeddings, per_layer


def _hf_shape(cfg: BertConfig, layout: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_LAYOUTS[layout][1](np.zeros(ours, np.float32), cfg).shape)


class _Converter:
    """Hugging Face tensor -> ours for `hf_folder.params_from_table`, by layout."""

    def __init__(self, cfg: BertConfig):
        self.cfg = cfg

    def __call__(self, array: np.ndarray, layout: str) -> np.ndarray:
        return _LAYOUTS[layout][0](array, self.cfg)

    def hf_shape(self, layout: str, ours: tuple[int, ...]) -> tuple[int, ...]:
        return _hf_shape(self.cfg, layout, ours)


# ------------------------------------------------------------------------------------------ import / export


def modern_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors with old TensorFlow-era LayerNorm names (gamma / beta) renamed to weight / bias."""
    def rename(name: str) -> str:
        if name.endswith("LayerNorm.gamma"):
            return name[:-len("gamma")] + "weight"
        if name.endswith("LayerNorm.beta"):
            return name[:-len("beta")] + "bias"
        return name
    return {rename(name): array for name, array in tensors.items()}


def detect_prefix(tensors: Mapping[str, np.ndarray], source: str = "checkpoint") -> str:
    """'bert.' or '': where the encoder's tensors are in this checkpoint."""
    for prefix in PREFIXES:
        if prefix + "embeddings.word_embeddings.weight" in tensors:
            return prefix
    raise CheckpointFormatError(
        f"{source}: no BERT encoder found (neither 'bert.embeddings.word_embeddings.weight' nor "
        f"'embeddings.word_embeddings.weight'); first tensor names: {sorted(tensors)[:8]}")


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: BertConfig, source: str = "checkpoint") -> dict:
    """jaxalign parameters (float32 NumPy arrays) from Hugging Face tensors, every shape checked against `cfg`.

    Raises:
      CheckpointFormatError: naming `source` and the tensor, when one is missing or of the wrong shape, or when an
        encoder tensor is left unused (the config and the checkpoint disagree, e.g. on the number of layers).
    """
    tensors = modern_names(tensors)
    prefix = detect_prefix(tensors, source)
    embeddings, per_layer = _tensor_table()
    params, used = hf_folder.params_from_table(tensors, prefix, layers.shapes(bert.param_specs(cfg)), embeddings,
                                               per_layer, cfg.num_layers, _Converter(cfg), source)

    # position_ids is a non-persistent buffer that older checkpoints still carry.
    unused = sorted(name for name in tensors if name not in used and not name.endswith("position_ids")
                    and name.startswith(tuple(prefix + root for root in _ENCODER_ROOTS)))
    if unused:
        raise CheckpointFormatError(f"{source}: {len(unused)} encoder tensor(s) do not fit the config "
                                    f"(num_layers={cfg.num_layers}): {unused[:8]}")
    return params


def params_to_hf(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
    """Hugging Face `BertModel` tensors (float32, no prefix) from jaxalign parameters."""
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    want = jax.tree.map(lambda s: tuple(s.shape), layers.shapes(bert.param_specs(cfg)))
    if got != want:
        raise ValueError("params do not match the BertConfig's parameter shapes; export the params that were "
                         "built for this config")
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
    embeddings, per_layer = _tensor_table()
    tensors = {name: _LAYOUTS[layout][1](_get(host, path), cfg) for name, path, layout in embeddings}
    for name, path, layout in per_layer:
        stacked = _get(host["layers"], path)
        for i in range(cfg.num_layers):
            tensors[name.format(i=i)] = _LAYOUTS[layout][1](stacked[i], cfg)
    return {name: np.ascontiguousarray(array, np.float32) for name, array in tensors.items()}


def load(folder: str, dtype: str = "float32") -> tuple[BertConfig, dict]:
    """(config, float32 NumPy parameters) of the BERT encoder in a Hugging Face snapshot folder.

    Args:
      folder: holds config.json and model.safetensors (or an index with shards).
      dtype: the compute dtype recorded in the returned config; parameters stay float32.
    Raises:
      CheckpointFormatError: a file is missing, the config is not a BERT encoder, or a tensor is missing or has
        the wrong shape (the message names the file and the tensor).
    """
    cfg = config_from_hf(hf_folder.read_config(folder), dtype, source=f"{folder}/{hf_folder.CONFIG_FILE}")
    files = hf_folder.weight_files(folder)
    source = files[0] if len(files) == 1 else f"{folder} ({len(files)} safetensors shards)"
    return cfg, params_from_hf(hf_folder.read_tensors(folder), cfg, source)


def export(folder: str, cfg: BertConfig, params: dict) -> None:
    """Writes config.json and model.safetensors that `transformers.BertModel.from_pretrained(folder,
    add_pooling_layer=False)` loads (there is no pooler to write). Copy the tokenizer files alongside yourself."""
    hf_folder.write_folder(folder, config_to_hf(cfg), params_to_hf(params, cfg))
