"""Memory-bank search speed: one JSON line per (N, key_dim, B, k, method).

    python bench/retrieval.py                                   # CPU-sized defaults
    python bench/retrieval.py --sizes 1048576:512,4194304:512 --dtype bfloat16 --device-check   # one GPU / TPU

Each line: milliseconds per query batch (median of --repeats), effective key-scan bandwidth (bytes of keys read
per second: N * key_dim * itemsize / time) and recall@k against the exact search. In the same run a NumPy
brute force (matrix product + argpartition on the CPU) is timed, and when torch and a CUDA GPU are present the
peer baseline `../shared/peers/torch_knn.py` is run with the same shape in a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxalign.memory import MemoryBank  # noqa: E402
from jaxalign.sharding import make_mesh  # noqa: E402

PEER = Path(__file__).resolve().parents[2] / "shared" / "peers" / "torch_knn.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="65536:128,262144:128,262144:512",
                        help="comma-separated N:key_dim pairs (default: %(default)s)")
    parser.add_argument("--batch", default="64", help="comma-separated query batch sizes (default: %(default)s)")
    parser.add_argument("--k", default="10", help="comma-separated k values (default: %(default)s)")
    parser.add_argument("--methods", default="exact,binned,approx", help="jaxalign methods (default: %(default)s)")
    parser.add_argument("--metric", default="dot", choices=("dot", "cosine", "l2"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="key dtype")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per scan chunk (default: automatic)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per line (after one warm-up)")
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy brute force")
    parser.add_argument("--device-check", action="store_true",
                        help="print the devices first, and run the torch peer whenever torch sees a GPU")
    return parser.parse_args(argv)


def timed(function, repeats: int) -> float:
    """Median seconds of `function()` after one warm-up call (which also compiles)."""
    jax.block_until_ready(function())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def numpy_brute_force(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ keys.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def torch_peer(n: int, d: int, b: int, k: int) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not PEER.is_file():
        return None
    done = subprocess.run([sys.executable, str(PEER), str(n), str(d), str(b), str(k)], capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        return {"peer": "torch mm+topk", "error": done.stderr.strip()[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    mesh = make_mesh((-1, 1, 1))
    backend = jax.default_backend()
    if args.device_check:
        print(json.dumps({"backend": backend, "devices": [str(device) for device in jax.devices()],
                          "cpu_count": os.cpu_count()}), flush=True)
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    for size in args.sizes.split(","):
        n, d = (int(part) for part in size.split(":"))
        keys = rng.standard_normal((n, d), dtype=np.float32)
        bank = MemoryBank.from_arrays(keys.astype(dtype), metric=args.metric, mesh=mesh)
        for b in (int(x) for x in args.batch.split(",")):
            queries = rng.standard_normal((b, d), dtype=np.float32)
            queries_device = jnp.asarray(queries)
            for k in (int(x) for x in args.k.split(",")):
                # The 1-minute load average: on a shared machine it says how much the timings can be trusted.
                base = {"N": n, "key_dim": d, "B": b, "k": k, "metric": args.metric, "dtype": args.dtype,
                        "backend": backend, "devices": len(jax.devices()), "load_1min": round(os.getloadavg()[0], 1)}
                key_bytes = n * d * dtype.itemsize
                exact_ids = None
                for method in ["exact"] + [m for m in args.methods.split(",") if m != "exact"]:
                    search = jax.jit(lambda memory, q, method=method: memory.search(
                        q, k, method=method, chunk_rows=args.chunk_rows, with_values=False).ids)
                    seconds = timed(lambda: search(bank, queries_device), args.repeats)
                    ids = np.asarray(search(bank, queries_device))
                    exact_ids = ids if method == "exact" else exact_ids
                    if method == "exact" and "exact" not in args.methods.split(","):
                        continue
                    print(json.dumps({**base, "method": method, "ms": round(seconds * 1e3, 3),
                                      "GB/s": round(key_bytes / seconds / 1e9, 2),
                                      "recall": round(recall(ids, exact_ids), 4)}), flush=True)
                if not args.no_numpy:
                    host_keys = np.asarray(keys.astype(dtype), np.float32)
                    seconds = timed(lambda: numpy_brute_force(queries, host_keys, k), max(1, args.repeats // 2))
                    ids = numpy_brute_force(queries, host_keys, k)
                    print(json.dumps({**base, "method": "numpy brute force (CPU)", "backend": "numpy",
                                      "ms": round(seconds * 1e3, 3), "GB/s": round(key_bytes / seconds / 1e9, 2),
                                      "recall": round(recall(ids, exact_ids), 4)}), flush=True)
                peer = torch_peer(n, d, b, k) if (args.device_check or backend == "gpu") else None
                if peer is not None:
                    print(json.dumps({**base, "method": "torch peer", **peer}), flush=True)
        del bank
    return 0


if __name__ == "__main__":
    sys.exit(main())
