"""Memory-bank search speed: one JSON line per (N, key_dim, B, k, method).

    python bench/retrieval.py                                   # CPU-sized defaults
    python bench/retrieval.py --sizes 1048576:512,4194304:512 --dtype bfloat16 --device-check   # one GPU / TPU

The fused Pallas kernel against the PyTorch peer on one GPU (target: >= 2,500 GB/s at recall@10 >= 0.95):

    python bench/retrieval.py --sizes 4194304:512 --dtype bfloat16 --queries 128 --k 10 \
        --methods exact,binned,pallas --no-numpy --peer --device-check
    # tuning: --pallas-config tile_rows=256,block_queries=128,block_dim=64,num_warps=8,num_stages=3

Each line: milliseconds per query batch (median of --repeats), effective key-scan bandwidth (bytes of keys read
per second: N * key_dim * itemsize / time) and recall@k against the exact search. In the same run a NumPy
brute force (matrix product + argpartition on the CPU) is timed, and when torch and a CUDA GPU are present the
peer baseline `../shared/peers/torch_knn.py` is run with the same shape in a subprocess (random bfloat16 keys of
its own: an exact brute force, so its recall is 1 by construction), followed by a line setting the best jaxalign
method's GB/s beside the peer's. The `pallas` row is skipped on CPU: there the kernel runs in the Pallas
interpreter, which checks correctness (tests/test_knn_pallas.py) but says nothing about speed.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from jaxalign.memory import MemoryBank, knn_pallas  # noqa: E402
from jaxalign.sharding import make_mesh  # noqa: E402

PEER = Path(__file__).resolve().parents[2] / "shared" / "peers" / "torch_knn.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="65536:128,262144:128,262144:512",
                        help="comma-separated N:key_dim pairs (default: %(default)s)")
    parser.add_argument("--batch", "--queries", dest="batch", default="64",
                        help="comma-separated query batch sizes (default: %(default)s)")
    parser.add_argument("--k", default="10", help="comma-separated k values (default: %(default)s)")
    parser.add_argument("--methods", default="exact,binned,approx,pallas",
                        help="jaxalign methods (default: %(default)s; pallas is skipped on CPU)")
    parser.add_argument("--metric", default="dot", choices=("dot", "cosine", "l2"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="key dtype")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per scan chunk (default: automatic)")
    parser.add_argument("--tile-rows", type=int, default=None,
                        help="pallas: key rows per kernel grid step (default: knn_pallas.DEFAULT_CONFIGS)")
    parser.add_argument("--pallas-config", default="",
                        help="pallas: comma-separated KernelConfig overrides, e.g. block_dim=64,num_warps=8")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per line (after one warm-up)")
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy brute force")
    parser.add_argument("--device-check", action="store_true",
                        help="print the devices first, and run the torch peer whenever torch sees a GPU")
    parser.add_argument("--peer", action="store_true",
                        help="run the torch peer on the same sizes when torch and CUDA are present (always on GPU)")
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
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "recall": 1.0}  # exact by construction


def configure_pallas(overrides: str, backend: str) -> None:
    """Applies `--pallas-config key=value,...` to the backend's default kernel configuration."""
    if not overrides:
        return
    fields = {field.name for field in dataclasses.fields(knn_pallas.KernelConfig)}
    changes = {}
    for item in overrides.split(","):
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--pallas-config: unknown field {name!r}; fields are {sorted(fields)}")
        changes[name] = None if value in ("", "none", "None") else int(value)
    config = knn_pallas.default_config(backend)
    knn_pallas.DEFAULT_CONFIGS[backend] = dataclasses.replace(config, **changes)


def main(argv=None) -> int:
    args = parse_args(argv)
    mesh = make_mesh((-1, 1, 1))
    backend = jax.default_backend()
    configure_pallas(args.pallas_config, backend)
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
                measured = {}
                for method in ["exact"] + [m for m in args.methods.split(",") if m != "exact"]:
                    if method == "pallas" and backend == "cpu":
                        print(json.dumps({**base, "method": method, "skipped": "CPU runs the Pallas kernel "
                                          "interpreted: a correctness check (tests/test_knn_pallas.py), not a "
                                          "speed measurement"}), flush=True)
                        continue
                    chunk_rows = args.tile_rows if method == "pallas" else args.chunk_rows
                    search = jax.jit(lambda memory, q, method=method, chunk_rows=chunk_rows: memory.search(
                        q, k, method=method, chunk_rows=chunk_rows, with_values=False).ids)
                    seconds = timed(lambda: search(bank, queries_device), args.repeats)
                    ids = np.asarray(search(bank, queries_device))
                    exact_ids = ids if method == "exact" else exact_ids
                    measured[method] = (key_bytes / seconds / 1e9, recall(ids, exact_ids))
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
                peer = torch_peer(n, d, b, k) if (args.peer or args.device_check or backend == "gpu") else None
                if peer is not None:
                    print(json.dumps({**base, "method": "torch peer", **peer}), flush=True)
                    if "GB/s" in peer:  # side by side: the fused kernel when it ran, else the fastest method
                        name = "pallas" if "pallas" in measured else max(measured, key=lambda m: measured[m][0])
                        print(json.dumps({**base, "compare": f"{name} vs torch peer",
                                          "GB/s": round(measured[name][0], 2), "peer GB/s": peer["GB/s"],
                                          "ratio": round(measured[name][0] / peer["GB/s"], 2),
                                          "recall": round(measured[name][1], 4), "peer recall": 1.0,
                                          "peer dtype": "bfloat16"}), flush=True)
                elif args.peer:
                    print(json.dumps({**base, "method": "torch peer", "skipped": "needs torch with a CUDA GPU "
                                      f"and {PEER}"}), flush=True)
        del bank
    return 0


if __name__ == "__main__":
    sys.exit(main())
