"""One process of the loopback multi-host memory-bank check (run by tests/test_multihost.py, not collected).

Two processes (4 fake CPU devices each) build one bank from the same dataset with `build_bank`: each encodes
every other batch and the rows move device to device into place. Both then search it (exact and binned, with
leave-one-out), save it (each process writes its own shards), load it back and search again. Each prints one JSON
line that the test compares with a NumPy reference computed from `dataset()` alone, with what the process held
on its host: the rows it encoded and every array it all-gathered (only ids, counts and checksums may travel).
"""
import json
import os
import sys

import numpy as np

NUM_ROWS, BATCH, KEY_DIM, K = 67, 8, 16, 5        # 9 batches, the last one short (3 rows)


def dataset() -> list[dict]:
    """Batches of {'id': [b], 'x': [b, KEY_DIM]}: ids are 1000 + 3 * row (not 0..N-1), so ids are checked."""
    rng = np.random.default_rng(7)
    features = rng.normal(size=(NUM_ROWS, KEY_DIM)).astype(np.float32)
    ids = 1000 + 3 * np.arange(NUM_ROWS)
    return [{"id": ids[i:i + BATCH], "x": features[i:i + BATCH]} for i in range(0, NUM_ROWS, BATCH)]


def queries() -> tuple[np.ndarray, np.ndarray]:
    """Queries [6, KEY_DIM] (three of them are bank rows) and the id each must not retrieve [6]."""
    rows = np.concatenate([b["x"] for b in dataset()])
    rng = np.random.default_rng(8)
    picked = np.array([0, 33, 66])
    found = np.concatenate([rows[picked], rng.normal(size=(3, KEY_DIM)).astype(np.float32)])
    exclude = np.concatenate([1000 + 3 * picked, [-1, -1, -1]])
    return found, exclude


def encode(batch):
    """keys = 2 x (so keys are computed, not copied); values = {'tokens': [b, 2] from the id, 'x': the input}."""
    import jax.numpy as jnp
    return 2.0 * batch["x"], {"tokens": jnp.stack([batch["id"], -batch["id"]], axis=1), "x": batch["x"]}


def main() -> None:
    from jaxalign import distributed
    assert distributed.initialize_from_environment(), "the launcher did not set JAXALIGN_COORDINATOR"
    import jax
    from jax.experimental import multihost_utils

    from jaxalign import sharding
    from jaxalign.memory import build, store

    gathered, encoded = [], []
    allgather, encode_local = multihost_utils.process_allgather, build.encode_local

    def recording_allgather(tree, *args, **kwargs):
        gathered.extend([list(np.shape(leaf)), np.asarray(leaf).dtype.name] for leaf in jax.tree.leaves(tree))
        return allgather(tree, *args, **kwargs)

    def recording_encode_local(*args, **kwargs):
        output = encode_local(*args, **kwargs)
        encoded.append(int(output[0].shape[0]))
        return output

    multihost_utils.process_allgather, build.encode_local = recording_allgather, recording_encode_local
    mesh = sharding.make_mesh((-1, 1, 1))
    bank = build.build_bank(dataset(), encode, metric="cosine", mesh=mesh, progress=False)
    folder = os.path.join(sys.argv[1], "bank")
    store.save_bank(bank, folder, fingerprint="multihost-test")
    multihost_utils.process_allgather, build.encode_local = allgather, encode_local
    found, exclude = queries()
    result = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
              "size": bank.size, "capacity": bank.capacity, "host_ids": bank.host_ids().tolist(),
              "gathered_while_building_and_saving": gathered, "encoded_rows": encoded,
              "local_shard_rows": sum(shard.data.shape[0] for shard in bank.keys.addressable_shards)}
    for method in ("exact", "binned"):
        hits = bank.search(found, K, method=method, exclude_ids=exclude)
        result[method] = {"ids": np.asarray(multihost_utils.process_allgather(hits.ids, tiled=True)).tolist(),
                          "tokens": np.asarray(multihost_utils.process_allgather(hits.values["tokens"],
                                                                                 tiled=True)).tolist()}
    loaded = store.load_bank(folder, mesh=mesh, fingerprint="multihost-test")
    hits = loaded.search(found, K, method="exact", exclude_ids=exclude)
    result["loaded_exact_ids"] = np.asarray(multihost_utils.process_allgather(hits.ids, tiled=True)).tolist()
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
