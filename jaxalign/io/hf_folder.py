"""Reading and writing Hugging Face snapshot folders without torch: `config.json` and safetensors files.

A snapshot folder holds `config.json`, either `model.safetensors` or `model.safetensors.index.json` with shards,
and usually `tokenizer.json`. Nothing here touches the network.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointFormatError(ValueError):
    """A snapshot folder is missing a file, names an unknown architecture, or holds a tensor of the wrong shape."""


def read_config(folder: str) -> dict:
    """The parsed `config.json` of a snapshot folder; a clear error when it is missing or not JSON."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder):
        raise CheckpointFormatError(f"{folder}: not a folder (expected a Hugging Face snapshot folder)")
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: missing; a Hugging Face snapshot folder needs config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointFormatError(f"{path}: not valid JSON ({error})") from error


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a snapshot: the single file, or every shard named by the index."""
    single = os.path.join(folder, SINGLE_WEIGHTS_FILE)
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointFormatError(f"{index}: has no 'weight_map'")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise CheckpointFormatError(f"{index}: names shard(s) that are missing from {folder}: {missing}")
        return [os.path.join(folder, s) for s in shards]
    raise CheckpointFormatError(
        f"{folder}: no weights found; expected {SINGLE_WEIGHTS_FILE} or {INDEX_FILE} (pytorch_model.bin is not "
        "supported: convert it to safetensors)")


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a snapshot as float32 / integer NumPy arrays, keyed by their Hugging Face names.

    bfloat16 tensors are widened to float32 (NumPy has no bfloat16 of its own).
    """
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(folder):
        try:
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    array = np.asarray(f.get_tensor(name))
                    if array.dtype.kind == "V" or str(array.dtype) == "bfloat16":
                        array = array.astype(np.float32)
                    tensors[name] = array
        except Exception as error:  # safetensors raises its own types for truncated or corrupt files
            if isinstance(error, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"{path}: cannot be read as safetensors ({error})") from error
    return tensors


def take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], source: str = "") -> np.ndarray:
    """One tensor by Hugging Face name, checked against the shape the config implies."""
    if name not in tensors:
        raise CheckpointFormatError(f"{source or 'checkpoint'}: tensor {name!r} is missing")
    array = tensors[name]
    if tuple(array.shape) != tuple(shape):
        raise CheckpointFormatError(
            f"{source or 'checkpoint'}: tensor {name!r} has shape {tuple(array.shape)}, the config implies {tuple(shape)}")
    return array


def write_folder(folder: str, config: dict, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `config.json` and `model.safetensors` (float32 unless a tensor is already another dtype)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    contiguous = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    save_file(contiguous, os.path.join(folder, SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})
