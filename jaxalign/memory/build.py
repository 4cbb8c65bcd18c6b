"""Building a memory bank from a dataset and an encoder function: batched, jitted, one slice per host.

    def encode(batch):                      # batch: what the dataset yields, leaves [batch, ...]
        features = vision_tower(params, batch["image"])
        return features.mean(1), {"tokens": batch["caption_tokens"]}   # keys [b, D], values [b, ...]

    bank = build_bank(dataset, encode, metric="cosine", mesh=mesh)

The encoder is jitted once: a short last batch is padded up to the first batch's size (repeating its last row)
and the padding's outputs dropped, so shapes never change. On several processes batch i is encoded by process
i % process_count (or each host's dataset yields its own slice), and no host ever holds the whole bank: each keeps
only the rows it encoded, and `bank_from_process_rows` moves them device to device into the row-sharded layout.

The exchange. Only the ids are gathered to every host (4 bytes a row, to agree on the global order: rows are
stored by increasing id, as `MemoryBank.from_arrays` stores them). Each process places its encoded rows on its own
devices (the "source" layout), and one jitted `shard_map` sends every row from its source device to the device
that holds its destination row: round r moves the rows that go from shard s to shard (s + r) % shards with one
`ppermute`, padded to the largest such group. A device holds its source rows, its destination rows and one
round's buffer, never the whole bank.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxalign import sharding
from jaxalign.memory import bank as bank_lib, knn
from jaxalign.memory.bank import MemoryBank

PyTree = Any


def _pad_batch(batch: PyTree, size: int) -> PyTree:
    def pad(leaf):
        leaf = np.asarray(leaf)
        missing = size - leaf.shape[0]
        return leaf if missing <= 0 else np.concatenate([leaf, np.repeat(leaf[-1:], missing, axis=0)])
    return jax.tree.map(pad, batch)


def _batch_rows(batch: PyTree) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("a dataset batch has no arrays")
    return int(np.shape(leaves[0])[0])


def _gather_from_hosts(tree: PyTree) -> PyTree:
    """Concatenates every process's [n_i, ...] arrays in process order (each process may have a different n_i)."""
    if jax.process_count() == 1:
        return tree
    counts = np.asarray(multihost_utils.process_allgather(np.int64(_batch_rows(tree))))
    largest = int(counts.max())

    def gather(leaf):
        padded = np.zeros((largest,) + leaf.shape[1:], leaf.dtype)
        padded[:leaf.shape[0]] = leaf
        every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, largest, ...]
        return np.concatenate([every[process, :count] for process, count in enumerate(counts)])

    return jax.tree.map(gather, tree)


def encode_dataset(batches: Iterable[PyTree], encode: Callable[[PyTree], Any], *, ids_field: str | None = "id",
                   split_across_hosts: bool = True, progress: bool = True,
                   total: int | None = None) -> tuple[np.ndarray, PyTree, np.ndarray]:
    """Runs `encode` over a dataset; returns (keys [N, D], values pytree of [N, ...] or None, ids [N]) of the WHOLE
    dataset on every host (the rows are all-gathered). For a bank use `build_bank`, which never does that.

    Arguments as for `encode_local`.
    """
    keys, values, ids = encode_local(batches, encode, ids_field=ids_field, split_across_hosts=split_across_hosts,
                                     progress=progress, total=total)
    gathered = _gather_from_hosts({"keys": keys, "values": values, "ids": ids})
    return gathered["keys"], gathered["values"], gathered["ids"]


def encode_local(batches: Iterable[PyTree], encode: Callable[[PyTree], Any], *, ids_field: str | None = "id",
                 split_across_hosts: bool = True, progress: bool = True,
                 total: int | None = None) -> tuple[np.ndarray, PyTree, np.ndarray]:
    """Runs `encode` over this process's part of a dataset; returns its (keys [n, D], values pytree of [n, ...]
    or None, ids [n]).

    Args:
      batches: iterable of batches (pytrees with leaves [batch, ...]); all batches but the last share a size.
      encode: batch -> keys [batch, D], or (keys, values). Jitted here.
      ids_field: name of a batch entry holding each row's id (the batch must be a mapping); when absent the
        rows are numbered in dataset order.
      split_across_hosts: encode only this process's batches (i % process_count == process_index). Set False
        when each host's dataset already yields only its own slice (ids_field is then required).
      progress: show a tqdm progress bar (hidden when not a terminal).
      total: number of batches, for the progress bar, when `batches` has no len().
    """
    encode_jitted = jax.jit(encode)
    processes, this_process = jax.process_count(), jax.process_index()
    keys_parts, value_parts, id_parts = [], [], []
    batch_size, next_id = None, 0
    total = total if total is not None else (len(batches) if hasattr(batches, "__len__") else None)
    for index, batch in enumerate(tqdm.tqdm(batches, total=total, desc="encoding memory bank",
                                            disable=None if progress else True)):
        rows = _batch_rows(batch)
        if isinstance(batch, Mapping) and ids_field and ids_field in batch:
            batch_ids = np.asarray(batch[ids_field]).astype(np.int64)
        elif not split_across_hosts and processes > 1:
            raise ValueError(f"each host reads its own slice, so batches must carry their ids under "
                             f"{ids_field!r}; batch {index} has none")
        else:
            batch_ids = np.arange(next_id, next_id + rows)
        next_id += rows
        if split_across_hosts and index % processes != this_process:
            continue
        batch_size = batch_size or rows
        if rows > batch_size:
            raise ValueError(f"batch {index} has {rows} rows, more than the first batch's {batch_size}: only the "
                             f"last batch may differ in size")
        output = encode_jitted(_pad_batch(batch, batch_size))
        keys, values = output if isinstance(output, tuple) else (output, None)
        keys_parts.append(np.asarray(keys)[:rows])
        value_parts.append(jax.tree.map(lambda leaf: np.asarray(leaf)[:rows], values))
        id_parts.append(batch_ids)
    if not keys_parts:
        raise ValueError(f"process {this_process} of {processes} got no batches: nothing to build a memory bank "
                         f"from (give every host at least one batch)")
    keys = np.concatenate(keys_parts)
    values = None if value_parts[0] is None else jax.tree.map(lambda *parts: np.concatenate(parts), *value_parts)
    return keys, values, np.concatenate(id_parts)


def build_bank(batches: Iterable[PyTree], encode: Callable[[PyTree], Any], *, metric: str = "cosine",
               mesh: Mesh | None = None, ids_field: str | None = "id", split_across_hosts: bool = True,
               progress: bool = True, total: int | None = None) -> MemoryBank:
    """A sharded `MemoryBank` from a dataset and an encoder (see `encode_local` for the arguments); each host
    keeps only the rows it encoded."""
    keys, values, ids = encode_local(batches, encode, ids_field=ids_field, split_across_hosts=split_across_hosts,
                                     progress=progress, total=total)
    return bank_from_process_rows(keys, values, ids, metric=metric, mesh=mesh)


def _allgather_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every process's ids [n_p] concatenated in process order: [N] int64, the counts n_p: [processes])."""
    if jax.process_count() == 1:
        return ids.astype(np.int64), np.array([ids.size], np.int64)
    counts = np.asarray(multihost_utils.process_allgather(np.int64(ids.size))).reshape(-1)
    padded = np.full(max(int(counts.max()), 1), -1, np.int64)
    padded[:ids.size] = ids
    every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, largest]
    return np.concatenate([every[process, :count] for process, count in enumerate(counts)]), counts.astype(np.int64)


def _device_shards(mesh: Mesh, rows: int) -> dict[jax.Device, int]:
    """The row block (shard number) each device of `mesh` holds of a [rows, ...] bank array."""
    per_shard = rows // bank_lib._shard_count(mesh)
    indices = bank_lib.row_sharding(mesh, 1).devices_indices_map((rows,))
    return {device: (index[0].start or 0) // per_shard for device, index in indices.items()}


def bank_from_process_rows(keys: np.ndarray, values: PyTree, ids: np.ndarray, *, metric: str = "cosine",
                           mesh: Mesh | None = None) -> MemoryBank:
    """A bank from rows that each process holds a different part of (its own keys [n_p, D], values [n_p, ...],
    ids [n_p]); the same bank as `MemoryBank.from_arrays` of all the rows together, without any host holding them.

    Every process must call it (it is collective). Rows go device to device (see the module docstring).
    """
    knn.check_metric(metric)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    keys, ids = np.asarray(keys), np.asarray(ids)
    if keys.ndim != 2 or ids.shape != keys.shape[:1]:
        raise ValueError(f"keys must be [rows, key_dim] and ids [rows], got shapes {keys.shape} and {ids.shape}")
    values = bank_lib._check_values(jax.tree.map(np.asarray, values), keys.shape[0], "bank_from_process_rows")
    all_ids, counts = _allgather_ids(ids)
    bank_lib._check_ids(all_ids, "ids (of all processes)")
    shards, count = bank_lib._shard_count(mesh), all_ids.size
    capacity = bank_lib.padded_capacity(count, mesh)
    dest_rows = capacity // shards

    # Source layout: process p spreads its rows over its own devices, src_rows per device, in shard order.
    shard_of = _device_shards(mesh, capacity)
    process_shards = [sorted(s for d, s in shard_of.items() if d.process_index == p)
                      for p in range(jax.process_count())]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    src_rows = max(1, max(-(-int(n) // len(owned)) for n, owned in zip(counts, process_shards)))
    process = np.repeat(np.arange(len(counts)), counts)
    local = np.arange(count) - starts[process]
    src_shard = np.array([process_shards[p][j] for p, j in zip(process, local // src_rows)], np.int64)
    src_offset = local % src_rows
    # Destination: the rank of each id in increasing order.
    dest = np.empty(count, np.int64)
    dest[np.argsort(all_ids, kind="stable")] = np.arange(count)
    dest_shard, dest_offset = dest // dest_rows, dest % dest_rows
    round_of = (dest_shard - src_shard) % shards

    rounds, sends, receives = [], [], []
    for r in np.unique(round_of):
        moving = np.flatnonzero(round_of == r)
        moving = moving[np.argsort(src_shard[moving], kind="stable")]
        group = src_shard[moving]
        position = np.arange(moving.size) - np.searchsorted(group, group)
        width = int(position.max()) + 1
        send = np.zeros((shards, width), np.int32)
        receive = np.full((shards, width), dest_rows, np.int32)  # out of range: dropped
        send[group, position] = src_offset[moving]
        receive[(group + r) % shards, position] = dest_offset[moving]
        rounds.append(int(r))
        sends.append(bank_lib._place(send.reshape(-1), mesh))
        receives.append(bank_lib._place(receive.reshape(-1), mesh))

    def source(leaf):
        """This process's rows [n_p, ...] as the global [shards * src_rows, ...] source array."""
        mine = process_shards[jax.process_index()]
        padded = np.zeros((len(mine) * src_rows,) + leaf.shape[1:], leaf.dtype)
        padded[:leaf.shape[0]] = leaf
        pieces = [jax.device_put(padded[mine.index(shard) * src_rows:(mine.index(shard) + 1) * src_rows], device)
                  for device, shard in shard_of.items() if device.process_index == jax.process_index()]
        return jax.make_array_from_single_device_arrays((shards * src_rows,) + leaf.shape[1:],
                                                        bank_lib.row_sharding(mesh, leaf.ndim), pieces)

    moved_keys, moved_values = _exchange(source(keys), jax.tree.map(source, values), sends, receives, mesh=mesh,
                                         rounds=tuple(rounds), dest_rows=dest_rows)
    stored_ids = np.full(capacity, -1, np.int32)
    stored_ids[:count] = np.sort(all_ids)
    return MemoryBank(keys=moved_keys, ids=bank_lib._place(stored_ids, mesh), values=moved_values, metric=metric,
                      mesh=mesh)


@functools.partial(jax.jit, static_argnames=("mesh", "rounds", "dest_rows"))
def _exchange(keys: jax.Array, values: PyTree, sends: list[jax.Array], receives: list[jax.Array], *, mesh: Mesh,
              rounds: tuple[int, ...], dest_rows: int) -> tuple[jax.Array, PyTree]:
    """Rows from the source layout to the bank layout: round r sends shard s's rows bound for shard
    (s + r) % shards (local offsets `sends[i]`) and writes them at the receiver's offsets `receives[i]`."""
    shards = bank_lib._shard_count(mesh)

    def local(keys, values, sends, receives):
        def move(leaf):
            out = jnp.zeros((dest_rows,) + leaf.shape[1:], leaf.dtype)
            for r, send, receive in zip(rounds, sends, receives):
                buffer = jnp.take(leaf, send, axis=0)
                if r:
                    buffer = jax.lax.ppermute(buffer, bank_lib.ROW_AXES,
                                              [(s, (s + r) % shards) for s in range(shards)])
                out = out.at[receive].set(buffer, mode="drop")
            return out
        return move(keys), jax.tree.map(move, values)

    row_specs = jax.tree.map(lambda leaf: bank_lib._row_spec(leaf.ndim), (keys, values, sends, receives))
    return jax.shard_map(local, mesh=mesh, in_specs=row_specs, out_specs=row_specs[:2])(keys, values, sends,
                                                                                        receives)
