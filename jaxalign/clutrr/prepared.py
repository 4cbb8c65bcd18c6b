"""Reading a prepared CLUTRR data set (`jaxalign prepare-data clutrr`) as the rows the CSV reader gives.

`jaxalign prepare-data clutrr --train T --test ... --data-dir OUT` writes ``OUT/jaxalign_clutrr/<name>/<version>``
(array_record, see ``tfds_builder``); that folder is what `--config.data.prepared_dir` names. Its split 'train'
holds the training file's rows and each 'test_<task>_<k>' split one test file's. Every record carries its file
name and its position in the file (``tfds_builder.row_from_features``), and tfds stores records in the order of the
MD5 of their keys ('<file>:<position>'), so the record of row p of a file is found from the keys alone: rows come
back in file order, one at a time, without reading the others. Nothing here parses a CSV, imports TensorFlow or
downloads anything (a folder that is not a finished data set is an error saying how to write it).

    prepared = open_prepared("OUT/jaxalign_clutrr/files/1.1.0")
    prepared.train[0]                 # reader.ClutrrRow, identical to reader.read_csv(T)[0]
    prepared.tests["1.3_test.csv"]    # lazy rows of one test file
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence

import tensorflow_datasets as tfds

from jaxalign.clutrr import reader, tfds_builder
from jaxalign.data import sharded_prepare


class PreparedRows(Sequence):
    """The rows of one CSV file as stored in one split of a prepared data set, in file order, decoded on access.

    Indexing with an int or a slice reads only those records, so a process featurising its block of a batch reads
    only its rows. `take(indices)` is a view of some of the rows (in the given order), read lazily as well.

    Args:
      source: the split's tfds data source.
      file_name: the CSV file the split holds (records name it).
      split: the split's name, for errors.
      records: record index in `source` of each row of this sequence.
      positions: each row's position in its file (what its record must say).
      where: the data set's folder, for errors.
      lock: serialises reads (the prefetching thread and evaluation may read at once).
    """

    def __init__(self, source, file_name: str, split: str, records: Sequence[int], positions: Sequence[int],
                 where: str, lock: threading.Lock):
        self.source, self.file_name, self.split, self.where, self._lock = source, file_name, split, where, lock
        self._records, self._positions = list(records), list(positions)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self._row(index) for index in range(*item.indices(len(self)))]
        return self._row(range(len(self))[item])

    def _row(self, index: int) -> reader.ClutrrRow:
        with self._lock:
            example = self.source[self._records[index]]
        file_name, position, row = tfds_builder.row_from_features(example)
        if (file_name, position) != (self.file_name, self._positions[index]):
            raise RuntimeError(f"{self.where}: split {self.split!r}: record {self._records[index]} is row {position} "
                               f"of {file_name}, expected row {self._positions[index]} of {self.file_name}; the "
                               "data set was not written by `jaxalign prepare-data clutrr`: prepare it again")
        return row

    def take(self, indices: Sequence[int]) -> "PreparedRows":
        """The rows at `indices` (into this sequence), as a lazy sequence."""
        return PreparedRows(self.source, self.file_name, self.split, [self._records[i] for i in indices],
                            [self._positions[i] for i in indices], self.where, self._lock)


@dataclasses.dataclass
class PreparedData:
    """A prepared CLUTRR data set: `train` (the training file's rows) and `tests` ({test file name: rows}, in the
    order `clutrr_trainer.read_test_files` gives), all lazy `PreparedRows`."""

    folder: str
    train: PreparedRows | None
    tests: dict[str, PreparedRows]


def _not_prepared(folder: str, problem: str) -> FileNotFoundError:
    name = tfds_builder.ClutrrDataset.name
    inside = sorted(os.fspath(path) for path in _dataset_folders(folder))
    hint = (f" It holds prepared data sets: {', '.join(inside[:6])}; name one of them." if inside else "")
    return FileNotFoundError(
        f"data.prepared_dir={folder}: {problem}.{hint} Write one with `jaxalign prepare-data clutrr --train "
        f"FILE.csv --test DIR --data-dir OUT` and pass the folder it prints (OUT/{name}/<name>/<version>), or "
        "leave data.prepared_dir empty to read the CSV files of data.train / data.test")


def _dataset_folders(folder: str) -> list[str]:
    root = os.path.join(folder, tfds_builder.ClutrrDataset.name)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, config, version) for config in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, config)) for version in sorted(os.listdir(os.path.join(root, config)))
            if os.path.isfile(os.path.join(root, config, version, "dataset_info.json"))]


def open_prepared(folder: str | os.PathLike) -> PreparedData:
    """Opens the version folder of a `jaxalign_clutrr` data set written by `prepare-data clutrr` (no download).

    Raises:
      FileNotFoundError: the folder is missing, half-written or not a data set (naming the data sets under it,
        if it is a tfds data directory).
      ValueError: a data set of another builder, or of an older version of this one (without the fields training
        reads): prepare it again.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise _not_prepared(folder, "no such folder")
    if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        if folder.endswith(".preparing"):
            raise _not_prepared(folder, "an unfinished preparation; rerun the same prepare-data command to finish it")
        raise _not_prepared(folder, "not a finished tfds data set (no dataset_info.json)")
    builder = tfds.builder_from_directory(folder)
    version = str(tfds_builder.ClutrrDataset.VERSION)
    if builder.name != tfds_builder.ClutrrDataset.name or str(builder.version) != version:
        raise ValueError(f"data.prepared_dir={folder}: a {builder.name} data set of version {builder.version}, "
                         f"not a {tfds_builder.ClutrrDataset.name} one of version {version} (which holds every field "
                         "training reads); prepare it again with `jaxalign prepare-data clutrr`")
    lock = threading.Lock()
    files: dict[str, PreparedRows] = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        if not len(source):
            continue
        with lock:
            file_name = tfds_builder.row_from_features(source[0])[0]
        keys = [f"{file_name}:{position}" for position in range(len(source))]
        # tfds stores a split's records sorted by the hash of their keys (as prepare_shards writes them).
        order = sharded_prepare.ordered_shards(split, keys, len(keys))[0]
        record_of_position = [0] * len(keys)
        for record, position in enumerate(order):
            record_of_position[position] = record
        files[split] = PreparedRows(source, file_name, split, record_of_position, range(len(keys)), folder, lock)
    tests = {rows.file_name: rows for split, rows in files.items() if split != "train"}
    return PreparedData(folder, files.get("train"),
                        dict(sorted(tests.items(), key=lambda item: reader.file_order(item[0]))))
