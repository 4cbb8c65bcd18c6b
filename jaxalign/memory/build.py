"""Building a memory bank from a dataset and an encoder function: batched, jitted, one slice per host.

    def encode(batch):                      # batch: what the dataset yields, leaves [batch, ...]
        features = vision_tower(params, batch["image"])
        return features.mean(1), {"tokens": batch["caption_tokens"]}   # keys [b, D], values [b, ...]

    bank = build_bank(dataset, encode, metric="cosine", mesh=mesh)

The encoder is jitted once: a short last batch is padded up to the first batch's size (repeating its last row)
and the padding's outputs dropped, so shapes never change. On several processes batch i is encoded by process
i % process_count and the rows are exchanged at the end, so every host ends with the same bank.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh

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
    """Runs `encode` over a dataset; returns (keys [N, D], values pytree of [N, ...] or None, ids [N]).

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
    ids = np.concatenate(id_parts)
    gathered = _gather_from_hosts({"keys": keys, "values": values, "ids": ids})
    return gathered["keys"], gathered["values"], gathered["ids"]


def build_bank(batches: Iterable[PyTree], encode: Callable[[PyTree], Any], *, metric: str = "cosine",
               mesh: Mesh | None = None, ids_field: str | None = "id", split_across_hosts: bool = True,
               progress: bool = True, total: int | None = None) -> MemoryBank:
    """A sharded `MemoryBank` from a dataset and an encoder (see `encode_dataset` for the arguments)."""
    keys, values, ids = encode_dataset(batches, encode, ids_field=ids_field, split_across_hosts=split_across_hosts,
                                       progress=progress, total=total)
    return MemoryBank.from_arrays(keys, values, ids, metric=metric, mesh=mesh)
