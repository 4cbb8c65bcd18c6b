"""The `pallas` search method: the binned search of `knn.py` with stage 1 fused into one Pallas kernel.

Stage 1 (this kernel): for a block of queries [block_queries, dim] and a tile of keys [tile_rows, dim] it scores
the tile in on-chip memory (SRAM on GPU, VMEM on TPU) and keeps, per bin of `bin_size` consecutive rows, only the
best score and its row. The [batch, rows] score matrix never reaches HBM: the kernel reads the keys once per
query block and writes [rows / bin_size, batch] maxima and rows. Stages 2 and 3 are `binned`'s, in plain JAX
(`knn.top_bins`, `knn.rerank_members`): the k best bins, then an exact re-rank of their members, so the result
equals `exact` up to the rounding of the two score computations.

Layout inside the kernel: keys' rows on the major axis and queries on the minor one (scores are [tile, queries]),
so per-key norms ([tile, 1]), ids ([tile, 1]) and the per-bin reduction (over the major axis) need no transpose
on TPU or GPU; the bin outputs come back as [bins, batch] and are transposed once outside.

Backends: Triton on GPU (`pl.pallas_call` with `pallas.triton.CompilerParams`; every block dimension a power of
two), Mosaic on TPU, `interpret=True` on CPU (correct but slow: tests only, never a speed figure).

    scores, ids, rows = fused_top_k(prepared_queries, keys, ids, k=10, metric="dot")
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxalign.memory import knn

_EPSILON = 1e-12  # as knn.py: cosine divides by max(|k|, 1e-12)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block sizes of the bin kernel, all powers of two on GPU.

    Attributes:
      tile_rows: key rows per grid step (a multiple of the bin size).
      block_queries: queries per grid step; each query block reads every key once.
      block_dim: key columns per inner step (None = all); on GPU a loop over the key dimension keeps the
        operands of each dot small enough for registers and lets Triton pipeline the loads.
      num_warps, num_stages: Triton settings (GPU only).
    """
    tile_rows: int
    block_queries: int
    block_dim: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


# Starting points, not tuned: no GPU or TPU has run this kernel yet (see bench/retrieval.py to tune them).
DEFAULT_CONFIGS = {
    "gpu": KernelConfig(tile_rows=128, block_queries=128, block_dim=64, num_warps=8, num_stages=3),
    "tpu": KernelConfig(tile_rows=1024, block_queries=128),
    "cpu": KernelConfig(tile_rows=1024, block_queries=128),
}


def default_config(backend: str | None = None) -> KernelConfig:
    return DEFAULT_CONFIGS.get(backend or jax.default_backend(), DEFAULT_CONFIGS["gpu"])


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def bin_size_for(rows: int, k: int, dim: int, itemsize: int, tile_rows: int) -> int:
    """Rows per bin (a power of two dividing `tile_rows`) balancing the two costs beyond the key scan.

    The kernel writes, transposes and stage 2 reads about 24 bytes per bin and query; stage 3 gathers k bins of
    bin_size keys per query (k * bin_size * dim * itemsize bytes). They are equal near
    bin_size = sqrt(24 * rows / (k * dim * itemsize)): 64 for 4M x 512 bfloat16 keys and k = 10.
    """
    target = math.sqrt(24 * rows / max(k * dim * itemsize, 1))
    size = 1 << max(0, int(math.floor(math.log2(max(target, 1.0)))))
    return max(1, min(size, tile_rows & -tile_rows))  # the largest power of two dividing the tile, at most


def _bin_kernel(*refs, metric: str, bin_size: int, block_dim: int, excluded: int):
    """One grid step (query block i, key tile j): bin maxima [tile / bin_size, block_queries] and their rows."""
    if excluded:
        query_ref, key_ref, id_ref, exclude_ref, max_ref, row_ref = refs
    else:
        query_ref, key_ref, id_ref, max_ref, row_ref = refs
    tile_rows, dim = key_ref.shape
    block_queries = query_ref.shape[0]
    # float32 keys: a full-precision product (Triton would otherwise use TF32); bfloat16 keys: the native one.
    precision = lax.Precision.HIGHEST if key_ref.dtype == jnp.float32 else None

    def add_columns(keys, queries, dots, norms):
        dots = dots + lax.dot_general(keys, queries, (((1,), (1,)), ((), ())), precision=precision,
                                      preferred_element_type=jnp.float32)  # [tile, block_queries]
        if metric != "dot":
            wide = keys.astype(jnp.float32)
            norms = norms + jnp.sum(wide * wide, axis=1, keepdims=True)  # [tile, 1]
        return dots, norms

    dots = jnp.zeros((tile_rows, block_queries), jnp.float32)
    norms = jnp.zeros((tile_rows, 1), jnp.float32)
    if block_dim == dim:
        dots, norms = add_columns(key_ref[...], query_ref[...], dots, norms)
    else:
        def step(index, carry):
            start = pl.multiple_of(index * block_dim, block_dim)
            columns = pl.ds(start, block_dim)
            return add_columns(key_ref[:, columns], query_ref[:, columns], *carry)
        dots, norms = lax.fori_loop(0, dim // block_dim, step, (dots, norms))

    # The same formulas as knn.score_chunk; l2's query norm is constant per query, so it is added outside.
    if metric == "cosine":
        scores = dots * lax.rsqrt(jnp.maximum(norms, _EPSILON * _EPSILON))
    elif metric == "l2":
        scores = 2.0 * dots - norms
    else:
        scores = dots
    ids = id_ref[...]  # [tile, 1]
    keep = ids >= 0  # padding rows have id -1
    for slot in range(excluded):  # each query's excluded ids, one [1, block_queries] row per slot
        keep = keep & (ids != exclude_ref[pl.ds(slot, 1), :])
    scores = jnp.where(keep, scores, -jnp.inf)

    bins = tile_rows // bin_size
    grouped = scores.reshape(bins, bin_size, block_queries)
    best = jnp.max(grouped, axis=1)  # [bins, block_queries]
    # The first member holding the maximum (max and min reductions only: they lower on every backend).
    member = lax.broadcasted_iota(jnp.int32, grouped.shape, 1)
    first = jnp.min(jnp.where(grouped == best[:, None, :], member, bin_size - 1), axis=1)
    bin_start = lax.broadcasted_iota(jnp.int32, best.shape, 0) * bin_size
    max_ref[...] = best
    row_ref[...] = pl.program_id(1) * tile_rows + bin_start + first


def bin_maxima(queries: jax.Array, keys: jax.Array, ids: jax.Array, *, metric: str, bin_size: int,
               config: KernelConfig | None = None, exclude_ids: jax.Array | None = None,
               interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Stage 1: the best score of every bin of `bin_size` consecutive rows, and its row, for every query.

    Only the first rows // tile_rows * tile_rows rows are binned; the caller searches the rest.

    Args:
      queries: float32 [batch, dim] from `knn.prepare_queries` (cast to the keys' dtype for the product).
      keys: [rows, dim] float32 or bfloat16.
      ids: int32 [rows]; rows with id -1 (padding) score -inf.
      metric: 'dot' | 'cosine' | 'l2' (for 'l2' the maxima lack the constant -|q|^2 term).
      bin_size: rows per bin, dividing config.tile_rows.
      config: block sizes; defaults to `default_config()` of the default backend.
      exclude_ids: None, [batch] or [batch, excluded]: ids each query may not retrieve (-1 = none).
      interpret: run the kernel in the Pallas interpreter; defaults to True on CPU only.
    Returns:
      (maxima float32 [batch, bins], rows int32 [batch, bins]); a bin with no qualifying row has max -inf.
    """
    backend = jax.default_backend()
    config = config or default_config(backend)
    interpret = backend == "cpu" if interpret is None else interpret
    batch, dim = queries.shape
    rows = keys.shape[0]
    tile_rows = min(config.tile_rows, 1 << int(math.floor(math.log2(max(rows, 1)))))
    block_dim = config.block_dim or dim
    if dim % block_dim:
        raise ValueError(f"pallas search: block_dim {block_dim} must divide the key dimension {dim}")
    if tile_rows % bin_size:
        raise ValueError(f"pallas search: bin_size {bin_size} must divide the key tile of {tile_rows} rows "
                         f"(set tile_rows / chunk_rows to a multiple of it)")
    if backend == "gpu" and not interpret and not all(map(_is_power_of_two, (tile_rows, bin_size, block_dim))):
        raise ValueError(f"pallas search on GPU needs powers of two for tile_rows ({tile_rows}), bin_size "
                         f"({bin_size}) and block_dim ({block_dim}, the key dimension {dim} when unset)")
    # Triton's dot wants every side >= 16; padded queries are zeros and their results are dropped.
    block_queries = min(config.block_queries, max(16, 1 << math.ceil(math.log2(max(batch, 1)))))
    padded_batch = -(-batch // block_queries) * block_queries
    covered = rows // tile_rows * tile_rows

    operands = [jnp.pad(queries.astype(keys.dtype), ((0, padded_batch - batch), (0, 0))),
                keys, ids.astype(jnp.int32).reshape(rows, 1)]
    in_specs = [pl.BlockSpec((block_queries, dim), lambda i, j: (i, 0)),
                pl.BlockSpec((tile_rows, dim), lambda i, j: (j, 0)),
                pl.BlockSpec((tile_rows, 1), lambda i, j: (j, 0))]
    excluded = 0
    if exclude_ids is not None:
        exclude = exclude_ids.astype(jnp.int32).reshape(batch, -1)
        excluded = 1 << math.ceil(math.log2(exclude.shape[1]))  # -1 slots compare equal only to padding rows
        exclude = jnp.pad(exclude, ((0, padded_batch - batch), (0, excluded - exclude.shape[1])),
                          constant_values=-1)
        operands.append(exclude.T)  # [excluded, batch]: one row of ids per slot
        in_specs.append(pl.BlockSpec((excluded, block_queries), lambda i, j: (0, i)))

    bins_per_tile = tile_rows // bin_size
    out_block = pl.BlockSpec((bins_per_tile, block_queries), lambda i, j: (j, i))
    bins = covered // bin_size
    kernel = functools.partial(_bin_kernel, metric=metric, bin_size=bin_size, block_dim=block_dim,
                               excluded=excluded)
    maxima, best_rows = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((bins, padded_batch), jnp.float32),
                   jax.ShapeDtypeStruct((bins, padded_batch), jnp.int32)),
        grid=(padded_batch // block_queries, covered // tile_rows),
        in_specs=in_specs,
        out_specs=(out_block, out_block),
        compiler_params=None if interpret else _compiler_params(backend, config),
        interpret=interpret,
        name="knn_bin_maxima",
    )(*operands)
    return maxima[:, :batch].T, best_rows[:, :batch].T


def _compiler_params(backend: str, config: KernelConfig):
    if backend == "gpu":  # Triton, named explicitly so a Mosaic GPU default does not take it
        from jax.experimental.pallas import triton as pallas_triton
        return pallas_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pallas_tpu
        return pallas_tpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    return None


def fused_top_k(queries: jax.Array, keys: jax.Array, ids: jax.Array, k: int, *, metric: str,
                exclude_ids: jax.Array | None = None, rerank: bool = True, bin_size: int | None = None,
                config: KernelConfig | None = None,
                interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k of one shard's rows by the fused binned search; same contract as `knn.scan_top_k`.

    Args:
      queries: float32 [batch, dim] from `knn.prepare_queries`.
      keys: [rows, dim]; ids: [rows] (-1 marks padding, never returned).
      k: neighbours wanted (k <= rows).
      exclude_ids: None, [batch] or [batch, excluded] ids each query may not retrieve (-1 = none).
      rerank: re-rank the k best bins' members exactly (the result is then `exact`'s); without it each of the
        k best bins returns its best row (fewer bins than rows: recall < 1, worse when neighbours are stored
        next to each other).
      bin_size: rows per bin; defaults to `bin_size_for`.
      config: kernel block sizes; defaults to `default_config()`.
      interpret: see `bin_maxima`.
    Returns:
      scores [batch, k] (-inf where fewer than k rows qualify), ids [batch, k] and local rows [batch, k].
    """
    config = config or default_config()
    rows, dim = keys.shape
    batch = queries.shape[0]
    tile_rows = min(config.tile_rows, 1 << int(math.floor(math.log2(max(rows, 1)))))
    bin_size = bin_size or bin_size_for(rows, k, dim, keys.dtype.itemsize, tile_rows)
    covered = rows // tile_rows * tile_rows
    if covered // bin_size < 1 or rows < k:  # nothing to bin: a shard this small is scanned exactly
        return knn.scan_top_k(queries, keys, ids, k, metric=metric, method="exact", chunk_rows=rows,
                              exclude_ids=exclude_ids)
    maxima, best_rows = bin_maxima(queries, keys, ids, metric=metric, bin_size=bin_size,
                                   config=dataclasses.replace(config, tile_rows=tile_rows),
                                   exclude_ids=exclude_ids, interpret=interpret)
    kept_bins = min(k, maxima.shape[1])
    if rerank:
        best_bins = knn.top_bins(maxima, kept_bins)  # stage 2
        members = (best_bins[:, :, None] * bin_size + jnp.arange(bin_size)).reshape(batch, kept_bins * bin_size)
        member_scores = knn.mask_scores(knn.score_chunk(queries, jnp.take(keys, members, axis=0), metric),
                                        jnp.take(ids, members), exclude_ids)
        top, found_rows = knn.rerank_members(member_scores, best_bins, bin_size, min(k, members.shape[1]))
    else:
        top, where = lax.top_k(maxima, kept_bins)
        found_rows = jnp.take_along_axis(best_rows, where, axis=1)
        if metric == "l2":  # the kernel leaves out the constant -|q|^2 (see _bin_kernel)
            top = top - jnp.sum(jnp.square(queries), axis=-1)[:, None]
    candidates = [(top, jnp.take(ids, found_rows), found_rows)]
    if covered < rows:  # the rows past the last full tile: an exact search
        tail_scores = knn.mask_scores(knn.score_chunk(queries, keys[covered:], metric), ids[covered:],
                                      exclude_ids)
        tail_top, tail_columns = lax.top_k(tail_scores, min(k, rows - covered))
        candidates.append((tail_top, jnp.take(ids, tail_columns + covered), tail_columns + covered))
    scores, found_ids, found_rows = (jnp.concatenate(parts, axis=1) for parts in zip(*candidates))
    if scores.shape[1] < k:  # fewer candidates than k: empty slots
        pad = ((0, 0), (0, k - scores.shape[1]))
        scores = jnp.pad(scores, pad, constant_values=-jnp.inf)
        found_ids, found_rows = (jnp.pad(array, pad, constant_values=-1) for array in (found_ids, found_rows))
    scores, (found_ids, found_rows) = knn.merge_top_k(scores, found_ids, k, found_rows)
    return scores, found_ids, found_rows
