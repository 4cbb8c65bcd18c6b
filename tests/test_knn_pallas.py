"""The fused Pallas bin kernel and the `pallas` search method, in interpret mode on CPU, against NumPy."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxalign.memory import MemoryBank, brute_force_numpy, knn, knn_pallas
from jaxalign.sharding import make_mesh

ROWS, DIM, BATCH, BIN, K = 4096, 64, 16, 64, 10
# 256-row tiles (4 bins each), the key dimension in two steps of 32: the loop the GPU configuration uses.
CONFIG = knn_pallas.KernelConfig(tile_rows=256, block_queries=16, block_dim=32)


def reference_bins(scores: np.ndarray, bin_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Max and first arg-max row of every bin of consecutive columns: ([batch, bins], [batch, bins])."""
    grouped = scores.reshape(scores.shape[0], -1, bin_size)
    return grouped.max(2), grouped.argmax(2) + np.arange(grouped.shape[1]) * bin_size


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(ROWS, DIM)).astype(np.float32), rng.normal(size=(BATCH, DIM)).astype(np.float32),
            np.arange(ROWS, dtype=np.int32))


def test_bin_maxima_equal_numpy_exactly_for_float32():
    rng = np.random.default_rng(1)
    # Small integers: every product and sum is exact in float32 whatever the order, and many scores tie, so the
    # arg-max must be the first row of the bin holding the maximum, as NumPy's.
    keys = rng.integers(-3, 4, size=(ROWS, DIM)).astype(np.float32)
    queries = rng.integers(-3, 4, size=(BATCH, DIM)).astype(np.float32)
    maxima, rows = knn_pallas.bin_maxima(jnp.asarray(queries), jnp.asarray(keys), jnp.arange(ROWS), metric="dot",
                                         bin_size=BIN, config=CONFIG)
    want_maxima, want_rows = reference_bins(queries @ keys.T, BIN)
    assert maxima.shape == rows.shape == (BATCH, ROWS // BIN)
    np.testing.assert_array_equal(np.asarray(maxima), want_maxima)
    np.testing.assert_array_equal(np.asarray(rows), want_rows)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_bin_maxima_follow_the_metric(data, metric):
    keys, queries, ids = data
    prepared = knn.prepare_queries(jnp.asarray(queries), metric)
    maxima, rows = knn_pallas.bin_maxima(prepared, jnp.asarray(keys), jnp.asarray(ids), metric=metric,
                                         bin_size=BIN, config=CONFIG)
    want = np.asarray(knn.score_chunk(prepared, jnp.asarray(keys), metric))
    if metric == "l2":  # the kernel leaves out the query's own norm, constant per query
        want = want + np.sum(np.square(np.asarray(prepared)), axis=1, keepdims=True)
    want_maxima, want_rows = reference_bins(want, BIN)
    np.testing.assert_allclose(np.asarray(maxima), want_maxima, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(rows), want_rows)


def test_bin_maxima_for_bfloat16_keys_within_bfloat16_rounding(data):
    keys, queries, ids = data
    keys16 = keys.astype(ml_dtypes.bfloat16)
    maxima, rows = knn_pallas.bin_maxima(jnp.asarray(queries), jnp.asarray(keys16), jnp.asarray(ids),
                                         metric="dot", bin_size=BIN, config=CONFIG)
    # The product runs in bfloat16 (queries rounded too) with float32 accumulation.
    scores = (queries.astype(ml_dtypes.bfloat16).astype(np.float64) @ keys16.astype(np.float64).T)
    want_maxima, want_rows = reference_bins(scores, BIN)
    np.testing.assert_allclose(np.asarray(maxima), want_maxima, rtol=1e-4, atol=1e-4)
    # Rows agree wherever the bin's best two scores are further apart than the accumulation error.
    top_two = np.sort(scores.reshape(BATCH, -1, BIN), axis=2)[:, :, -2:]
    clear = top_two[:, :, 1] - top_two[:, :, 0] > 1e-3
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(rows)[clear], want_rows[clear])


def test_fused_search_equals_exact_search(data):
    keys, queries, ids = data
    prepared = knn.prepare_queries(jnp.asarray(queries), "dot")
    scores, found, rows = knn_pallas.fused_top_k(prepared, jnp.asarray(keys), jnp.asarray(ids), K, metric="dot",
                                                 bin_size=BIN, config=CONFIG)
    want_scores, want_ids = brute_force_numpy(queries, keys, ids, K, "dot")
    # Theory: the K bins with the highest maxima hold the whole top K; check that the reference agrees, then
    # that the fused search finds exactly those rows.
    maxima, _ = reference_bins(queries.astype(np.float64) @ keys.T.astype(np.float64), BIN)
    top_bins = np.argsort(-maxima, axis=1)[:, :K]
    assert all(set(truth // BIN) <= set(bins) for truth, bins in zip(want_ids, top_bins))
    np.testing.assert_array_equal(np.asarray(found), want_ids)
    np.testing.assert_array_equal(np.asarray(rows), want_ids)  # ids are the rows here
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-4)


def test_fused_search_recall_at_10_for_bfloat16_keys(data):
    keys, queries, ids = data
    keys16 = keys.astype(ml_dtypes.bfloat16)
    _, found, _ = knn_pallas.fused_top_k(jnp.asarray(queries), jnp.asarray(keys16), jnp.asarray(ids), K,
                                         metric="dot", bin_size=BIN, config=CONFIG)
    _, truth = brute_force_numpy(queries, keys, ids, K, "dot")  # float32 truth: bfloat16 rounding included
    assert recall(np.asarray(found), truth) >= 0.95


def test_one_row_per_bin_without_rerank_returns_true_l2_scores(data):
    keys, queries, ids = data
    prepared = knn.prepare_queries(jnp.asarray(queries), "l2")
    scores, found, _ = knn_pallas.fused_top_k(prepared, jnp.asarray(keys), jnp.asarray(ids), K, metric="l2",
                                              rerank=False, bin_size=BIN, config=CONFIG)
    found = np.asarray(found)
    true_scores = -np.sum((queries[:, None, :] - keys[found]) ** 2, axis=2)  # each returned row's -|q - k|^2
    np.testing.assert_allclose(np.asarray(scores), true_scores, rtol=1e-4, atol=1e-3)
    assert all(len(set(row)) == K for row in found.tolist())  # K distinct bins, K distinct rows


def test_padding_rows_are_never_returned(data):
    keys, queries, _ = data
    rows = 1000  # 3 full tiles of 256 plus a 232-row tail searched exactly
    padded = keys[:rows].copy()
    ids = np.arange(rows, dtype=np.int32)
    ids[::3] = -1  # a third of the rows are padding, each made the best match of one query or another
    padded[::3] = 100.0 * queries[np.arange(len(padded[::3])) % BATCH]
    scores, found, _ = knn_pallas.fused_top_k(jnp.asarray(queries), jnp.asarray(padded), jnp.asarray(ids), K,
                                              metric="dot", bin_size=BIN, config=CONFIG)
    real = ids >= 0
    _, want = brute_force_numpy(queries, padded[real], ids[real], K, "dot")
    assert np.all(np.asarray(found) >= 0)
    np.testing.assert_array_equal(np.asarray(found), want)
    assert np.all(np.isfinite(np.asarray(scores)))


def test_empty_slots_when_fewer_real_rows_than_k(data):
    keys, queries, _ = data
    ids = np.full(512, -1, np.int32)
    ids[[5, 300, 301]] = [7, 8, 9]  # three real rows, two of them in the same bin
    scores, found, _ = knn_pallas.fused_top_k(jnp.asarray(queries), jnp.asarray(keys[:512]), jnp.asarray(ids), K,
                                              metric="dot", bin_size=BIN, config=CONFIG)
    found = np.asarray(found)
    assert all(sorted(row[:3]) == [7, 8, 9] for row in found.tolist())
    assert np.all(np.isneginf(np.asarray(scores)[:, 3:]))


def test_excluded_ids_are_never_returned(data):
    keys, _, ids = data
    members = np.arange(BATCH) * 200 + 3
    queries = keys[members]  # each query is a bank row: its own id is its best match
    prepared = knn.prepare_queries(jnp.asarray(queries), "cosine")
    _, found, _ = knn_pallas.fused_top_k(prepared, jnp.asarray(keys), jnp.asarray(ids), K, metric="cosine",
                                         exclude_ids=jnp.asarray(members), bin_size=BIN, config=CONFIG)
    _, want = brute_force_numpy(queries, keys, ids, K, "cosine", exclude_ids=members)
    np.testing.assert_array_equal(np.asarray(found), want)
    # several per query ([batch, excluded], -1 = unused slot): the three nearest go, the next ones come up
    _, nearest = brute_force_numpy(queries, keys, ids, 3, "cosine")
    exclude = np.concatenate([nearest, np.full((BATCH, 1), -1)], axis=1)
    _, found, _ = knn_pallas.fused_top_k(prepared, jnp.asarray(keys), jnp.asarray(ids), K, metric="cosine",
                                         exclude_ids=jnp.asarray(exclude), bin_size=BIN, config=CONFIG)
    _, want = brute_force_numpy(queries, keys, ids, K, "cosine", exclude_ids=exclude)
    np.testing.assert_array_equal(np.asarray(found), want)


def test_memory_bank_search_with_pallas_on_eight_devices(eight_devices, data):
    keys, queries, _ = data
    rows = 4000  # 504 stored rows per shard: 3 tiles of 128 and an exact tail, plus padding rows
    rng = np.random.default_rng(4)
    ids = rng.permutation(10 * rows)[:rows].astype(np.int32)
    bank = MemoryBank.from_arrays(keys[:rows], {"row": np.arange(rows, dtype=np.int32)}, ids, metric="cosine",
                                  mesh=make_mesh((2, 2, 2)))
    exclude = ids[:BATCH]
    result = bank.search(queries, K, method="pallas", chunk_rows=128, exclude_ids=exclude)
    _, want = brute_force_numpy(queries, keys[:rows], ids, K, "cosine", exclude_ids=exclude)
    np.testing.assert_array_equal(np.asarray(result.ids), want)
    position = {int(i): n for n, i in enumerate(ids)}
    np.testing.assert_array_equal(np.asarray(result.values["row"]), np.vectorize(position.get)(want))


def test_auto_never_picks_pallas_and_bins_suit_the_target():
    for backend in ("cpu", "gpu", "tpu"):
        assert knn.resolve_method("auto", 4_194_304, K, backend=backend) != "pallas"
    assert knn.resolve_method("pallas", 100, K) == "pallas"
    # 4M x 512 bfloat16 keys, k = 10: 64-row bins (see bin_size_for)
    assert knn_pallas.bin_size_for(4_194_304, K, 512, 2, 128) == 64
    assert knn_pallas.bin_size_for(4_194_304, K, 512, 2, 48) == 16  # a power of two dividing the tile
