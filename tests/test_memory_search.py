"""Sharded memory-bank search on 8 fake CPU devices, checked against a NumPy brute force."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign.memory import MemoryBank, bins_for_recall, brute_force_numpy, knn
from jaxalign.sharding import make_mesh

ROWS, DIM, BATCH, K = 1003, 16, 8, 10  # 1003 rows: not a multiple of 8, so every shard layout has padding


@pytest.fixture(scope="module")
def mesh(eight_devices):
    return make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    ids = rng.permutation(10 * ROWS)[:ROWS].astype(np.int32)  # sparse, unsorted ids
    queries = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    return keys, ids, queries


@pytest.fixture(scope="module")
def bank(mesh, data):
    keys, ids, _ = data
    return MemoryBank.from_arrays(keys, {"row": np.arange(ROWS, dtype=np.int32), "key": keys}, ids, mesh=mesh)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_exact_search_equals_numpy_brute_force(bank, data, metric):
    keys, ids, queries = data
    # chunk_rows=48 does not divide the 128 rows per shard: full chunks plus a remainder chunk.
    result = bank.search(queries, K, metric=metric, method="exact", chunk_rows=48)
    want_scores, want_ids = brute_force_numpy(queries, keys, ids, K, metric)
    np.testing.assert_array_equal(np.asarray(result.ids), want_ids)
    np.testing.assert_allclose(np.asarray(result.scores), want_scores, rtol=1e-5, atol=1e-4)
    # values travel with their rows: the gathered key of each neighbour is that neighbour's key
    position = {int(i): n for n, i in enumerate(ids)}
    rows = np.vectorize(position.get)(want_ids)
    np.testing.assert_array_equal(np.asarray(result.values["row"]), rows)
    np.testing.assert_array_equal(np.asarray(result.values["key"]), keys[rows])


def test_padding_rows_are_never_returned_even_when_k_exceeds_rows(mesh):
    keys = np.eye(5, 4, dtype=np.float32) + 1.0
    small = MemoryBank.from_arrays(keys, ids=np.array([4, 0, 3, 1, 2]), metric="dot", mesh=mesh)
    assert small.capacity == 64 and small.size == 5
    result = small.search(np.ones((2, 4), np.float32), 8, method="exact")
    ids, scores = np.asarray(result.ids), np.asarray(result.scores)
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ids[:, 5:], -1)  # no sixth real row: empty slots, not padding rows
    assert np.all(np.isneginf(scores[:, 5:])) and np.all(np.isfinite(scores[:, :5]))


def test_ties_go_to_the_lower_id_across_shards(mesh):
    rng = np.random.default_rng(1)
    # 2000 rows, only 3 distinct keys, ids shuffled: every score is tied with hundreds of others on every shard,
    # so the top 10 is decided by ids alone. 256 rows per shard in chunks of 128: binned search uses 64 bins.
    pattern = rng.normal(size=(3, DIM)).astype(np.float32)
    choice = rng.integers(0, 3, size=2000)
    ids = rng.permutation(10_000)[:2000]
    tied = MemoryBank.from_arrays(pattern[choice], ids=ids, metric="dot", mesh=mesh)
    assert knn.bin_size_for(128, K, rerank=True, recall_target=0.95) == 2
    for method in ("exact", "binned"):
        result = tied.search(pattern[:1], K, method=method, chunk_rows=128)
        best = choice == np.argmax(pattern @ pattern[0])
        np.testing.assert_array_equal(np.asarray(result.ids)[0], np.sort(ids[best])[:K])


@pytest.mark.parametrize("layout", ["random", "clustered"])
def test_binned_and_approx_recall_at_10(mesh, layout):
    rng = np.random.default_rng(2)
    rows, batch = 8192, 32
    if layout == "random":
        keys = rng.normal(size=(rows, DIM)).astype(np.float32)
        queries = rng.normal(size=(batch, DIM)).astype(np.float32)
    else:  # 64 tight clusters stored one after the other: a query's neighbours sit in consecutive rows
        centres = rng.normal(size=(64, DIM))
        keys = (np.repeat(centres, rows // 64, axis=0) + 0.1 * rng.normal(size=(rows, DIM))).astype(np.float32)
        queries = (centres[rng.integers(0, 64, batch)] + 0.1 * rng.normal(size=(batch, DIM))).astype(np.float32)
    big = MemoryBank.from_arrays(keys, metric="cosine", mesh=mesh)
    _, truth = brute_force_numpy(queries, keys, np.arange(rows), K, "cosine")
    exact = np.asarray(big.search(queries, K, method="exact").ids)
    np.testing.assert_array_equal(exact, truth)
    found = {
        "binned": big.search(queries, K, method="binned").ids,
        "binned, one row per bin": big.search(queries, K, method="binned", rerank=False, recall_target=0.97).ids,
        "approx": big.search(queries, K, method="approx").ids,
    }
    for name, ids in found.items():
        assert recall(np.asarray(ids), exact) >= 0.95, (name, recall(np.asarray(ids), exact))
    assert recall(np.asarray(found["binned"]), exact) == 1.0  # re-ranking the winning bins is exact


def test_leave_one_out_never_returns_the_excluded_id(bank, data):
    keys, ids, _ = data
    members = np.arange(0, ROWS, ROWS // BATCH)[:BATCH]
    queries = keys[members]  # each query is a bank row: its own id is its best match
    own = ids[members]
    for method in ("exact", "binned"):
        found = np.asarray(bank.search(queries, K, method=method, exclude_ids=own).ids)
        assert not np.any(found == own[:, None])
        _, want = brute_force_numpy(queries, keys, ids, K, "cosine", exclude_ids=own)
        np.testing.assert_array_equal(found, want)
    # several excluded ids per query ([batch, excluded], -1 = unused slot)
    _, nearest = brute_force_numpy(queries, keys, ids, 3, "cosine")
    exclude = np.concatenate([nearest, np.full((BATCH, 1), -1)], axis=1)
    found = np.asarray(bank.search(queries, K, method="exact", exclude_ids=exclude).ids)
    assert not np.any(found[:, :, None] == nearest[:, None, :])


def test_search_inside_a_jitted_step_with_sharded_arguments(bank, data, mesh):
    keys, ids, queries = data
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sharded_queries = jax.device_put(queries, batch_sharding)
    exclude = jax.device_put(ids[:BATCH], batch_sharding)

    @jax.jit
    def step(memory, queries, exclude):
        result = memory.search(queries, K, method="binned", exclude_ids=exclude)
        return result.ids, jnp.sum(result.values["key"], axis=(1, 2))

    found, value_sums = step(bank, sharded_queries, exclude)
    _, want = brute_force_numpy(queries, keys, ids, K, "cosine", exclude_ids=ids[:BATCH])
    np.testing.assert_array_equal(np.asarray(found), want)
    position = {int(i): n for n, i in enumerate(ids)}
    np.testing.assert_allclose(np.asarray(value_sums), keys[np.vectorize(position.get)(want)].sum((1, 2)),
                               rtol=1e-5, atol=1e-4)


def test_auto_picks_a_method_per_backend():
    assert knn.resolve_method("auto", 100_000, 10, backend="tpu") == "approx"
    assert knn.resolve_method("auto", 100_000, 10, backend="gpu") == "binned"
    assert knn.resolve_method("auto", 100_000, 10, backend="cpu") == "binned"
    assert knn.resolve_method("auto", 200, 10, backend="gpu") == "exact"
    assert knn.resolve_method("exact", 100_000, 10, backend="tpu") == "exact"
    with pytest.raises(ValueError, match="unknown search method 'fast'"):
        knn.resolve_method("fast", 10, 1)


def test_recall_target_sets_the_bin_count():
    bins = bins_for_recall(10, 0.95)
    expected = lambda count: sum((1 - 1 / count) ** i for i in range(10)) / 10  # noqa: E731
    assert expected(bins) >= 0.95 > expected(bins - 1)
    assert bins_for_recall(10, 0.99) > bins > bins_for_recall(10, 0.9)
    # the bins of a chunk without re-ranking: at least that many
    assert 4096 // knn.bin_size_for(4096, 10, rerank=False, recall_target=0.95) >= bins
