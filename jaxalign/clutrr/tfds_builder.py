"""A tfds builder for CLUTRR: generated data, or the released data given as a manual directory.

It writes ``array_record`` files, which tfds reads without TensorFlow through ``tfds.data_source``, and it never
downloads anything: released data must already sit in the manual directory, either as the zip
(``<manual_dir>/data_089907f8.zip``) or unpacked (``<manual_dir>/data_089907f8/*.csv``).

Splits are named after the CSV files: ``1.2,1.3_train.csv`` -> ``train``, ``1.3_test.csv`` -> ``test_1_3``.
Any CSV files (``ClutrrConfig(name, files=(train, *tests))``) can be written the same way, shard by shard and
resumably, by ``prepare_clutrr_shards`` (`jaxalign prepare-data clutrr`), which counts malformed rows.

A record holds every field of its ``reader.ClutrrRow`` plus the CSV file it came from and its position among that
file's rows (``row_features``); ``row_from_features`` gives the identical row back. The CLUTRR trainers read a
prepared data set this way (``jaxalign.clutrr.prepared``, `--config.data.prepared_dir`) instead of the CSVs.

Example::

    builder = ClutrrDataset(config="data_089907f8", data_dir="/tmp/tfds", file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="../shared/data/clutrr"))
    source = tfds.data_source("jaxalign_clutrr/data_089907f8", data_dir="/tmp/tfds")
    source["test_1_3"][0]["target"]   # class id into relations.LABELS
"""
from __future__ import annotations

import ast
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxalign.clutrr import generator, reader, relations

RELEASED_DATASETS: dict[str, str] = {
    "data_089907f8": "generalisation, clean, train k = 2, 3; test k = 2..10",
    "data_db9b8f04": "generalisation, clean, train k = 2, 3, 4; test k = 2..10",
    "data_7c5b0e70": "robustness, clean training; test k = 3 of each noise type",
    "data_06b8f2a1": "robustness, supporting-fact training",
    "data_523348e6": "robustness, irrelevant-fact training",
    "data_d83ecc3e": "robustness, disconnected-fact training",
}


@dataclasses.dataclass
class ClutrrConfig(tfds.core.BuilderConfig):
    """Where the rows come from.

    Attributes:
      released: the name of a released data set (``data_089907f8``), read from the manual directory; empty for
        generated data.
      files: CSV files to read instead (``read_file_specs``: 'train.csv', 'data.zip:1.3_test.csv', 'data.zip' or a
        folder for every ``*_test.csv`` in it), the first one the training file.
      seed, train_ks, test_ks, tasks, rows_per_file, train_rows_per_k: generator settings (generated data only;
        see ``generator.generate_dataset``).
    """

    released: str = ""
    files: tuple[str, ...] = ()
    seed: int = 0
    train_ks: tuple[int, ...] = (2, 3)
    test_ks: tuple[int, ...] = (2, 3, 4, 5, 6)
    tasks: tuple[int, ...] = (1,)
    rows_per_file: int = 100
    train_rows_per_k: int = 500


def split_name(file_name: str) -> str:
    """tfds split name of a CLUTRR CSV file name: ``'1.3_test.csv'`` -> ``'test_1_3'``."""
    stem = os.path.basename(file_name).removesuffix(".csv")
    if stem.endswith("_train"):
        return "train"
    if stem.endswith("_test"):
        return "test_" + stem.removesuffix("_test").replace(".", "_").replace(",", "_")
    raise ValueError(f"{file_name}: not a CLUTRR file name (<task>.<k>_test.csv or <tasks>_train.csv)")


def row_features(row: reader.ClutrrRow, file_name: str = "", position: int = 0) -> dict:
    """The example dict of one row (the features of ``ClutrrDataset``): every field of the row, and the CSV file
    it came from with its position among that file's rows (`file_name`, `position`), so that a reader can name
    file and row and put the rows back in file order. ``row_from_features`` is the inverse."""
    return {
        "file": file_name,
        "position": position,
        "index": row.index,
        "id": row.id,
        "story": row.story,
        "clean_story": row.clean_story,
        "query": list(row.query),
        "target": relations.LABELS.index(row.target),
        "target_relation": relations.RELATION_TYPES.index(row.target_relation),
        "task_name": row.task_name,
        "noise_task": row.noise_task,
        "k": row.k,
        "story_edges": np.asarray(row.story_edges, np.int32).reshape(-1, 2),
        "edge_types": np.asarray([relations.LABELS.index(label) for label in row.edge_types], np.int32),
        "query_edge": np.asarray(row.query_edge, np.int32),
        "names": list(row.names),
        "node_genders": np.asarray([relations.GENDERS.index(g) for _, g in row.genders], np.int32),
        "f_comb": row.f_comb,
        "proof_state": repr(list(row.proof_state)),
        "text_target": list(row.text_target),
        "text_query": row.text_query,
        "syn_story": row.syn_story,
        "node_mapping": repr(dict(row.node_mapping)),
        "task_split": row.task_split,
        "noise_edge_types": np.asarray([relations.LABELS.index(label) for label in row.noise_edge_types], np.int32),
    }


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def row_from_features(example: dict) -> tuple[str, int, reader.ClutrrRow]:
    """(file name, position in the file, row) of a decoded record (``tfds.data_source(...)[i]``): the inverse of
    ``row_features``; the row equals the one the CSV reader gave, field by field."""
    names = [_text(name) for name in example["names"]]
    genders = tuple((name, relations.GENDERS[int(gender)]) for name, gender in zip(names, example["node_genders"]))
    row = reader.ClutrrRow(
        index=int(example["index"]), id=_text(example["id"]), story=_text(example["story"]),
        query=tuple(_text(name) for name in example["query"]), text_query=_text(example["text_query"]),
        target=relations.LABELS[int(example["target"])],
        text_target=tuple(_text(sentence) for sentence in example["text_target"]),
        clean_story=_text(example["clean_story"]),
        proof_state=tuple(ast.literal_eval(_text(example["proof_state"]))), f_comb=_text(example["f_comb"]),
        task_name=_text(example["task_name"]),
        story_edges=tuple((int(head), int(tail)) for head, tail in np.asarray(example["story_edges"]).reshape(-1, 2)),
        edge_types=tuple(relations.LABELS[int(label)] for label in example["edge_types"]),
        query_edge=tuple(int(node) for node in example["query_edge"]), genders=genders,
        syn_story=_text(example["syn_story"]), node_mapping=ast.literal_eval(_text(example["node_mapping"])),
        task_split=_text(example["task_split"]),
        noise_edge_types=tuple(relations.LABELS[int(label)] for label in example["noise_edge_types"]))
    return _text(example["file"]), int(example["position"]), row


class ClutrrDataset(tfds.core.GeneratorBasedBuilder):
    """CLUTRR stories with their symbolic graphs (one config per released data set, plus generated data)."""

    name = "jaxalign_clutrr"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First version.",
                     "1.1.0": "Every field of the CSV row (text_target as sentences, text_query, syn_story, "
                              "node_mapping, task_split, noise_edge_types, the row index) and its file and "
                              "position, so that training reads rows from the data set."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the released CLUTRR zips (data_089907f8.zip, ...) or their unpacked folders in the manual "
        "directory, for example download_config=tfds.download.DownloadConfig(manual_dir='../shared/data/clutrr').")
    BUILDER_CONFIGS = [ClutrrConfig(name="generated", description="Generated with jaxalign.clutrr.generator.")] + [
        ClutrrConfig(name=name, description=text, released=name) for name, text in RELEASED_DATASETS.items()]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CLUTRR kinship reasoning (Sinha et al., EMNLP 2019): story, query and answer, with the "
                        "story's graph (node-index edges, path edge labels, genders).",
            features=tfds.features.FeaturesDict({
                "file": tfds.features.Text(),
                "position": np.int64,
                "index": np.int64,
                "id": tfds.features.Text(),
                "story": tfds.features.Text(),
                "clean_story": tfds.features.Text(),
                "query": tfds.features.Sequence(tfds.features.Text()),
                "target": tfds.features.ClassLabel(names=list(relations.LABELS)),
                "target_relation": tfds.features.ClassLabel(names=list(relations.RELATION_TYPES)),
                "task_name": tfds.features.Text(),
                "noise_task": np.int32,
                "k": np.int32,
                "story_edges": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
                "edge_types": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "query_edge": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                "names": tfds.features.Sequence(tfds.features.Text()),
                "node_genders": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "f_comb": tfds.features.Text(),
                "proof_state": tfds.features.Text(),
                "text_target": tfds.features.Sequence(tfds.features.Text()),
                "text_query": tfds.features.Text(),
                "syn_story": tfds.features.Text(),
                "node_mapping": tfds.features.Text(),
                "task_split": tfds.features.Text(),
                "noise_edge_types": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            }),
            homepage="https://github.com/facebookresearch/clutrr",
            citation="Sinha, Sodhani, Dong, Pineau, Hamilton. CLUTRR: A Diagnostic Benchmark for Inductive "
                     "Reasoning from Text. EMNLP 2019.",
            license="CC-BY-NC 4.0 (released data)",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config: ClutrrConfig = self.builder_config
        if config.files:
            files = read_file_specs(config.files[0], config.files[1:])
        else:
            files = self._released_files(dl_manager) if config.released else self._generated_files()
        return {split_name(name): self._generate_examples(name, rows) for name, rows in files.items()}

    def _released_files(self, dl_manager) -> dict[str, list[reader.ClutrrRow]]:
        name = self.builder_config.released
        manual_dir = os.fspath(dl_manager.manual_dir)
        zip_path = os.path.join(manual_dir, f"{name}.zip")
        if os.path.exists(zip_path):
            return reader.read_zip(zip_path)
        folder = os.path.join(manual_dir, name)
        if os.path.isdir(folder):
            return {f: reader.read_csv(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                    if f.endswith(".csv")}
        raise FileNotFoundError(f"{name}: neither {zip_path} nor the folder {folder} exists. "
                                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

    def _generated_files(self) -> dict[str, list[reader.ClutrrRow]]:
        config: ClutrrConfig = self.builder_config
        with tempfile.TemporaryDirectory() as folder:
            written = generator.generate_dataset(
                folder, config.train_ks, config.test_ks, config.tasks, config.rows_per_file, config.seed,
                train_rows_per_k=config.train_rows_per_k)
            return {name: reader.read_csv(path) for name, path in written.items() if name.endswith(".csv")}

    def _generate_examples(self, file_name: str, rows: Sequence[reader.ClutrrRow]) -> Iterator[tuple[str, dict]]:
        # The unnamed index column restarts within concatenated training files, so key by position.
        for position, row in enumerate(rows):
            yield f"{file_name}:{position}", row_features(row, file_name, position)


def build(config: str | ClutrrConfig, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None):
    """Prepares a CLUTRR config under ``data_dir`` (array_record) and returns its data sources by split.

    Args:
      config: a config name (``'generated'``, ``'data_089907f8'``, ...) or a ``ClutrrConfig``.
      data_dir: the tfds data directory.
      manual_dir: folder holding the released zips (needed for released configs).
    """
    builder = ClutrrDataset(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=download_config)
    return builder.as_data_source()


def _read_spec(spec: str, tests_only: bool, report: reader.ReadReport | None) -> dict[str, list[reader.ClutrrRow]]:
    options = dict(skip_bad=report is not None, report=report)
    if ".zip:" in spec:
        archive, member = spec.split(".zip:", 1)
        return reader.read_zip(archive + ".zip", members=[member], **options)
    if spec.endswith(".zip"):
        if not tests_only:
            raise ValueError(f"{spec}: name the training file inside the zip, e.g. {spec}:1.2,1.3_train.csv")
        import zipfile

        with zipfile.ZipFile(spec) as archive:
            names = [os.path.basename(info.filename) for info in archive.infolist()
                     if info.filename.endswith("_test.csv")]
        return reader.read_zip(spec, members=names, **options)
    if os.path.isdir(spec):
        if not tests_only:
            raise ValueError(f"{spec} is a folder: name the training CSV file")
        return {name: reader.read_csv(os.path.join(spec, name), **options)
                for name in sorted(os.listdir(spec)) if name.endswith("_test.csv")}
    if not os.path.exists(spec):
        raise FileNotFoundError(f"{spec}: no such CLUTRR file")
    return {os.path.basename(spec): reader.read_csv(spec, **options)}


def read_file_specs(train: str, tests: Sequence[str], report: reader.ReadReport | None = None
                    ) -> dict[str, list[reader.ClutrrRow]]:
    """{file name: rows} of a training file and test files, as the CLUTRR configs name them (`data.train`:
    'train.csv' or 'data.zip:member.csv'; `data.test`: CSV files, zips or folders, meaning every ``*_test.csv`` in
    them). With a `report`, malformed rows are skipped and counted in it (else the first one raises).

    Raises:
      ValueError: two files map to one split name.
    """
    files = _read_spec(os.fspath(train), False, report)
    if len(files) != 1 or split_name(next(iter(files))) != "train":
        raise ValueError(f"{train}: the training file must be one CSV named <tasks>_train.csv")
    for spec in tests:
        for name, rows in _read_spec(os.fspath(spec), True, report).items():
            clash = [other for other in files if split_name(other) == split_name(name)]
            if clash:
                raise ValueError(f"{spec}: {name} and {clash[0]} are both split {split_name(name)!r}")
            files[name] = rows
    return files


class _ErrorsKept(reader.ReadReport):
    """A ReadReport that also keeps each skipped row's error (file, row id, field)."""

    def __init__(self):
        super().__init__()
        self.errors: list[reader.ClutrrFormatError] = []

    def add_skip(self, error: reader.ClutrrFormatError) -> None:
        super().add_skip(error)
        self.errors.append(error)


def prepare_clutrr_shards(name: str, train: str, tests: Sequence[str], data_dir: str | os.PathLike, *,
                          skip_bad: bool = True, **shard_options):
    """Writes the CSV files `train` and `tests` (see `read_file_specs`) as the data set ``jaxalign_clutrr/<name>``
    (the records `ClutrrDataset` with ``ClutrrConfig(name, files=...)`` builds, in the same order) shard by shard:
    split over processes and threads, resumable (`jaxalign.data.sharded_prepare.prepare_shards`, whose options
    `shard_options` are). Malformed rows are skipped and counted by field as 'malformed_<field>' ids
    '<file>:<row id>' (`skip_bad=False`: the first one raises). Returns the `PrepareResult`."""
    import hashlib

    from jaxalign.data import sharded_prepare
    from jaxalign.data.batching import SkipReport

    tests = tuple(os.fspath(spec) for spec in tests)
    builder = ClutrrDataset(config=ClutrrConfig(name=name, files=(os.fspath(train),) + tests),
                            data_dir=os.fspath(data_dir), file_format="array_record")
    result = sharded_prepare.finished(builder, shard_options.get("process_index", 0))
    if result is not None:
        return result
    bad = _ErrorsKept() if skip_bad else None
    files = read_file_specs(os.fspath(train), tests, bad)
    plans, digest = [], hashlib.sha256()
    for file_name, rows in files.items():
        skipped = SkipReport(action="kept")
        for error in (bad.errors if bad else []):
            if os.path.basename(error.source) == file_name:
                skipped.total += 1
                skipped.skipped[f"malformed_{error.field}"].append(f"{file_name}:{error.row_id}")
        plans.append(sharded_prepare.SplitPlan(
            split_name(file_name), [f"{file_name}:{position}" for position in range(len(rows))],
            lambda position, rows=rows, file_name=file_name: row_features(rows[position], file_name, position),
            skipped_before=skipped))
        digest.update(file_name.encode() + b"\0" + "\0".join(row.id for row in rows).encode())
    fingerprint = {"files": [os.path.abspath(spec) for spec in (os.fspath(train),) + tests],
                   "rows_sha256": digest.hexdigest()}
    return sharded_prepare.prepare_shards(builder, plans, fingerprint=fingerprint, **shard_options)
