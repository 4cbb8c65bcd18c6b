"""Saving and loading memory banks: raw array files plus a manifest, written atomically, verified on load.

A saved bank (format version 2) is a folder with one sub-folder per shard of the bank that holds real rows:

    manifest.json              format, count, key_dim, key dtype, metric, encoder fingerprint, values structure,
                               and per shard: its first row, its row count and, for every file, shape, dtype,
                               size in bytes and sha256
    shards/00000/keys.bin      [rows, key_dim] raw little-endian bytes of the keys (any dtype, bfloat16 included)
    shards/00000/ids.bin       [rows] int32
    shards/00000/values/NAME.bin  one file per value array (the manifest records the pytree structure)
    shards/00001/...

Only the real rows are written (no padding); concatenated in shard order they are the bank's rows in increasing
id order. Each process writes the shards its devices hold, so no host gathers the bank; only the small file
checksums go to process 0, which writes the manifest once every shard is written. The folder is written to a
temporary sibling and renamed into place, so a crash never leaves a half-written bank under the final name (on
several processes the folder must be on a file system they all see).

Folders may be local or `gs://` / `s3://` URIs: every file goes through `etils.epath`. On an object store a rename
copies each object, so there the swap into place is not atomic (a crash mid-rename leaves a partial folder, which
the manifest's checksums then refuse to load).

Loading puts the bank on any mesh, whatever the number of processes or devices that saved it: each process
reads only the rows its devices hold, from whichever shard files contain them, after checking those files' size
and sha256 (a damaged file is refused, naming it, on every process). Version 1 folders (keys.bin, ids.bin and
values/ at the top, written by earlier versions) load the same way, as a bank of one shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxalign import paths, sharding
from jaxalign.memory import bank as bank_lib

PyTree = Any
FORMAT = "jaxalign-memory-bank"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
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
    arrays[name] = values
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


def _file_size(path: epath.Path) -> int:
    # Seeking to the end works on every epath backend; `stat()` of a local file also looks up its owner's name.
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        return handle.tell()


def _write_array(path: epath.Path, array: np.ndarray) -> dict:
    """Writes raw bytes, flushed to disk; returns the manifest entry (shape, dtype, bytes, sha256)."""
    array = np.ascontiguousarray(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(array.tobytes())
        handle.flush()
        try:
            descriptor = handle.fileno()
        except (AttributeError, OSError):  # an object store's file: written for good when closed
            descriptor = None
        if descriptor is not None:
            os.fsync(descriptor)
    return {"shape": list(array.shape), "dtype": array.dtype.name, "bytes": array.nbytes, "sha256": _sha256(path)}


def _allgather_json(item: Any) -> list:
    """Every process's JSON-serialisable `item`, in process order (a few kilobytes: checksums, never rows)."""
    if jax.process_count() == 1:
        return [item]
    raw = np.frombuffer(json.dumps(item).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(raw.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(every[process, :size].tobytes()) for process, size in enumerate(sizes)]


def _local_blocks(array: jax.Array) -> dict[int, np.ndarray]:
    """Shard number -> this process's block [rows per shard, ...] of a row-sharded bank array."""
    per_shard = array.shape[0] // bank_lib._shard_count(array.sharding.mesh)
    return {(shard.index[0].start or 0) // per_shard: np.asarray(shard.data)
            for shard in array.addressable_shards if shard.replica_id == 0}


def save_bank(bank: bank_lib.MemoryBank, directory: str | os.PathLike, *, fingerprint: str,
              extra: dict | None = None) -> pathlib.Path | epath.Path:
    """Writes `bank` (real rows only) to `directory`, replacing it atomically if it exists. Collective: every
    process calls it and writes the shards its devices hold; process 0 writes the manifest.

    Args:
      bank: the bank to save.
      directory: destination folder (on a file system every process sees, or a gs:// URI).
      fingerprint: `encoder_fingerprint(...)` of the encoder that made the keys (any string for keys from
        elsewhere); `load_bank` compares it.
      extra: JSON-serialisable notes stored in the manifest (dataset name, date ...).
    Returns:
      The folder written: a `pathlib.Path` for a local folder, an `epath.Path` for an object-store URI.
    """
    directory = epath.Path(directory)
    arrays = {"keys.bin": bank.keys, "ids.bin": bank.ids}
    structure = _structure(bank.values, "", arrays)
    token = uuid.uuid4().hex[:8]
    if jax.process_count() > 1:  # every process writes into the same staging folder
        token = f"{int(multihost_utils.broadcast_one_to_all(np.int32(int(token, 16) >> 1))):08x}"
    staging = directory.parent / f".{directory.name}.tmp-{token}"
    rows_per_shard = bank.capacity // bank_lib._shard_count(bank.mesh)
    try:
        blocks = {name: _local_blocks(array) for name, array in arrays.items()}
        written = []
        for shard, ids in sorted(blocks["ids.bin"].items()):
            rows = int((ids >= 0).sum())
            if rows == 0:
                continue
            if not (ids[:rows] >= 0).all():
                raise ValueError(f"save_bank: shard {shard} has padding rows before real rows; the bank's layout "
                                 f"is broken")
            folder = f"shards/{shard:05d}"
            files = {name: _write_array(staging / folder / name, blocks[name][shard][:rows]) for name in arrays}
            written.append({"folder": folder, "row_start": shard * rows_per_shard, "rows": rows, "files": files})
        shards = sorted((entry for part in _allgather_json(written) for entry in part),
                        key=lambda entry: entry["row_start"])
        if jax.process_index() == 0:
            count = sum(entry["rows"] for entry in shards)
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "count": count,
                        "key_dim": bank.key_dim, "key_dtype": jnp.dtype(bank.keys.dtype).name, "metric": bank.metric,
                        "encoder_fingerprint": fingerprint, "values": structure, "shards": shards,
                        "extra": extra or {}}
            staging.mkdir(parents=True, exist_ok=True)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if directory.exists():  # swap: the old bank stays whole until the new one is in place
                retired = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
                directory.rename(retired)
                staging.rename(directory)
                retired.rmtree()
            else:
                staging.rename(directory)
    finally:
        if jax.process_index() == 0 and staging.exists():
            staging.rmtree()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"memory bank saved to {directory}")
    return directory if paths.is_remote(directory) else pathlib.Path(directory)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a saved bank, with a clear error when it is missing or not a bank's manifest."""
    path = epath.Path(directory) / MANIFEST
    if not path.is_file():
        raise MemoryBankFileError(f"{path} not found: {directory} is not a saved memory bank (save one with "
                                  f"save_bank or `jaxalign build-memory`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MemoryBankFileError(f"{path} is not valid JSON ({error}); the bank is damaged, rebuild it") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise MemoryBankFileError(f"{path}: format {manifest.get('format')!r} version "
                                  f"{manifest.get('format_version')!r}, expected {FORMAT!r} version "
                                  f"{' or '.join(map(str, READABLE_VERSIONS))}")
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
    directory = epath.Path(directory)
    manifest = read_manifest(directory)
    if fingerprint is not None and manifest["encoder_fingerprint"] != fingerprint:
        raise MemoryBankFileError(
            f"{directory}: encoder fingerprint mismatch: the bank was built with "
            f"{manifest['encoder_fingerprint']!r}, the queries come from {fingerprint!r}; rebuild the bank with this "
            f"encoder or load the matching one")
    if key_dim is not None and manifest["key_dim"] != key_dim:
        raise MemoryBankFileError(f"{directory}: key dimension mismatch: the bank's keys are {manifest['key_dim']} "
                                  f"wide, the queries are {key_dim} wide")
    pieces = _pieces(manifest)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    count = int(manifest["count"])
    capacity = bank_lib.padded_capacity(count, mesh)
    per_shard = capacity // bank_lib._shard_count(mesh)
    indices = bank_lib.row_sharding(mesh, 1).addressable_devices_indices_map((capacity,))
    local = {device: (index[0].start or 0) // per_shard for device, index in indices.items()}
    # The pieces (saved shards) that overlap the rows of this process's devices; only their files are read.
    needed = [piece for piece in pieces
              if any(piece["row_start"] < (shard + 1) * per_shard and shard * per_shard < piece["row_start"]
                     + piece["rows"] for shard in local.values())]
    error = None
    try:
        for piece in needed:
            _check_piece(directory, piece, manifest)
    except MemoryBankFileError as found:
        error = found
    _raise_on_every_process(error, directory)

    def load_array(name: str) -> jax.Array:
        entry = pieces[0]["files"][name]
        dtype, row_shape = jnp.dtype(entry["dtype"]), tuple(entry["shape"][1:])
        row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        blocks = []
        for device, shard in local.items():
            block = np.full((per_shard,) + row_shape, -1 if name == "ids.bin" else 0, dtype)
            first, stop = shard * per_shard, (shard + 1) * per_shard
            for piece in needed:
                start, end = max(first, piece["row_start"]), min(stop, piece["row_start"] + piece["rows"])
                if start < end:
                    with (directory / piece["prefix"] / name).open("rb") as handle:
                        handle.seek((start - piece["row_start"]) * row_bytes)
                        rows = np.frombuffer(handle.read((end - start) * row_bytes), dtype=dtype)
                    block[start - first:end - first] = rows.reshape((end - start,) + row_shape)
            blocks.append(jax.device_put(block, device))
        return jax.make_array_from_single_device_arrays((capacity,) + row_shape,
                                                        bank_lib.row_sharding(mesh, 1 + len(row_shape)), blocks)

    names = list(pieces[0]["files"]) if pieces else []
    arrays = {name: load_array(name) for name in names}
    values = _rebuild(manifest["values"], arrays)
    return bank_lib.MemoryBank(keys=arrays["keys.bin"], ids=arrays["ids.bin"], values=values,
                               metric=metric or manifest["metric"], mesh=mesh)


def _pieces(manifest: dict) -> list[dict]:
    """The saved shards: [{'prefix', 'row_start', 'rows', 'files'}] in row order (version 1: one shard)."""
    if manifest["format_version"] == 1:
        return [{"prefix": ".", "row_start": 0, "rows": int(manifest["count"]), "files": manifest["files"]}]
    return [{"prefix": entry["folder"], "row_start": int(entry["row_start"]), "rows": int(entry["rows"]),
             "files": entry["files"]} for entry in manifest["shards"]]


def _check_piece(directory: epath.Path, piece: dict, manifest: dict) -> None:
    """Refuses a saved shard whose files are missing, of the wrong size or shape, or whose sha256 differs."""
    for name, entry in piece["files"].items():
        path = directory / piece["prefix"] / name
        if not path.is_file():
            raise MemoryBankFileError(f"{path} is missing (listed in {MANIFEST}); the bank is incomplete")
        size = _file_size(path)
        if size != entry["bytes"]:
            raise MemoryBankFileError(f"{path} is truncated or padded: {size} bytes, the manifest says "
                                      f"{entry['bytes']}; the bank is damaged, rebuild or re-copy it")
        if entry["shape"][0] != piece["rows"] or (name == "keys.bin" and entry["shape"][1:] != [manifest["key_dim"]]):
            raise MemoryBankFileError(f"{path} holds {tuple(entry['shape'])}, the manifest says {piece['rows']} rows"
                                      f"{' of width ' + str(manifest['key_dim']) if name == 'keys.bin' else ''}")
        if _sha256(path) != entry["sha256"]:
            raise MemoryBankFileError(f"{path} is corrupted: its sha256 differs from the manifest's; the bank is "
                                      f"damaged, rebuild or re-copy it")


def _raise_on_every_process(error: MemoryBankFileError | None, directory: epath.Path) -> None:
    """Raises `error` here, and an error on the other processes too, so that none goes on to wait for it."""
    if jax.process_count() > 1:
        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        if error is None and failed.any():
            raise MemoryBankFileError(f"{directory}: process(es) {np.flatnonzero(failed).tolist()} found a damaged "
                                      f"or missing file (their logs name it); the bank is damaged, rebuild or "
                                      f"re-copy it")
    if error is not None:
        raise error
