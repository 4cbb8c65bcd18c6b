"""Top-k search kernels for the memory bank: per-shard chunked scans and the global merge.

Everything here is a pure function of arrays and static settings, so it runs inside `jax.jit` and
`jax.shard_map`. `bank.py` wires these into a sharded search over the mesh.

Scores (higher is better for every metric):
  - `dot`:    q . k
  - `cosine`: (q / |q|) . (k / |k|)
  - `l2`:     -|q - k|^2 (negative squared Euclidean distance)

Methods, applied per chunk of rows (see `chunk_top_k`):
  - `exact`:  `jax.lax.top_k` over the chunk's scores.
  - `binned`: two-stage search. Stage 1 takes the max over bins of rows; stage 2 takes the top-k bins by their
    max; stage 3 re-ranks the members of those k bins exactly. The k bins with the highest maxima hold every row
    of the chunk's true top-k (a bin holding one of them has a max at least the k-th best score, and at most k
    bins can), so with re-ranking the result equals `exact`, at a fraction of the selection work: a
    max-reduction is far cheaper than a top-k on CPU and GPU. The bin size then only balances the stages
    (`bin_size_for`). Without re-ranking (`rerank=False`) each winning bin returns only its best row, and the
    bin count comes from `recall_target` (`bins_for_recall`).
  - `approx`: `jax.lax.approx_max_k`, a real approximate algorithm on TPU only (an exact, sort-based top-k on
    CPU and GPU, slow for k > 16).
  - `pallas`: `binned` with stage 1 fused into one Pallas kernel over the whole shard (`knn_pallas.py`): scores
    live only in on-chip memory and only the bin maxima reach HBM; stages 2 and 3 (`top_bins`,
    `rerank_members`) are shared with `binned`. Runs interpreted (slowly) on CPU, so `auto` never picks it.

Ties: rows are kept in increasing id order by the bank, `lax.top_k` prefers the lower column, and every merge
sorts candidates by (score descending, id ascending), so among equal scores the lower id wins, for `exact` and
for `binned` with re-ranking. `approx` and `binned` without re-ranking are approximate and make no such promise.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Metric = Literal["cosine", "dot", "l2"]
Method = Literal["exact", "binned", "approx", "pallas", "auto"]
METRICS = ("cosine", "dot", "l2")
METHODS = ("exact", "binned", "approx", "pallas", "auto")

# Scores are float32 [batch, chunk_rows]; this budget bounds that block, so the [batch, N] score matrix is
# never built for a bank that does not fit it. On CPU a block that stays in cache is several times faster
# (measured here: 4 MiB blocks scan 262144 x 64 keys 3 to 5x faster than 32 MiB ones); accelerators prefer fewer,
# larger steps.
SCORE_BUDGET_BYTES = {"cpu": 4 * 2**20, "gpu": 32 * 2**20, "tpu": 32 * 2**20}
_EPSILON = 1e-12


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {METRICS}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}: use one of {METHODS}")


def resolve_method(method: str, rows: int, k: int, backend: str | None = None) -> str:
    """Chooses the method for `auto`: approx on TPU, binned for large banks, exact for small ones.

    `auto` does not pick `pallas` yet: its speed on GPU / TPU has not been measured (bench/retrieval.py), and
    on CPU it runs interpreted. Ask for it by name.

    Args:
      method: one of METHODS.
      rows: rows scanned by one shard.
      k: neighbours asked for.
      backend: 'cpu', 'gpu' or 'tpu'; defaults to `jax.default_backend()`.
    """
    check_method(method)
    if method != "auto":
        return method
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "approx"
    # Binning pays off once the chunk holds many bins of several rows each.
    return "binned" if rows >= 64 * max(k, 1) else "exact"


def bins_for_recall(k: int, recall_target: float) -> int:
    """Smallest bin count L whose expected recall@k with one row per bin reaches `recall_target`.

    With L bins the row of rank i is its bin's best when none of the i - 1 better rows shares its bin, which has
    probability (1 - 1/L)^(i-1) for rows spread over the bins; recall is the mean over i = 1..k.
    """
    if not 0.0 < recall_target <= 1.0:
        raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
    if k <= 1:
        return 1
    if recall_target >= 1.0:
        return 2**30
    def expected_recall(bins: int) -> float:
        keep = 1.0 - 1.0 / bins
        return sum(keep**i for i in range(k)) / k

    low, high = 1, k  # expected_recall grows with the bin count: double, then bisect
    while expected_recall(high) < recall_target:
        low, high = high, high * 2
    while low + 1 < high:
        middle = (low + high) // 2
        low, high = (middle, high) if expected_recall(middle) < recall_target else (low, middle)
    return high


def chunk_rows_for(batch: int, rows: int, budget_bytes: int | None = None) -> int:
    """Rows per scan chunk: the float32 [batch, chunk] score block fits `budget_bytes` (a power of two).

    The budget defaults to `SCORE_BUDGET_BYTES` of the default backend.
    """
    if budget_bytes is None:
        budget_bytes = SCORE_BUDGET_BYTES.get(jax.default_backend(), SCORE_BUDGET_BYTES["gpu"])
    limit = max(budget_bytes // (4 * max(batch, 1)), 256)
    chunk = 1 << int(math.floor(math.log2(limit)))
    return max(1, min(chunk, rows))


def bin_size_for(chunk_rows: int, k: int, rerank: bool, recall_target: float) -> int:
    """Rows per bin for `binned` in a chunk of `chunk_rows` rows (a power of two, at least 1).

    With re-ranking the work is chunk (max) + chunk / size (top-k over bins) + k * size (re-rank), smallest near
    size = sqrt(chunk / k). Without it the chunk needs `bins_for_recall` bins, so the size is at most
    chunk / bins.
    """
    if rerank:
        target = math.sqrt(chunk_rows / max(k, 1))
    else:
        target = chunk_rows / bins_for_recall(k, recall_target)
    if target < 2:
        return 1
    return 1 << int(math.floor(math.log2(target)))


def normalise(vectors: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero. [rows, dim] -> [rows, dim]."""
    vectors = vectors.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(vectors * vectors, axis=-1, keepdims=True))
    return vectors / jnp.maximum(norm, _EPSILON)


def prepare_queries(queries: jax.Array, metric: str) -> jax.Array:
    """Queries as the scoring expects them: unit norm for cosine, float32 otherwise. [batch, dim]."""
    check_metric(metric)
    return normalise(queries) if metric == "cosine" else queries.astype(jnp.float32)


def score_chunk(queries: jax.Array, keys: jax.Array, metric: str) -> jax.Array:
    """Scores of every query against a chunk of keys, float32 [batch, chunk] (higher is better).

    Args:
      queries: [batch, dim] from `prepare_queries`.
      keys: [chunk, dim] shared by all queries, or [batch, chunk, dim] (each query's own candidate rows), in
        the bank's dtype; the product runs in that dtype with float32 accumulation.
    """
    spec = "bd,nd->bn" if keys.ndim == 2 else "bd,bnd->bn"
    dots = jnp.einsum(spec, queries.astype(keys.dtype), keys, preferred_element_type=jnp.float32)
    if metric == "dot":
        return dots
    squared_norms = jnp.sum(jnp.square(keys.astype(jnp.float32)), axis=-1)
    squared_norms = squared_norms[None, :] if keys.ndim == 2 else squared_norms
    if metric == "cosine":
        return dots * jax.lax.rsqrt(jnp.maximum(squared_norms, _EPSILON * _EPSILON))
    query_norms = jnp.sum(jnp.square(queries), axis=-1)
    return 2.0 * dots - squared_norms - query_norms[:, None]


def mask_scores(scores: jax.Array, ids: jax.Array, exclude_ids: jax.Array | None) -> jax.Array:
    """Sets to -inf the scores of padding rows (id < 0) and of each query's excluded ids.

    Args:
      scores: [batch, chunk]; ids: [chunk] or [batch, chunk]; exclude_ids: None, [batch] or [batch, excluded]
        (-1 = none).
    """
    ids = ids[None, :] if ids.ndim == 1 else ids
    keep = ids >= 0
    if exclude_ids is not None:
        excluded = exclude_ids if exclude_ids.ndim == 2 else exclude_ids[:, None]
        hit = jnp.any(ids[:, None, :] == excluded[:, :, None], axis=1)
        keep = keep & ~hit
    return jnp.where(keep, scores, -jnp.inf)


def _binned_top_k(scores: jax.Array, k: int, bin_size: int, rerank: bool) -> tuple[jax.Array, jax.Array]:
    """Two-stage top-k over [batch, width] with width = bins * bin_size; returns (scores, columns) [batch, k].

    With `rerank` the bins are contiguous runs of columns: bins that tie on their max then rank by position, so
    the lower id still wins every tie (the result is exactly `lax.top_k`'s). Without it the bins are strided
    (bin j holds columns j, j + bins, ...): neighbours stored next to each other, as sorted clustered data are,
    then land in different bins instead of hiding each other.
    """
    batch, width = scores.shape
    bins = width // bin_size
    if rerank:
        grouped = scores.reshape(batch, bins, bin_size)  # column = bin * bin_size + member
        best_bins = top_bins(jnp.max(grouped, axis=2), k)  # stages 1 and 2
        members = jnp.take_along_axis(grouped, best_bins[:, :, None], axis=1).reshape(batch, k * bin_size)
        return rerank_members(members, best_bins, bin_size, k)
    grouped = scores.reshape(batch, bin_size, bins)  # column = member * bins + bin
    _, best_bins = jax.lax.top_k(jnp.max(grouped, axis=1), k)
    members = jnp.take_along_axis(grouped, best_bins[:, None, :], axis=2)  # [batch, bin_size, k]
    best_member = jnp.argmax(members, axis=1)  # each winning bin returns only its best row
    top = jnp.take_along_axis(members, best_member[:, None, :], axis=1)[:, 0, :]
    return top, best_member.astype(jnp.int32) * bins + best_bins


def top_bins(bin_scores: jax.Array, k: int) -> jax.Array:
    """Stage 2 of a binned search: the k bins with the highest maxima, in increasing bin order. [batch, k].

    Args:
      bin_scores: [batch, bins] each bin's best score; `lax.top_k` prefers the lower bin among equal maxima.
    """
    _, best_bins = jax.lax.top_k(bin_scores, k)
    # Winning bins in column order, so their flattened members are in column order too and stage 3's top-k
    # (which prefers the lower position) breaks ties by column without a sort.
    return jnp.sort(best_bins, axis=1)


def rerank_members(member_scores: jax.Array, best_bins: jax.Array, bin_size: int,
                   k: int) -> tuple[jax.Array, jax.Array]:
    """Stage 3 of a binned search: the exact top-k over the winning bins' members.

    Args:
      member_scores: [batch, bins_kept * bin_size], the members of `best_bins` bin after bin (bins are runs of
        `bin_size` consecutive columns).
      best_bins: [batch, bins_kept] from `top_bins`.
      k: entries wanted (at most bins_kept * bin_size).
    Returns:
      (scores, columns) [batch, k], best first; column = bin * bin_size + member.
    """
    top, where = jax.lax.top_k(member_scores, k)
    return top, jnp.take_along_axis(best_bins, where // bin_size, axis=1) * bin_size + where % bin_size


def chunk_top_k(scores: jax.Array, k: int, method: str, *, bin_size: int = 1, rerank: bool = True,
                recall_target: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """The best min(k, width) entries of each row of a score chunk.

    Args:
      scores: float32 [batch, width].
      k: entries wanted.
      method: 'exact', 'binned' or 'approx' (already resolved).
      bin_size: rows per bin for 'binned'.
    Returns:
      (scores, columns), [batch, min(k, width)], best first; columns index the chunk.
    """
    width = scores.shape[1]
    k = min(k, width)
    if method == "approx":
        return jax.lax.approx_max_k(scores, k, recall_target=recall_target)
    bins = width // bin_size if bin_size > 1 else 0
    if method == "exact" or bins < k:
        return jax.lax.top_k(scores, k)
    binned_width = bins * bin_size
    top, columns = _binned_top_k(scores[:, :binned_width], k, bin_size, rerank)
    if binned_width == width:
        return top, columns
    # The tail that does not fill a bin (fewer than bin_size columns) is searched exactly.
    tail_top, tail_columns = jax.lax.top_k(scores[:, binned_width:], min(k, width - binned_width))
    merged, (merged_columns,) = merge_top_k(
        jnp.concatenate([top, tail_top], axis=1),
        jnp.concatenate([columns, tail_columns + binned_width], axis=1), k)
    return merged, merged_columns


def merge_top_k(scores: jax.Array, ids: jax.Array, k: int, *extra: jax.Array) -> tuple[jax.Array, tuple]:
    """Best k candidates per row by (score descending, id ascending); `extra` arrays follow the same order.

    Args:
      scores: [batch, candidates]; ids: [batch, candidates] (int, the tie-breaker); extra: [batch, candidates].
    Returns:
      (scores [batch, k], (ids, *extra) each [batch, k]).
    """
    sorted_arrays = jax.lax.sort((-scores, ids) + tuple(extra), dimension=1, num_keys=2)
    return -sorted_arrays[0][:, :k], tuple(array[:, :k] for array in sorted_arrays[1:])


def scan_top_k(queries: jax.Array, keys: jax.Array, ids: jax.Array, k: int, *, metric: str, method: str,
               chunk_rows: int, exclude_ids: jax.Array | None = None, rerank: bool = True,
               recall_target: float = 0.95) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k of one shard's rows, scanning them in chunks with a running top-k.

    Only one [batch, chunk_rows] score block is alive at a time, so memory does not grow with the shard.

    Args:
      queries: [batch, dim] from `prepare_queries`.
      keys: [rows, dim]; ids: [rows] (-1 marks padding).
      k: neighbours wanted (k <= rows).
      chunk_rows: rows scored per step.
    Returns:
      scores [batch, k] (-inf where fewer than k rows qualify), ids [batch, k] and local rows [batch, k].
    """
    rows = keys.shape[0]
    chunk_rows = max(1, min(chunk_rows, rows))
    bin_size = bin_size_for(chunk_rows, k, rerank, recall_target) if method == "binned" else 1

    def chunk_result(start, width):
        chunk_keys = jax.lax.dynamic_slice_in_dim(keys, start, width, axis=0)
        chunk_ids = jax.lax.dynamic_slice_in_dim(ids, start, width, axis=0)
        scores = mask_scores(score_chunk(queries, chunk_keys, metric), chunk_ids, exclude_ids)
        top, columns = chunk_top_k(scores, k, method, bin_size=bin_size, rerank=rerank,
                                   recall_target=recall_target)
        return top, chunk_ids[columns], columns + start

    full_chunks, remainder = divmod(rows, chunk_rows)
    best = chunk_result(0, chunk_rows)
    if best[0].shape[1] < k:  # a chunk narrower than k: pad the running top-k with empty slots
        pad = k - best[0].shape[1]
        best = (jnp.pad(best[0], ((0, 0), (0, pad)), constant_values=-jnp.inf),
                jnp.pad(best[1], ((0, 0), (0, pad)), constant_values=-1),
                jnp.pad(best[2], ((0, 0), (0, pad)), constant_values=-1))

    def merge(best, found):
        scores, (found_ids, found_rows) = merge_top_k(
            jnp.concatenate([best[0], found[0]], axis=1), jnp.concatenate([best[1], found[1]], axis=1), k,
            jnp.concatenate([best[2], found[2]], axis=1))
        return scores, found_ids, found_rows

    if full_chunks > 1:
        def step(index, best):
            return merge(best, chunk_result(index * chunk_rows, chunk_rows))
        best = jax.lax.fori_loop(1, full_chunks, step, best)
    if remainder:
        best = merge(best, chunk_result(full_chunks * chunk_rows, remainder))
    return best


def brute_force_numpy(queries: np.ndarray, keys: np.ndarray, ids: np.ndarray, k: int, metric: str,
                      exclude_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference search in NumPy (float64 scores): (scores [batch, k], ids [batch, k]), ties to the lower id.

    Used by the tests and the benchmark as ground truth.
    """
    check_metric(metric)
    queries = np.asarray(queries, np.float64)
    keys = np.asarray(keys, np.float64)
    if metric == "cosine":
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), _EPSILON)
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), _EPSILON)
    scores = queries @ keys.T
    if metric == "l2":
        scores = 2 * scores - (keys**2).sum(1)[None, :] - (queries**2).sum(1)[:, None]
    if exclude_ids is not None:
        excluded = exclude_ids.reshape(len(queries), -1)
        scores = np.where((ids[None, None, :] == excluded[:, :, None]).any(1), -np.inf, scores)
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]
