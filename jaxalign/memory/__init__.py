"""jaxalign.memory: a memory bank sharded over the mesh, searched inside jitted steps, built, saved and loaded.

`MemoryBank` (bank.py) holds the rows and searches them; `knn.py` has the search kernels; `build.py` encodes a
dataset into a bank; `store.py` saves and loads banks with a checked manifest; `commands.py` adds the
`jaxalign build-memory` and `jaxalign search-memory` commands.
"""
from jaxalign.memory.bank import MemoryBank, SearchResult
from jaxalign.memory.build import build_bank, encode_dataset
from jaxalign.memory.knn import METHODS, METRICS, bins_for_recall, brute_force_numpy
from jaxalign.memory.store import MemoryBankFileError, encoder_fingerprint, load_bank, read_manifest, save_bank

__all__ = ["MemoryBank", "SearchResult", "build_bank", "encode_dataset", "METHODS", "METRICS", "bins_for_recall",
           "brute_force_numpy", "MemoryBankFileError", "encoder_fingerprint", "load_bank", "read_manifest",
           "save_bank"]
