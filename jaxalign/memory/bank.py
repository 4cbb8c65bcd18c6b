"""The memory bank: keys, values and ids sharded row-wise over every device of the mesh, searched in `jit`.

A `MemoryBank` is a pytree (its arrays are leaves, the metric and mesh are static), so it is passed into a
jitted training step as an ordinary argument and searched there:

    bank = MemoryBank.from_arrays(keys, values={"tokens": tokens}, ids=ids, metric="cosine", mesh=mesh)
    result = bank.search(queries, k=10, exclude_ids=batch_ids)     # inside or outside jax.jit
    result.ids, result.scores, result.values["tokens"]             # [B, k], [B, k], [B, k, ...]

Layout. Rows are stored in increasing id order (this is what makes ties go to the lower id, see `knn.py`) and
padded at the end to a multiple of the device count; padding rows have id -1 and are never returned. The rows
are split into contiguous blocks over the mesh axes of the logical axis 'memory_rows' (all of them), so shard s
holds rows [s * R, (s + 1) * R).

Search. Each shard scans its rows in chunks with a running top-k (`knn.scan_top_k`); the shards' top-k lists
are all-gathered and merged, written with `jax.shard_map` because a top-k over a row-sharded score matrix left
to the compiler gathers the whole matrix. Queries are replicated into the search (a batch of queries is small
next to the bank), so the caller's queries may carry any sharding. Values are gathered the same way: each shard
contributes the rows it owns and a `psum` assembles them.

Updates (`add`, `replace_rows`) return a new bank and never re-encode anything: they only move rows on device.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import sharding
from jaxalign.memory import knn, knn_pallas

PyTree = Any
ROW_AXES: tuple[str, ...] = sharding.LOGICAL_AXIS_RULES["memory_rows"]
_ROW_MULTIPLE = 8  # rows per shard are rounded up to this, so small adds often keep the same shapes


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What `MemoryBank.search` returns. Slots with no qualifying row have score -inf and id / row -1.

    Attributes:
      scores: float32 [batch, k], best first (higher is better; -squared distance for 'l2').
      ids: int32 [batch, k] ids of the neighbours.
      rows: int32 [batch, k] storage rows of the neighbours (for `MemoryBank.gather_values`).
      values: the bank's values pytree with leaves [batch, k, ...], or None when not asked for.
    """
    scores: jax.Array
    ids: jax.Array
    rows: jax.Array
    values: PyTree = None


jax.tree_util.register_dataclass(SearchResult, data_fields=["scores", "ids", "rows", "values"], meta_fields=[])


def _row_spec(ndim: int) -> PartitionSpec:
    return PartitionSpec(ROW_AXES, *([None] * (ndim - 1)))


def row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """How a bank lays out an [rows, ...] array: rows split over every mesh axis."""
    return NamedSharding(mesh, _row_spec(ndim))


def _shard_count(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[axis] for axis in ROW_AXES]))


def padded_capacity(count: int, mesh: Mesh) -> int:
    """Rows stored for `count` real rows: a multiple of the shard count times `_ROW_MULTIPLE`."""
    granule = _shard_count(mesh) * _ROW_MULTIPLE
    return max(granule, -(-count // granule) * granule)


def _place(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (identical on every process) as a global array sharded by rows."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, row_sharding(mesh, array.ndim), lambda index: array[index])


def _to_host(array: jax.Array) -> np.ndarray:
    """The full array on this host, gathering from other processes when it is not all addressable here."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


@jax.jit
def _count_real_rows(ids: jax.Array) -> jax.Array:
    """Rows whose id is not the padding id -1 (a replicated scalar, whatever the ids' sharding)."""
    return jnp.sum(ids >= 0)


def _check_values(values: PyTree, rows: int, what: str) -> PyTree:
    for path, leaf in jax.tree_util.tree_flatten_with_path(values)[0]:
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] != rows:
            raise ValueError(f"{what}: value {jax.tree_util.keystr(path) or '(root)'} has shape {np.shape(leaf)}; "
                             f"every value array needs a leading axis of {rows} rows, one per key")
    return values


@dataclasses.dataclass(frozen=True)
class MemoryBank:
    """Keys [capacity, key_dim], ids [capacity] and values (pytree of [capacity, ...]) sharded by rows.

    Build one with `from_arrays`, `jaxalign.memory.build_bank` or `jaxalign.memory.load_bank`.
    Attributes `metric` ('cosine' | 'dot' | 'l2') and `mesh` are static pytree metadata.
    """
    keys: jax.Array
    ids: jax.Array
    values: PyTree
    metric: str = "cosine"
    mesh: Mesh | None = None

    # --------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_arrays(cls, keys: np.ndarray, values: PyTree = None, ids: np.ndarray | None = None, *,
                    metric: str = "cosine", mesh: Mesh | None = None) -> "MemoryBank":
        """A bank from host arrays (the same on every process).

        Args:
          keys: [N, key_dim] float array (its dtype is kept: float32 or bfloat16).
          values: pytree of [N, ...] arrays stored with each key, or None.
          ids: [N] distinct non-negative integers; defaults to 0..N-1.
          metric: similarity the bank is searched with by default.
          mesh: a `jaxalign.sharding.make_mesh` mesh; defaults to all devices on the 'data' axis.
        """
        knn.check_metric(metric)
        keys = np.asarray(keys)
        if keys.ndim != 2:
            raise ValueError(f"keys must be [rows, key_dim], got shape {keys.shape}")
        count = keys.shape[0]
        ids = np.arange(count, dtype=np.int32) if ids is None else np.asarray(ids)
        if ids.shape != (count,):
            raise ValueError(f"ids must be [{count}] (one per key row), got shape {ids.shape}")
        _check_ids(ids, "ids")
        values = _check_values(jax.tree.map(np.asarray, values), count, "from_arrays")
        mesh = mesh if mesh is not None else sharding.make_mesh()
        order = np.argsort(ids, kind="stable")
        capacity = padded_capacity(count, mesh)

        def layout(array, fill=0):
            padded = np.full((capacity,) + array.shape[1:], fill, dtype=array.dtype)
            padded[:count] = array[order]
            return _place(padded, mesh)

        return cls(keys=layout(keys), ids=layout(ids.astype(np.int32), fill=-1),
                   values=jax.tree.map(layout, values), metric=metric, mesh=mesh)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def key_dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def capacity(self) -> int:
        """Stored rows, padding included."""
        return int(self.keys.shape[0])

    def host_ids(self) -> np.ndarray:
        """The ids of the real rows, in storage order (increasing), on the host. Not for use inside jit."""
        ids = _to_host(self.ids)
        return ids[ids >= 0]

    @property
    def size(self) -> int:
        """Number of real rows: a count on the devices (no host gathers the ids); not for use inside jit."""
        return int(_count_real_rows(self.ids))

    # --------------------------------------------------------------------------------------------------- search
    def search(self, queries: jax.Array, k: int, *, metric: str | None = None, method: str = "auto",
               exclude_ids: jax.Array | None = None, recall_target: float = 0.95, rerank: bool = True,
               chunk_rows: int | None = None, with_values: bool = True) -> SearchResult:
        """The k best rows for each query, over all shards. Works inside `jax.jit`.

        Results are ordered best first; among equal scores the lower id comes first (for 'exact', and for
        'binned' with re-ranking, which return the same rows).

        Args:
          queries: [batch, key_dim].
          k: neighbours per query (at most `capacity`; slots beyond the real rows come back with id -1).
          metric: 'cosine' | 'dot' | 'l2'; defaults to the bank's metric.
          method: 'exact' | 'binned' | 'approx' | 'pallas' | 'auto' (see `knn.py`; auto: approx on TPU, else
            binned for large shards, exact for small; never 'pallas', which runs interpreted on CPU and has
            no measured speed on GPU / TPU yet: ask for it by name, see `knn_pallas.py`).
          exclude_ids: [batch] or [batch, excluded] ids that query may not retrieve (leave-one-out); -1 = none.
          recall_target: for 'approx', and for 'binned' with `rerank=False`: sets the bin count.
          rerank: for 'binned': re-rank the winning bins exactly (then 'binned' returns the exact top-k).
          chunk_rows: rows scored at once per shard; defaults to a score block of `knn.SCORE_BUDGET_BYTES`.
            For 'pallas': the kernel's key tile (rows per grid step), default `knn_pallas.default_config()`.
          with_values: also gather the neighbours' values ([batch, k, ...]).
        """
        metric = metric or self.metric
        knn.check_metric(metric)
        if queries.ndim != 2 or queries.shape[1] != self.key_dim:
            raise ValueError(f"queries must be [batch, {self.key_dim}], got shape {queries.shape}")
        if not 1 <= k <= self.capacity:
            raise ValueError(f"k={k} must be between 1 and the bank's capacity {self.capacity}")
        shards = _shard_count(self.mesh)
        local_rows = self.capacity // shards
        local_k = min(k, local_rows)
        method = knn.resolve_method(method, local_rows, local_k)
        if method != "pallas":  # the fused kernel picks its own tile unless told
            chunk_rows = chunk_rows or knn.chunk_rows_for(queries.shape[0], local_rows)
        if exclude_ids is not None:
            exclude_ids = jnp.asarray(exclude_ids, jnp.int32)
            if exclude_ids.shape[0] != queries.shape[0] or exclude_ids.ndim not in (1, 2):
                raise ValueError(f"exclude_ids must be [batch] or [batch, excluded] with batch "
                                 f"{queries.shape[0]}, got shape {exclude_ids.shape}")
        # One jitted program per setting: cached when called eagerly, inlined into the caller's jit.
        scores, ids, rows = _sharded_top_k(self, jnp.asarray(queries), exclude_ids, k=k, metric=metric,
                                           method=method, chunk_rows=chunk_rows, rerank=rerank,
                                           recall_target=recall_target)
        values = self.gather_values(rows) if with_values and self.values is not None else None
        return SearchResult(scores=scores, ids=ids, rows=rows, values=values)

    def gather_values(self, rows: jax.Array) -> PyTree:
        """Values of storage rows: pytree of [*rows.shape, ...]; rows of -1 give zeros. Works inside jit."""
        return _gather_rows(self, rows)

    def _gather_values(self, rows: jax.Array) -> PyTree:
        local_rows = self.capacity // _shard_count(self.mesh)

        def local_gather(values, wanted):
            start = jax.lax.axis_index(ROW_AXES) * local_rows
            local = wanted - start
            owned = (wanted >= 0) & (local >= 0) & (local < local_rows)
            local = jnp.clip(local, 0, local_rows - 1)

            def take(array):
                picked = array[local]
                mask = owned.reshape(owned.shape + (1,) * (array.ndim - 1))
                # psum needs numbers; booleans travel as int8. Adding zeros keeps floats bit-exact.
                summable = picked.astype(jnp.int8) if picked.dtype == jnp.bool_ else picked
                total = jax.lax.psum(jnp.where(mask, summable, jnp.zeros_like(summable)), ROW_AXES)
                return total.astype(array.dtype)

            return jax.tree.map(take, values)

        specs = jax.tree.map(lambda array: _row_spec(array.ndim), self.values)
        return jax.shard_map(local_gather, mesh=self.mesh, in_specs=(specs, PartitionSpec()),
                             out_specs=jax.tree.map(lambda _: PartitionSpec(), self.values))(self.values, rows)

    # -------------------------------------------------------------------------------------------------- updates
    def add(self, keys: np.ndarray, values: PyTree = None, ids: np.ndarray | None = None) -> "MemoryBank":
        """A bank with rows added; nothing is re-encoded, existing rows only move on device.

        Args:
          keys: [n, key_dim] new keys. values: pytree like the bank's, leaves [n, ...].
          ids: [n] new distinct ids (none may exist already: use `replace_rows` for those); defaults to
            max(existing id) + 1, + 2, ...
        """
        keys = np.asarray(keys)
        old_ids = self.host_ids()
        count = keys.shape[0]
        if keys.ndim != 2 or keys.shape[1] != self.key_dim:
            raise ValueError(f"add: keys must be [rows, {self.key_dim}], got shape {keys.shape}")
        start = int(old_ids.max()) + 1 if old_ids.size else 0
        ids = np.arange(start, start + count, dtype=np.int32) if ids is None else np.asarray(ids)
        _check_ids(ids, "add: ids")
        clash = np.intersect1d(ids, old_ids)
        if clash.size:
            raise ValueError(f"add: ids {clash[:10].tolist()} are already in the bank; use replace_rows to "
                             f"overwrite them")
        values = self._matching_values(values, count, "add")
        merged_ids = np.concatenate([old_ids, ids])
        order = np.argsort(merged_ids, kind="stable")
        capacity = padded_capacity(merged_ids.size, self.mesh)
        # Source of each new storage row in concat(old storage rows, new rows); -1 = padding.
        sources = np.concatenate([np.arange(old_ids.size), self.capacity + np.arange(count)])[order]
        sources = np.concatenate([sources, np.full(capacity - sources.size, -1)]).astype(np.int32)
        new_ids = np.full(capacity, -1, np.int32)
        new_ids[:merged_ids.size] = merged_ids[order]

        new_keys, new_values = _relayout(self, keys, values, jnp.asarray(sources))
        return dataclasses.replace(self, keys=new_keys, values=new_values, ids=_place(new_ids, self.mesh))

    def replace_rows(self, ids: np.ndarray, keys: np.ndarray, values: PyTree = None) -> "MemoryBank":
        """A bank whose rows with these ids hold new keys (and values, when given). Ids must exist.

        Args:
          ids: [n] ids already in the bank. keys: [n, key_dim]. values: pytree like the bank's, or None to keep.
        """
        ids = np.asarray(ids)
        keys = np.asarray(keys)
        _check_ids(ids, "replace_rows: ids")
        if keys.shape != (ids.size, self.key_dim):
            raise ValueError(f"replace_rows: keys must be [{ids.size}, {self.key_dim}], got shape {keys.shape}")
        stored = self.host_ids()
        positions = np.searchsorted(stored, ids)
        found = (positions < stored.size) & (stored[np.minimum(positions, stored.size - 1)] == ids)
        if not found.all():
            raise KeyError(f"replace_rows: ids {ids[~found][:10].tolist()} are not in the bank; use add for new "
                           f"rows")
        values = None if values is None else self._matching_values(values, ids.size, "replace_rows")
        new_keys, new_values = _write_rows(self, jnp.asarray(positions.astype(np.int32)), keys, values)
        return dataclasses.replace(self, keys=new_keys, values=new_values)

    def _matching_values(self, values: PyTree, rows: int, what: str) -> PyTree:
        """Checks new values against the bank's: same pytree structure and row shapes (dtypes are cast)."""
        values = jax.tree.map(np.asarray, values)
        if jax.tree.structure(values) != jax.tree.structure(self.values):
            raise ValueError(f"{what}: values have structure {jax.tree.structure(values)}, the bank's are "
                             f"{jax.tree.structure(self.values)}")
        _check_values(values, rows, what)
        for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(values)[0], jax.tree.leaves(self.values)):
            if new.shape[1:] != old.shape[1:]:
                raise ValueError(f"{what}: value {jax.tree_util.keystr(path)} has rows of shape {new.shape[1:]}, "
                                 f"the bank stores {old.shape[1:]}")
        return values


@functools.partial(jax.jit, static_argnames=("k", "metric", "method", "chunk_rows", "rerank", "recall_target"))
def _sharded_top_k(bank: MemoryBank, queries: jax.Array, exclude_ids: jax.Array | None, *, k: int, metric: str,
                   method: str, chunk_rows: int, rerank: bool, recall_target: float):
    """Per-shard chunked top-k, then an all-gather of the shards' lists and a merge (see module docstring)."""
    local_rows = bank.capacity // _shard_count(bank.mesh)
    local_k = min(k, local_rows)
    prepared = knn.prepare_queries(queries, metric)

    def local_search(local_queries, keys, ids, *maybe_exclude):
        exclude = maybe_exclude[0] if maybe_exclude else None
        if method == "pallas":
            config = knn_pallas.default_config()
            config = dataclasses.replace(config, tile_rows=chunk_rows) if chunk_rows else config
            scores, found_ids, rows = knn_pallas.fused_top_k(local_queries, keys, ids, local_k, metric=metric,
                                                             exclude_ids=exclude, rerank=rerank, config=config)
        else:
            scores, found_ids, rows = knn.scan_top_k(
                local_queries, keys, ids, local_k, metric=metric, method=method, chunk_rows=chunk_rows,
                exclude_ids=exclude, rerank=rerank, recall_target=recall_target)
        rows = rows + jax.lax.axis_index(ROW_AXES) * local_rows
        # Shard blocks come back in row order, so a merge of equal scores still prefers the lower id.
        gathered = [jax.lax.all_gather(array, ROW_AXES, axis=1, tiled=True) for array in (scores, found_ids, rows)]
        scores, (found_ids, rows) = knn.merge_top_k(gathered[0], gathered[1], k, gathered[2])
        empty = scores == -jnp.inf
        return scores, jnp.where(empty, -1, found_ids), jnp.where(empty, -1, rows)

    operands = [prepared, bank.keys, bank.ids] + ([exclude_ids] if exclude_ids is not None else [])
    in_specs = (PartitionSpec(), _row_spec(2), _row_spec(1)) + ((PartitionSpec(),) if exclude_ids is not None else ())
    return jax.shard_map(local_search, mesh=bank.mesh, in_specs=in_specs,
                         out_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec()),
                         check_vma=False)(*operands)  # the merged top-k is the same on every shard


@jax.jit
def _gather_rows(bank: MemoryBank, rows: jax.Array) -> PyTree:
    return bank._gather_values(rows)


def _constrain_rows(bank: MemoryBank, keys: jax.Array, values: PyTree) -> tuple[jax.Array, PyTree]:
    return (jax.lax.with_sharding_constraint(keys, row_sharding(bank.mesh, 2)),
            jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, row_sharding(bank.mesh, leaf.ndim)),
                         values))


@jax.jit
def _relayout(bank: MemoryBank, add_keys: jax.Array, add_values: PyTree, sources: jax.Array):
    """Rows `sources` of concat(stored rows, new rows), -1 giving zero padding: the storage after an add."""
    def take(old, new):
        stacked = jnp.concatenate([old, new.astype(old.dtype)])
        return jnp.take(stacked, sources, axis=0, mode="fill", fill_value=0)
    return _constrain_rows(bank, take(bank.keys, add_keys), jax.tree.map(take, bank.values, add_values))


@jax.jit
def _write_rows(bank: MemoryBank, rows: jax.Array, keys: jax.Array, values: PyTree):
    """Storage rows `rows` overwritten with new keys (and values unless None)."""
    def write(old, new):
        return old.at[rows].set(new.astype(old.dtype))
    new_values = bank.values if values is None else jax.tree.map(write, bank.values, values)
    return _constrain_rows(bank, write(bank.keys, keys), new_values)


def _check_ids(ids: np.ndarray, what: str) -> None:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
        raise ValueError(f"{what} must lie in [0, 2**31) (-1 marks padding), got range [{ids.min()}, {ids.max()}]")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what} must be distinct; repeated: {unique[counts > 1][:10].tolist()}")


jax.tree_util.register_dataclass(MemoryBank, data_fields=["keys", "ids", "values"], meta_fields=["metric", "mesh"])
