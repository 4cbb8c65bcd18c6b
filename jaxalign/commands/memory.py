"""`jaxalign build-memory` and `jaxalign search-memory`: memory banks from the shell.

    jaxalign build-memory --embeddings captions.npz --output banks/captions --metric cosine \\
        --fingerprint siglip-so400m
    jaxalign search-memory --memory banks/captions --queries queries.npy --k 10 > neighbours.jsonl

`--embeddings` is a .npy of keys [N, D] (ids 0..N-1), or a .npz holding `keys` [N, D], optionally `ids` [N],
and any other arrays [N, ...] stored as values under their names.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxalign import sharding
from jaxalign.memory import bank as bank_lib, knn, store


def _parse_mesh(text: str) -> tuple[int, int, int]:
    parts = tuple(int(part) for part in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--mesh needs three sizes data,fsdp,tensor (one may be -1), got {text!r}")
    return parts


def _read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict | None]:
    if not path.is_file():
        raise FileNotFoundError(f"--embeddings {path} does not exist")
    if path.suffix == ".npy":
        return np.load(path), None, None
    if path.suffix != ".npz":
        raise ValueError(f"--embeddings {path}: expected a .npy (keys) or .npz (keys, ids, values) file")
    with np.load(path) as archive:
        if "keys" not in archive:
            raise ValueError(f"--embeddings {path} has arrays {sorted(archive.files)}, but no 'keys' array")
        values = {name: archive[name] for name in archive.files if name not in ("keys", "ids")}
        return archive["keys"], archive["ids"] if "ids" in archive else None, values or None


def build_memory(args: argparse.Namespace) -> int:
    keys, ids, values = _read_embeddings(Path(args.embeddings))
    fingerprint = args.fingerprint or f"file:{Path(args.embeddings).name}"
    mesh = sharding.make_mesh(args.mesh)
    bank = bank_lib.MemoryBank.from_arrays(keys, values, ids, metric=args.metric, mesh=mesh)
    store.save_bank(bank, args.output, fingerprint=fingerprint, extra={"source": str(args.embeddings)})
    print(json.dumps({"output": str(args.output), "count": int(keys.shape[0]), "key_dim": int(keys.shape[1]),
                      "metric": args.metric, "encoder_fingerprint": fingerprint,
                      "values": sorted(values) if values else []}))
    return 0


def search_memory(args: argparse.Namespace) -> int:
    queries = np.load(args.queries)
    if queries.ndim != 2:
        raise ValueError(f"--queries {args.queries} must hold [batch, key_dim] queries, got shape {queries.shape}")
    bank = store.load_bank(args.memory, mesh=sharding.make_mesh(args.mesh), fingerprint=args.fingerprint,
                           key_dim=queries.shape[1], metric=args.metric)
    exclude = np.load(args.exclude_ids) if args.exclude_ids else None
    result = bank.search(queries, args.k, method=args.method, exclude_ids=exclude,
                         with_values=args.with_values)
    scores, ids = np.asarray(result.scores), np.asarray(result.ids)
    for query in range(queries.shape[0]):
        line = {"query": query, "ids": ids[query].tolist(), "scores": [round(float(s), 6) for s in scores[query]]}
        if args.with_values and result.values is not None:
            line["values"] = {name: np.asarray(value[query]).tolist() for name, value in result.values.items()}
        sys.stdout.write(json.dumps(line) + "\n")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build-memory", help="save a sharded memory bank from precomputed embeddings",
        description="Build a memory bank from embeddings (.npy keys, or .npz with keys / ids / value arrays) and "
                    "save it with a manifest (count, dims, dtypes, metric, encoder fingerprint, sha256 per file).")
    build.add_argument("--embeddings", required=True, help=".npy [N, D] keys, or .npz with 'keys' [N, D], "
                                                           "optional 'ids' [N] and value arrays [N, ...]")
    build.add_argument("--output", required=True, help="folder to write (replaced atomically if it exists)")
    build.add_argument("--metric", choices=knn.METRICS, default="cosine", help="similarity (default: cosine)")
    build.add_argument("--fingerprint", default=None,
                       help="name or hash of the encoder that made the keys; search-memory --fingerprint must "
                            "match it (default: file:<embeddings file name>)")
    build.add_argument("--mesh", type=_parse_mesh, default=(-1, 1, 1), help="data,fsdp,tensor (default -1,1,1)")
    build.set_defaults(func=build_memory)

    search = subparsers.add_parser(
        "search-memory", help="search a saved memory bank; prints one JSON line per query",
        description="Load a memory bank (checked against its manifest) and print, for each query row of a .npy, "
                    "a JSON line {query, ids, scores[, values]}, best first.")
    search.add_argument("--memory", required=True, help="folder written by build-memory")
    search.add_argument("--queries", required=True, help=".npy of [batch, key_dim] queries")
    search.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    search.add_argument("--method", choices=knn.METHODS, default="auto", help="search method (default auto)")
    search.add_argument("--metric", choices=knn.METRICS, default=None, help="override the bank's metric")
    search.add_argument("--exclude-ids", default=None, help=".npy of [batch] ids each query may not return")
    search.add_argument("--fingerprint", default=None, help="refuse a bank built by another encoder")
    search.add_argument("--with-values", action="store_true", help="also print each neighbour's values")
    search.add_argument("--mesh", type=_parse_mesh, default=(-1, 1, 1), help="data,fsdp,tensor (default -1,1,1)")
    search.set_defaults(func=search_memory)
