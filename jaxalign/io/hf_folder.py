"""Reading and writing Hugging Face snapshot folders without torch: `config.json` and safetensors files.

A snapshot folder holds `config.json`, either `model.safetensors` or `model.safetensors.index.json` with shards,
and usually `tokenizer.json`. Nothing here touches the network.

Two ways to read weights: `read_tensors` reads every tensor whole (float32 on the host); `SnapshotReader` with
`TensorRecipe`s reads lazily, only the slices asked for, in the stored dtype, and `load_sharded` builds global
arrays over a mesh from it, each device's shard read alone (what a real, bfloat16, multi-host model needs).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from jaxalign import sharding

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


def tree_get(tree: dict, path: tuple[str, ...]) -> Any:
    """`tree[path[0]][path[1]]...` (a KeyError names the first missing key)."""
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Sets `tree[path[0]]...[path[-1]] = value`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_table(tensors: Mapping[str, np.ndarray], prefix: str, expected: dict, top: list, per_layer: list,
                      num_layers: int, convert: Any, source: str) -> tuple[dict, set[str]]:
    """Parameters from a table of (Hugging Face name, our path, layout) entries: `top` ones once, `per_layer` ones
    (names with `{i}`) once per layer, stacked on a leading layer axis under 'layers'.

    `expected` is our parameter shapes (`layers.shapes(param_specs(cfg))`); `convert(array, layout)` turns a
    checked Hugging Face tensor into ours and `hf_shape(layout, our shape)`, its `hf_shape` attribute, gives the
    Hugging Face shape to check against. Returns (params, the Hugging Face names used), so the caller can refuse
    tensors the config left unused."""
    params: dict = {}
    used: set[str] = set()

    def read(name: str, layout: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        array = take(tensors, name, convert.hf_shape(layout, shape), source)
        return np.asarray(convert(np.asarray(array, np.float32), layout))

    for name, path, layout in top:
        tree_set(params, path, read(prefix + name, layout, tree_get(expected, path).shape))
    for name, path, layout in per_layer:
        shape = tree_get(expected["layers"], path).shape[1:]
        tree_set(params, ("layers", *path),
                 np.stack([read(prefix + name.format(i=i), layout, shape) for i in range(num_layers)]))
    return params, used


def write_folder(folder: str, config: dict, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `config.json` and `model.safetensors` (float32 unless a tensor is already another dtype)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    contiguous = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    save_file(contiguous, os.path.join(folder, SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ lazy, sliced reading


class SnapshotReader:
    """Lazy access to a snapshot's tensors: names and shapes from the safetensors headers, data only when a slice
    is asked for, in the dtype it is stored in (bfloat16 stays `ml_dtypes.bfloat16`, never widened).

    Use as a context manager (the files stay memory-mapped while it is open):

        with SnapshotReader(folder) as reader:
            block = reader.read("model.layers.0.mlp.up_proj.weight", (slice(0, 64), slice(None)))
    """

    def __init__(self, folder: str):
        import ml_dtypes  # noqa: F401  (registers 'bfloat16' with NumPy, which safetensors' numpy slices need)

        self.folder = folder
        self.files = weight_files(folder)
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        for path in self.files:
            for name in self._open(path).keys():
                self._file_of[name] = path
        self.source = self.files[0] if len(self.files) == 1 else f"{folder} ({len(self.files)} safetensors shards)"

    def _open(self, path: str):
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as error:  # safetensors raises its own types for truncated or corrupt files
                raise CheckpointFormatError(f"{path}: cannot be read as safetensors ({error})") from error
        return self._handles[path]

    def __enter__(self) -> "SnapshotReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def __iter__(self):
        return iter(self._file_of)

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def _slice(self, name: str):
        if name not in self._file_of:
            raise CheckpointFormatError(f"{self.source}: tensor {name!r} is missing")
        return self._open(self._file_of[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of a tensor (read from the header; no data is read)."""
        return tuple(int(d) for d in self._slice(name).get_shape())

    def stored_dtype(self, name: str) -> np.dtype:
        """The dtype a tensor is stored in (bfloat16 as `ml_dtypes.bfloat16`); no data is read."""
        return _numpy_dtype(self._slice(name).get_dtype(), f"{self.source}: tensor {name!r}")

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` (one slice per dimension) of tensor `name`, in its stored dtype; only it is read."""
        block = self._slice(name)[tuple(index)] if index else self._slice(name)[:]
        return np.asarray(block)


@dataclasses.dataclass(frozen=True)
class TensorRecipe:
    """How one jaxalign parameter is made from Hugging Face tensors, so any slice of it can be read alone.

    The parameter (one layer of it, when stacked) is `hf.transpose(perm).reshape(layer_shape)`, where `hf` is
    rows `row_offset : row_offset + hf_shape[0]` of the named tensor (the offset picks q / k / v out of a packed
    in_proj tensor). `perm` is identity for biases and norms, (1, 0) for nn.Linear weights [out, in].

    Attributes:
      names: one Hugging Face tensor name, or one per layer for a stacked parameter (layer i reads names[i]).
      shape: the jaxalign parameter's shape, with the leading layer axis when stacked.
      hf_shape: the shape of the region of each Hugging Face tensor that is used.
      perm: the transpose applied to the Hugging Face tensor before the reshape.
      stacked: whether axis 0 of `shape` is the layer axis over `names`.
      row_offset: first row of the region on axis 0 of the Hugging Face tensor.
      stored_shape: the whole Hugging Face tensor's shape when the region is part of it (None: `hf_shape`).
    """

    names: tuple[str, ...]
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    perm: tuple[int, ...]
    stacked: bool = False
    row_offset: int = 0
    stored_shape: tuple[int, ...] | None = None

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape


def _reshape_blocks(source: tuple[int, ...], target: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Groups of (source axes, target axes) of a C-order reshape whose sizes multiply to the same number."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(source) and j < len(target):
        axes_in, axes_out, size_in, size_out = [i], [j], source[i], target[j]
        i, j = i + 1, j + 1
        while size_in != size_out:
            if size_in < size_out:
                axes_in.append(i)
                size_in *= source[i]
                i += 1
            else:
                axes_out.append(j)
                size_out *= target[j]
                j += 1
        blocks.append((axes_in, axes_out))
    if blocks:  # trailing size-1 axes join the last group
        blocks[-1][0].extend(range(i, len(source)))
        blocks[-1][1].extend(range(j, len(target)))
    return blocks


def _covering_read(transposed_shape: tuple[int, ...], shape: tuple[int, ...], index: tuple[slice, ...]
                   ) -> tuple[list[slice], list[int], list[slice]]:
    """What to read of `transposed` so that `transposed.reshape(shape)[index]` can be made from it.

    Returns (slices of the transposed tensor to read, the shape that block reshapes to, the index into that
    shape). The read block is exact where the reshape keeps the sliced dimension contiguous (a slice of heads of
    an [E, H * D] kernel); otherwise it covers the request and the rest is cut after the reshape.
    """
    read = [slice(None)] * len(transposed_shape)
    covering: list[int] = []
    residual: list[slice] = []
    for axes_in, axes_out in _reshape_blocks(transposed_shape, shape):
        wanted = [index[a] for a in axes_out]
        sizes_out = [shape[a] for a in axes_out]
        while len(axes_in) > 1 and transposed_shape[axes_in[0]] == 1:  # size-1 axes read as they are
            axes_in = axes_in[1:]
        if len(axes_in) == 1:  # one axis split into several (or kept): rows of the first target axis are exact
            inner = int(np.prod(sizes_out[1:], dtype=np.int64))
            first = wanted[0]
            read[axes_in[0]] = slice(first.start * inner, first.stop * inner)
            covering += [first.stop - first.start, *sizes_out[1:]]
            residual += [slice(None), *wanted[1:]]
        elif len(axes_out) == 1:  # several axes merged into one: whole rows of the first source axis
            inner = int(np.prod([transposed_shape[a] for a in axes_in[1:]], dtype=np.int64))
            first_row, end_row = wanted[0].start // inner, -(-wanted[0].stop // inner)
            read[axes_in[0]] = slice(first_row, end_row)
            covering.append((end_row - first_row) * inner)
            residual.append(slice(wanted[0].start - first_row * inner, wanted[0].stop - first_row * inner))
        else:  # a reshape that both splits and merges: read the whole group, cut afterwards
            covering += sizes_out
            residual += wanted
    return read, covering, residual


def read_recipe(reader: SnapshotReader, recipe: TensorRecipe, index: tuple[slice, ...] | None = None,
                dtype: Any = None) -> np.ndarray:
    """The block `index` (None: all) of the parameter `recipe` describes, reading only the Hugging Face slices it
    needs; cast per block to `dtype` (None: as stored)."""
    full = tuple(slice(0, d) for d in recipe.shape)
    index = full if index is None else tuple(
        slice(*s.indices(d)[:2]) for s, d in zip(tuple(index) + full[len(tuple(index)):], recipe.shape))
    layers, index = (range(index[0].start, index[0].stop), index[1:]) if recipe.stacked else ((0,), index)
    transposed_shape = tuple(recipe.hf_shape[p] for p in recipe.perm)
    read, covering, residual = _covering_read(transposed_shape, recipe.layer_shape, index)
    hf_index = [slice(None)] * len(recipe.hf_shape)
    for axis_transposed, axis_hf in enumerate(recipe.perm):
        hf_index[axis_hf] = read[axis_transposed]
    hf_index = [slice(*s.indices(d)[:2]) for s, d in zip(hf_index, recipe.hf_shape)]
    if hf_index:
        hf_index[0] = slice(hf_index[0].start + recipe.row_offset, hf_index[0].stop + recipe.row_offset)
    blocks = []
    for layer in layers:
        block = reader.read(recipe.names[layer], tuple(hf_index)).transpose(recipe.perm)
        block = block.reshape(covering)[tuple(residual)]
        blocks.append(block if dtype is None else block.astype(dtype, copy=False))
    return np.stack(blocks) if recipe.stacked else blocks[0]


def check_recipe(reader: SnapshotReader, recipe: TensorRecipe) -> None:
    """Raises CheckpointFormatError naming a tensor the recipe needs that is missing or of the wrong shape (only
    headers are read)."""
    expected = recipe.stored_shape if recipe.stored_shape is not None else recipe.hf_shape
    for name in recipe.names:
        if reader.shape(name) != tuple(expected):
            raise CheckpointFormatError(f"{reader.source}: tensor {name!r} has shape {reader.shape(name)}, the "
                                        f"config implies {tuple(expected)}")


def load_sharded(reader: SnapshotReader, recipes: Any, axes: Any, mesh: Any, dtype: Any = None) -> Any:
    """Global arrays laid out over `mesh` by their logical `axes`, each device's shard read alone from disk.

    Args:
      reader: the open snapshot.
      recipes: a pytree of `TensorRecipe` (the parameter tree of the model).
      axes: the matching pytree of logical PartitionSpecs (`vit.logical_axes(cfg)`, `decoder.logical_axes(cfg)`).
      mesh: the ('data', 'fsdp', 'tensor') mesh; only this process's devices' shards are read.
      dtype: the parameters' dtype (None: as stored); a float32 checkpoint loaded as bfloat16 is cast per shard.
    """
    is_recipe = lambda x: isinstance(x, TensorRecipe)  # noqa: E731
    shardings = sharding.param_shardings(recipes, axes, mesh)

    def one(recipe: TensorRecipe, target_sharding) -> Any:
        out_dtype = np.dtype(dtype) if dtype is not None else reader.stored_dtype(recipe.names[0])
        return sharding.array_from_blocks(
            recipe.shape, target_sharding, lambda index: read_recipe(reader, recipe, index, out_dtype))

    return jax.tree.map(one, recipes, shardings, is_leaf=is_recipe)


def _numpy_dtype(safetensors_dtype: str, what: str) -> np.dtype:
    import ml_dtypes

    known = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    if safetensors_dtype not in known:
        raise CheckpointFormatError(f"{what} is stored as {safetensors_dtype}; jaxalign loads parameters stored as "
                                    f"{', '.join(known)}")
    return np.dtype(known[safetensors_dtype])
