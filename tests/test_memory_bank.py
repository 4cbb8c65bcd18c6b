"""Memory bank life cycle: build from a dataset, add / replace rows, save / load with a checked manifest, CLI."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.memory import (MemoryBank, MemoryBankFileError, brute_force_numpy, build_bank, encoder_fingerprint,
                             load_bank, read_manifest, save_bank, store)
from jaxalign.memory.build import bank_from_process_rows
from jaxalign.sharding import make_mesh

ROWS, DIM, K = 203, 8, 5  # 203 rows: not a multiple of the 8 devices


@pytest.fixture(scope="module")
def mesh(eight_devices):
    return make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    values = {"tokens": rng.integers(0, 1000, size=(ROWS, 4)).astype(np.int32),
              "latent": (rng.normal(size=(ROWS, 2, 3)).astype(np.float32), rng.random(ROWS) > 0.5)}
    ids = rng.permutation(1000)[:ROWS].astype(np.int32)
    queries = rng.normal(size=(6, DIM)).astype(np.float32)
    return keys, values, ids, queries


@pytest.fixture(scope="module")
def bank(mesh, data):
    keys, values, ids, _ = data
    return MemoryBank.from_arrays(keys, values, ids, metric="cosine", mesh=mesh)


def host(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def assert_same_search(first: MemoryBank, second: MemoryBank, queries: np.ndarray) -> None:
    a, b = first.search(queries, K, method="exact"), second.search(queries, K, method="exact")
    np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))
    np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), rtol=1e-6, atol=1e-6)
    for x, y in zip(host(a.values), host(b.values)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_is_bit_identical(bank, mesh, data, tmp_path):
    keys, values, ids, queries = data
    fingerprint = encoder_fingerprint("toy-encoder", params={"w": np.ones((2, 2))}, config={"width": 8})
    save_bank(bank, tmp_path / "bank", fingerprint=fingerprint)
    loaded = load_bank(tmp_path / "bank", mesh=mesh, fingerprint=fingerprint, key_dim=DIM)
    assert loaded.metric == "cosine" and loaded.size == ROWS
    for saved, restored in zip(host((bank.keys, bank.ids, bank.values)), host((loaded.keys, loaded.ids,
                                                                               loaded.values))):
        assert saved.dtype == restored.dtype
        np.testing.assert_array_equal(saved.view(np.uint8), restored.view(np.uint8))
    assert isinstance(loaded.values["latent"], tuple)
    manifest = read_manifest(tmp_path / "bank")
    assert (manifest["count"], manifest["key_dim"], manifest["key_dtype"]) == (ROWS, DIM, "float32")
    assert manifest["encoder_fingerprint"] == fingerprint
    assert manifest["format_version"] == 2 and len(manifest["shards"]) == 7  # 203 rows, 32 a shard: 7 shards
    assert [shard["rows"] for shard in manifest["shards"]] == [32] * 6 + [11]
    assert all(len(entry["sha256"]) == 64 for shard in manifest["shards"] for entry in shard["files"].values())
    assert_same_search(bank, loaded, queries)


def test_bfloat16_keys_round_trip(mesh, data, tmp_path):
    keys, _, ids, _ = data
    half = MemoryBank.from_arrays(jnp.asarray(keys, jnp.bfloat16), ids=ids, metric="dot", mesh=mesh)
    save_bank(half, tmp_path / "half", fingerprint="f")
    loaded = load_bank(tmp_path / "half", mesh=mesh)
    assert loaded.keys.dtype == jnp.bfloat16 and loaded.values is None
    np.testing.assert_array_equal(np.asarray(half.keys).view(np.uint16), np.asarray(loaded.keys).view(np.uint16))


@pytest.fixture()
def saved(bank, tmp_path):
    return save_bank(bank, tmp_path / "bank", fingerprint="encoder-a")


def test_corrupted_file_is_refused(saved, mesh):
    path = saved / "shards" / "00002" / "keys.bin"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    raw[101] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(MemoryBankFileError, match=r"shards/00002/keys\.bin is corrupted: its sha256 differs"):
        load_bank(saved, mesh=mesh)


def test_truncated_file_is_refused(saved, mesh):
    path = saved / "shards" / "00000" / "values" / "tokens.bin"
    path.write_bytes(path.read_bytes()[:-7])  # 32 rows of 4 int32
    with pytest.raises(MemoryBankFileError, match=r"tokens\.bin is truncated or padded: 505 bytes, the manifest "
                                                  r"says 512"):
        load_bank(saved, mesh=mesh)


def test_missing_manifest_is_refused(tmp_path, mesh):
    with pytest.raises(MemoryBankFileError, match="is not a saved memory bank"):
        load_bank(tmp_path, mesh=mesh)


def test_fingerprint_mismatch_says_what_differs(saved, mesh):
    with pytest.raises(MemoryBankFileError, match="encoder fingerprint mismatch: the bank was built with "
                                                  "'encoder-a', the queries come from 'encoder-b'"):
        load_bank(saved, mesh=mesh, fingerprint="encoder-b")


def test_dimension_mismatch_says_what_differs(saved, mesh):
    with pytest.raises(MemoryBankFileError, match="key dimension mismatch: the bank's keys are 8 wide, the queries "
                                                  "are 16 wide"):
        load_bank(saved, mesh=mesh, key_dim=16)


def test_save_is_atomic_and_replaces_an_existing_bank(bank, saved, mesh, monkeypatch):
    before = {path.relative_to(saved): path.read_bytes() for path in saved.rglob("*.bin")}

    def fail(path):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_sha256", fail)  # fails half-way through writing the new copy
    with pytest.raises(OSError, match="disk full"):
        save_bank(bank, saved, fingerprint="encoder-b")
    monkeypatch.undo()
    assert sorted(path.name for path in saved.parent.iterdir()) == ["bank"]  # no staging folder left behind
    assert {path.relative_to(saved): path.read_bytes() for path in saved.rglob("*.bin")} == before
    assert read_manifest(saved)["encoder_fingerprint"] == "encoder-a"
    save_bank(bank, saved, fingerprint="encoder-b")
    assert sorted(path.name for path in saved.parent.iterdir()) == ["bank"]
    assert load_bank(saved, mesh=mesh, fingerprint="encoder-b").size == ROWS


# ------------------------------------------------------------------------------------------------------- updates
def test_add_matches_a_rebuild(bank, mesh, data):
    keys, values, ids, queries = data
    first = np.arange(ROWS) < 150
    partial = MemoryBank.from_arrays(keys[first], _rows(values, first), ids[first], mesh=mesh)
    # the added ids interleave with the stored ones, so rows must move on device
    grown = partial.add(keys[~first], _rows(values, ~first), ids[~first])
    assert grown.size == ROWS
    np.testing.assert_array_equal(grown.host_ids(), np.sort(ids))
    assert_same_search(grown, bank, queries)
    with pytest.raises(ValueError, match=r"ids \[\d+\] are already in the bank; use replace_rows"):
        grown.add(keys[:1], _rows(values, slice(0, 1)), ids[:1])


def test_add_without_ids_numbers_new_rows_after_the_largest(bank, data):
    keys, values, ids, _ = data
    grown = bank.add(keys[:2] * 2, _rows(values, slice(0, 2)))
    np.testing.assert_array_equal(grown.host_ids()[-2:], [ids.max() + 1, ids.max() + 2])
    result = grown.search(keys[:1] * 2, 1, metric="dot", method="exact")
    assert int(result.ids[0, 0]) == ids.max() + 1  # the doubled key beats the original under 'dot'


def test_replace_rows_matches_a_rebuild(bank, mesh, data):
    keys, values, ids, queries = data
    chosen = np.array([3, 50, 199])
    new_keys = np.random.default_rng(4).normal(size=(3, DIM)).astype(np.float32)
    new_tokens = np.full((3, 4), 7, np.int32)
    rebuilt_keys, rebuilt_values = keys.copy(), _rows(values, slice(None))
    rebuilt_keys[chosen] = new_keys
    rebuilt_values["tokens"][chosen] = new_tokens
    rebuilt = MemoryBank.from_arrays(rebuilt_keys, rebuilt_values, ids, mesh=mesh)
    new_values = {"tokens": new_tokens, "latent": tuple(leaf[chosen] for leaf in values["latent"])}
    replaced = bank.replace_rows(ids[chosen], new_keys, new_values)
    assert_same_search(replaced, rebuilt, np.concatenate([queries, new_keys]))
    keys_only = bank.replace_rows(ids[chosen], new_keys)
    np.testing.assert_array_equal(np.asarray(keys_only.values["tokens"]), np.asarray(bank.values["tokens"]))
    with pytest.raises(KeyError, match=r"ids \[1000\] are not in the bank; use add"):
        bank.replace_rows(np.array([1000]), new_keys[:1])


def _rows(values, which):
    return {"tokens": values["tokens"][which].copy(), "latent": tuple(leaf[which] for leaf in values["latent"])}


# --------------------------------------------------------------------------------------------------------- build
def test_build_from_a_dataset_equals_direct_encoding(mesh, data):
    keys, values, ids, queries = data
    weights = np.random.default_rng(5).normal(size=(DIM, DIM)).astype(np.float32)
    tokens = values["tokens"]

    def encode(batch):
        return jnp.tanh(batch["features"] @ weights), {"tokens": batch["tokens"]}

    batches = [{"features": keys[start:start + 32], "tokens": tokens[start:start + 32], "id": ids[start:start + 32]}
               for start in range(0, ROWS, 32)]  # the last batch is short (11 rows)
    built = build_bank(batches, encode, metric="cosine", mesh=mesh, progress=False)
    direct = MemoryBank.from_arrays(np.tanh(keys @ weights), {"tokens": tokens}, ids, mesh=mesh)
    np.testing.assert_array_equal(built.host_ids(), np.sort(ids))
    np.testing.assert_allclose(np.asarray(built.keys), np.asarray(direct.keys), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(built.values["tokens"]), np.asarray(direct.values["tokens"]))
    assert_same_search(built, direct, queries)
    numbered = build_bank([{"features": b["features"], "tokens": b["tokens"]} for b in batches], encode, mesh=mesh,
                          progress=False)
    np.testing.assert_array_equal(numbered.host_ids(), np.arange(ROWS))


# ----------------------------------------------------------------------------------------------------------- CLI
def test_cli_build_and_search_memory(tmp_path, data, capsys):
    keys, values, ids, queries = data
    np.savez(tmp_path / "embeddings.npz", keys=keys, ids=ids, tokens=values["tokens"])
    np.save(tmp_path / "queries.npy", queries)
    np.save(tmp_path / "exclude.npy", ids[:len(queries)])
    assert cli.main(["build-memory", "--embeddings", str(tmp_path / "embeddings.npz"), "--output",
                     str(tmp_path / "bank"), "--metric", "l2", "--fingerprint", "toy", "--mesh", "2,2,2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["count"], summary["key_dim"], summary["values"]) == (ROWS, DIM, ["tokens"])
    assert cli.main(["search-memory", "--memory", str(tmp_path / "bank"), "--queries", str(tmp_path / "queries.npy"),
                     "--k", str(K), "--exclude-ids", str(tmp_path / "exclude.npy"), "--fingerprint", "toy",
                     "--with-values", "--mesh", "2,2,2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want_scores, want_ids = brute_force_numpy(queries, keys, ids, K, "l2", exclude_ids=ids[:len(queries)])
    assert [line["ids"] for line in lines] == want_ids.tolist()
    np.testing.assert_allclose([line["scores"] for line in lines], want_scores, rtol=1e-4, atol=1e-4)
    position = {int(i): n for n, i in enumerate(ids)}
    assert lines[0]["values"]["tokens"] == values["tokens"][[position[i] for i in want_ids[0]]].tolist()
    with pytest.raises(MemoryBankFileError, match="fingerprint mismatch"):
        cli.main(["search-memory", "--memory", str(tmp_path / "bank"), "--queries", str(tmp_path / "queries.npy"),
                  "--fingerprint", "other"])
    assert Path(tmp_path / "bank" / "manifest.json").is_file()


# ------------------------------------------------------------------------------- rows from processes, any mesh
def test_bank_from_process_rows_equals_from_arrays(mesh, bank, data):
    """The device-to-device exchange stores exactly what `from_arrays` stores (here one process holds all rows)."""
    keys, values, ids, _ = data
    moved = bank_from_process_rows(keys, values, ids, metric="cosine", mesh=mesh)
    for expected, got in zip(host((bank.keys, bank.ids, bank.values)), host((moved.keys, moved.ids, moved.values))):
        np.testing.assert_array_equal(expected, got)


@pytest.mark.parametrize("devices", [1, 2, 8])
def test_saved_bank_loads_onto_another_device_count(saved, data, devices):
    keys, values, ids, queries = data
    other = make_mesh((devices, 1, 1), devices=jax.devices()[:devices])
    loaded = load_bank(saved, mesh=other)
    np.testing.assert_array_equal(loaded.host_ids(), np.sort(ids))
    assert loaded.capacity == (256 if devices == 8 else 208)
    want_scores, want_ids = brute_force_numpy(queries, keys, ids, K, "cosine")
    hits = loaded.search(queries, K, method="exact")
    np.testing.assert_array_equal(np.asarray(hits.ids), want_ids)
    order = np.argsort(ids)
    np.testing.assert_array_equal(np.asarray(loaded.values["tokens"])[:ROWS], values["tokens"][order])


def test_version_1_folder_still_loads(bank, data, mesh, tmp_path):
    """A bank written by the single-file format (keys.bin, ids.bin, values/ at the top) loads unchanged."""
    keys, values, ids, queries = data
    order = np.argsort(ids)
    folder = tmp_path / "v1"
    arrays = {"keys.bin": keys[order], "ids.bin": ids[order].astype(np.int32)}
    structure = store._structure({name: np.asarray(leaf)[order] for name, leaf in [("tokens", values["tokens"])]},
                                 "", arrays)
    files = {name: store._write_array(folder / name, np.asarray(array)) for name, array in arrays.items()}
    (folder / "manifest.json").write_text(json.dumps(
        {"format": store.FORMAT, "format_version": 1, "count": ROWS, "key_dim": DIM, "key_dtype": "float32",
         "metric": "cosine", "encoder_fingerprint": "old", "values": structure, "files": files, "extra": {}}))
    loaded = load_bank(folder, mesh=mesh, fingerprint="old")
    np.testing.assert_array_equal(np.asarray(loaded.keys), np.asarray(bank.keys))
    np.testing.assert_array_equal(np.asarray(loaded.values["tokens"]), np.asarray(bank.values["tokens"]))
    assert_same_search(loaded, MemoryBank.from_arrays(keys, {"tokens": values["tokens"]}, ids, mesh=mesh), queries)
