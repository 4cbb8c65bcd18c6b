"""Saving and loading memory banks: raw array files plus a manifest, written atomically, verified on load.

A saved bank is a folder:

    manifest.json   format, count, key_dim, dtypes and shapes, metric, encoder fingerprint, and for every file
                    its size in bytes and sha256
    keys.bin        [count, key_dim] raw little-endian bytes of the keys (any dtype, bfloat16 included)
    ids.bin         [count] int32
    values/NAME.bin one file per value array; the manifest records the pytree structure (dicts, lists, tuples)

Only the real rows are written (no padding), in increasing id order. The folder is written to a temporary
sibling and renamed into place, so a crash never leaves a half-written bank under the final name. Loading
checks the fingerprint and dimensions the caller expects, then every file's size and sha256, before any array
is built: a truncated or corrupted bank is refused, never half-loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxalign.memory import bank as bank_lib

PyTree = Any
FORMAT = "jaxalign-memory-bank"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class MemoryBankFileError(ValueError):
    """A saved memory bank is missing, damaged, or does not match what the caller expects."""


def encoder_fingerprint(name: str, params: PyTree = None, config: Any = None) -> str:
    """A short stable hash of an encoder: its name, its config and the bytes of its parameters.

    Banks record it so that a bank is never searched with queries from a different encoder.

    Args:
      name: the encoder's name (for example a Hugging Face folder name).
      params: its parameter pytree (hashed leaf by leaf, with paths, shapes and dtypes), or None.
      config: anything JSON-serialisable describing it (dicts, dataclass fields), or None.
    """
    digest = hashlib.sha256(name.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return f"{name}:{digest.hexdigest()[:16]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _structure(values: PyTree, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON description of a values pytree; fills `arrays` with file name -> array."""
    if values is None:
        return None
    if isinstance(values, dict):
        return {"dict": {str(key): _structure(value, f"{prefix}{key}.", arrays) for key, value in values.items()}}
    if isinstance(values, (list, tuple)):
        kind = "list" if isinstance(values, list) else "tuple"
        return {kind: [_structure(value, f"{prefix}{index}.", arrays) for index, value in enumerate(values)]}
    # File names keep only safe characters (dict keys may hold '/' or spaces); a clash gets a numeric suffix.
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", prefix.rstrip(".")) or "value"
    name, copy = f"values/{stem}.bin", 1
    while name in arrays:
        name, copy = f"values/{stem}-{copy}.bin", copy + 1
    arrays[name] = np.asarray(values)
    return {"array": name}


def _rebuild(structure: Any, arrays: dict[str, np.ndarray]) -> PyTree:
    if structure is None:
        return None
    if "dict" in structure:
        return {key: _rebuild(value, arrays) for key, value in structure["dict"].items()}
    if "list" in structure:
        return [_rebuild(value, arrays) for value in structure["list"]]
    if "tuple" in structure:
        return tuple(_rebuild(value, arrays) for value in structure["tuple"])
    return arrays[structure["array"]]


def save_bank(bank: bank_lib.MemoryBank, directory: str | os.PathLike, *, fingerprint: str,
              extra: dict | None = None) -> Path:
    """Writes `bank` (real rows only) to `directory`, replacing it atomically if it exists.

    Args:
      bank: the bank to save.
      directory: destination folder.
      fingerprint: `encoder_fingerprint(...)` of the encoder that made the keys (any string for keys from
        elsewhere); `load_bank` compares it.
      extra: JSON-serialisable notes stored in the manifest (dataset name, date ...).
    Returns:
      The folder written. On several processes only process 0 writes; every process gathers the rows.
    """
    directory = Path(directory)
    all_ids = bank_lib._to_host(bank.ids)
    real = all_ids >= 0
    arrays = {"keys.bin": bank_lib._to_host(bank.keys)[real], "ids.bin": all_ids[real].astype(np.int32)}
    structure = _structure(jax.tree.map(lambda leaf: bank_lib._to_host(leaf)[real], bank.values), "", arrays)
    if jax.process_index() != 0:
        return directory
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    (staging / "values").mkdir(parents=True)
    try:
        files = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            with open(staging / name, "wb") as handle:
                handle.write(array.tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            files[name] = {"shape": list(array.shape), "dtype": array.dtype.name, "bytes": array.nbytes,
                           "sha256": _sha256(staging / name)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "count": int(real.sum()),
                    "key_dim": bank.key_dim, "key_dtype": arrays["keys.bin"].dtype.name, "metric": bank.metric,
                    "encoder_fingerprint": fingerprint, "values": structure, "files": files, "extra": extra or {}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if directory.exists():  # swap: the old bank stays whole until the new one is in place
            retired = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(retired)
            staging.rename(directory)
            shutil.rmtree(retired)
        else:
            staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a saved bank, with a clear error when it is missing or not a bank's manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MemoryBankFileError(f"{path} not found: {directory} is not a saved memory bank (save one with "
                                  f"save_bank or `jaxalign build-memory`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MemoryBankFileError(f"{path} is not valid JSON ({error}); the bank is damaged, rebuild it") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise MemoryBankFileError(f"{path}: format {manifest.get('format')!r} version "
                                  f"{manifest.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION}")
    return manifest


def load_bank(directory: str | os.PathLike, *, mesh: Mesh | None = None, fingerprint: str | None = None,
              key_dim: int | None = None, metric: str | None = None) -> bank_lib.MemoryBank:
    """Loads a saved bank onto `mesh`, after checking it.

    Args:
      directory: folder written by `save_bank`.
      mesh: where to place the rows (default: all devices on 'data').
      fingerprint: the encoder fingerprint the caller's queries come from; refused if it differs.
      key_dim: the query width the caller will search with; refused if it differs.
      metric: search metric for the loaded bank (default: the saved one).
    Raises:
      MemoryBankFileError: missing manifest or file, fingerprint or dimension mismatch, or a file whose size
        or sha256 differs from the manifest (truncated or corrupted).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if fingerprint is not None and manifest["encoder_fingerprint"] != fingerprint:
        raise MemoryBankFileError(
            f"{directory}: encoder fingerprint mismatch: the bank was built with "
            f"{manifest['encoder_fingerprint']!r}, the queries come from {fingerprint!r}; rebuild the bank with this "
            f"encoder or load the matching one")
    if key_dim is not None and manifest["key_dim"] != key_dim:
        raise MemoryBankFileError(f"{directory}: key dimension mismatch: the bank's keys are {manifest['key_dim']} "
                                  f"wide, the queries are {key_dim} wide")
    arrays = {}
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise MemoryBankFileError(f"{path} is missing (listed in {MANIFEST}); the bank is incomplete")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise MemoryBankFileError(f"{path} is truncated or padded: {size} bytes, the manifest says "
                                      f"{entry['bytes']}; the bank is damaged, rebuild or re-copy it")
        if _sha256(path) != entry["sha256"]:
            raise MemoryBankFileError(f"{path} is corrupted: its sha256 differs from the manifest's; the bank is "
                                      f"damaged, rebuild or re-copy it")
        # jnp.dtype knows bfloat16 and the other ml_dtypes names that np.dtype does not.
        arrays[name] = np.fromfile(path, dtype=jnp.dtype(entry["dtype"])).reshape(entry["shape"])
    keys = arrays["keys.bin"]
    if keys.shape != (manifest["count"], manifest["key_dim"]):
        raise MemoryBankFileError(f"{directory}: keys.bin holds {keys.shape}, the manifest says "
                                  f"({manifest['count']}, {manifest['key_dim']})")
    return bank_lib.MemoryBank.from_arrays(keys, _rebuild(manifest["values"], arrays), arrays["ids.bin"],
                                           metric=metric or manifest["metric"], mesh=mesh)
