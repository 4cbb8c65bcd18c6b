"""Data preparation as its own step: write the tfds (array_record) data sets a run reads, once, before training.

    jaxalign prepare-data llava --json DIR/questions.json --images DIR/images --data-dir OUT
    jaxalign prepare-data easy-vqa --data-dir OUT
    jaxalign prepare-data clutrr --train DIR/1.2,1.3_train.csv --test DIR --data-dir OUT --name mine
    jaxalign prepare-data --config jaxalign/configs/tinyalign_tiny.py:stage=2,data=llava \\
        --config.data.manual_dir=DIR --config.data.data_dir=OUT

Each data set is written by `jaxalign.data.sharded_prepare.prepare_shards`: the same records in the same order as
the builder's own tfds build (what training builds when nothing was prepared), in shards of
`examples_per_shard` items; each shard is renamed into place when complete and the data set's folder when every
shard is, so an interrupted preparation resumes with the shards it had finished and is never read as a finished
data set. Its skip report (samples left out, by reason, with their ids) is printed and saved as
`prepare_report.json` in the data set's folder (LLaVA sets also get the `build_report.json` training reads).

Split over processes: under a launcher (`launch/local.sh 2 1 jaxalign prepare-data ...`) every process writes its
share of the shards (shard s: process s % process_count) into the one data directory, which every process must
see (a shared file system or gs://); process 0 then writes tfds's metadata and the report and renames the folder,
and every process opens the result to check it. tfds's builders cannot be split like this themselves (a
`GeneratorBasedBuilder` writes one split in one pass of one process and starts over after an interruption), so
the builders here only give the features, names and per-sample code, and the shards are written outside tfds.
Within a process, `workers` threads write shards side by side (reading and decoding images release the GIL).

Training afterwards only reads: tfds reuses a finished data set folder (`download_and_prepare` returns at once), so
`jaxalign train` with the same `config.data` (data_dir, manual_dir, names) never rebuilds. Without prepared data a
training run still builds what it needs as before: process 0 builds with tfds while the others wait.

`prepare-data clutrr` writes CLUTRR CSV files as a `jaxalign_clutrr/<name>` tfds data set (every field of every
row, with its file and position; malformed rows counted), and prints `--config.data.prepared_dir=<its folder>`:
the CLUTRR trainers then read their rows from it (`jaxalign.clutrr.prepared`, lazily: each process reads the rows
it needs) instead of parsing `config.data.train` / `.test` on every process, with the same rows in the same order.

Public API:
  prepare_llava(json_file, data_dir, images=None, name=None, ...) -> Prepared
  prepare_easy_vqa(data_dir=None, configs=('questions', 'captions'), ...) -> [Prepared]
  prepare_clutrr(train, tests, data_dir, name='files', ...) -> Prepared
  prepare_from_config(config, ...) -> [Prepared]: every data set a training config reads
  Prepared.to_json(), Prepared.describe()
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from jaxalign import paths
from jaxalign.data import sharded_prepare

DEFAULT_CLUTRR_NAME = "files"


@dataclasses.dataclass
class Prepared:
    """One prepared data set.

    Attributes:
        dataset: tfds name and config, 'jaxalign_llava/questions' (`tfds.data_source(dataset, data_dir=...)`).
        data_dir: the tfds data directory (what `config.data.data_dir` names).
        result: what `prepare_shards` did (folder, skip reports, shards written and reused).
        train_with: config overrides that make a run read this data set ('--config.data.data_dir=...').
    """

    dataset: str
    data_dir: str
    result: sharded_prepare.PrepareResult
    train_with: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        result = self.result
        return {"dataset": self.dataset, "data_dir": self.data_dir, "dataset_dir": result.dataset_dir,
                "prepared_now": result.prepared, "shards_written": result.shards_written,
                "shards_reused": result.shards_reused,
                "splits": {name: {"kept": report.kept, "total": report.total, "skipped": report.counts}
                           for name, report in result.reports.items()},
                "skipped": result.report.to_json(),
                "report_file": os.path.join(result.dataset_dir, sharded_prepare.PREPARE_REPORT_FILE)
                if result.report_json else None,
                "train_with": self.train_with}

    def describe(self) -> str:
        """Human-readable lines: where it is, what was done, the skip report per split, how to train on it."""
        result = self.result
        done = (f"prepared now: {result.shards_written} shards written by this process, {result.shards_reused} "
                "reused from an interrupted run" if result.prepared else "already prepared: nothing written")
        lines = [f"{self.dataset} -> {result.dataset_dir} ({done})"]
        for name, report in result.reports.items():
            lines.append(f"  {name}: " + str(report).replace("\n", "\n  "))
        if result.report_json:
            lines.append(f"  report: {os.path.join(result.dataset_dir, sharded_prepare.PREPARE_REPORT_FILE)}")
        if self.train_with:
            lines.append("  train on it with: " + " ".join(self.train_with))
        return "\n".join(lines)


def shard_options(workers: int = 1, examples_per_shard: int = sharded_prepare.DEFAULT_EXAMPLES_PER_SHARD,
                  progress: bool = True) -> dict[str, Any]:
    """`prepare_shards` options for this process: its place among the launcher's processes and their barrier."""
    return {"workers": workers, "examples_per_shard": examples_per_shard, "progress": progress,
            "process_index": jax.process_index(), "process_count": jax.process_count(), "barrier": _barrier}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ================================================================================================ LLaVA
def prepare_llava(json_file: str, data_dir: str, images: str | None = None, name: str | None = None, *,
                  check_images: bool = True, fail_fast: bool = False, role: str = "train",
                  **options: Any) -> Prepared:
    """Prepares a LLaVA-format JSON file and its image folder as `jaxalign_llava/<name>`.

    Args:
        json_file: the JSON list of samples; its folder is the manual directory (`config.data.manual_dir`).
        data_dir: the tfds data directory to write.
        images: the folder the samples' image paths are relative to (default: the JSON file's folder).
        name: the tfds config name (default: the JSON file's stem, 'questions' for questions.json).
        check_images: decode every image once (catches truncated files); fail_fast: raise at the first bad one.
        role: 'train', 'eval' or 'memory': which `config.data` fields `train_with` names.
        options: `shard_options(...)` (default: one worker, this process's place).
    """
    json_file = paths.orbax_directory(json_file)  # absolute when local; a gs:// URI unchanged
    if not epath.Path(json_file).is_file():
        raise FileNotFoundError(f"{json_file}: no such file (the LLaVA-format JSON list of samples to prepare)")
    if images and not epath.Path(images).is_dir():
        raise FileNotFoundError(f"{images}: no such folder (the folder the samples' image paths start from)")
    manual_dir = os.path.dirname(json_file)
    image_root = os.path.relpath(paths.orbax_directory(images), manual_dir) if images else ""
    return _prepare_llava_set(manual_dir, os.path.basename(json_file), "" if image_root == "." else image_root,
                              name or os.path.splitext(os.path.basename(json_file))[0], data_dir,
                              check_images=check_images, fail_fast=fail_fast, role=role, **options)


def _prepare_llava_set(manual_dir: str, json_file: str, image_root: str, name: str, data_dir: str, *,
                       check_images: bool, fail_fast: bool, role: str, **options: Any) -> Prepared:
    """`json_file` and `image_root` relative to `manual_dir`, as config.data names them."""
    from jaxalign.data import llava

    fields = {"train": ("train_json", "train_name", "image_root"),
              "eval": ("eval_json", "eval_name", "eval_image_root"),
              "memory": ("memory_json", "memory_name", "memory_image_root")}[role]
    if not (epath.Path(manual_dir) / json_file).is_file():
        raise FileNotFoundError(f"{os.path.join(manual_dir, json_file)}: no such file (config.data.manual_dir / "
                                f"config.data.{fields[0]})")
    config = llava.llava_config(name, json_file, image_root)
    result = llava.prepare_llava_shards(config, manual_dir, data_dir, fail_fast=fail_fast,
                                        check_images=check_images, **(options or shard_options()))
    return Prepared(f"{llava.LlavaDataset.name}/{name}", data_dir, result,
                    [f"--config.data.data_dir={data_dir}", f"--config.data.manual_dir={manual_dir}"]
                    + [f"--config.data.{field}={value}" for field, value in zip(fields, (json_file, name, image_root))])


# ============================================================================================= easy-vqa
def prepare_easy_vqa(data_dir: str | None = None, configs: Sequence[str] = ("questions", "captions"),
                     **options: Any) -> list[Prepared]:
    """Prepares the easy-vqa configs (both splits each) from the installed package, into `data_dir` (default
    `easy_vqa.default_data_dir()`, where training looks when `config.data.data_dir` is empty)."""
    from jaxalign.data import easy_vqa

    data_dir = data_dir or easy_vqa.default_data_dir()
    return [Prepared(f"{easy_vqa.EasyVqa.name}/{config}", data_dir,
                     easy_vqa.prepare_easy_vqa_shards(config, data_dir, **(options or shard_options())),
                     [f"--config.data.data_dir={data_dir}"])
            for config in dict.fromkeys(configs)]


# =============================================================================================== CLUTRR
def prepare_clutrr(train: str, tests: Sequence[str], data_dir: str, name: str = DEFAULT_CLUTRR_NAME, *,
                   skip_bad: bool = True, **options: Any) -> Prepared:
    """Prepares CLUTRR CSV files (`train`: 'file.csv' or 'data.zip:member.csv'; `tests`: CSV files, zips or
    folders: every *_test.csv in them) as `jaxalign_clutrr/<name>`, splits 'train' and 'test_<task>_<k>';
    `train_with` is the override that makes `jaxalign clutrr train-teacher` / `distill` read it
    (`--config.data.prepared_dir=<the data set's folder>`)."""
    from jaxalign.clutrr import tfds_builder

    result = tfds_builder.prepare_clutrr_shards(name, train, tests, data_dir, skip_bad=skip_bad,
                                                **(options or shard_options()))
    return Prepared(f"{tfds_builder.ClutrrDataset.name}/{name}", data_dir, result,
                    [f"--config.data.prepared_dir={result.dataset_dir}"])


# ======================================================================================== from a config
def prepare_from_config(config: ml_collections.ConfigDict, *, data_dir: str | None = None,
                        clutrr_name: str = DEFAULT_CLUTRR_NAME, check_images: bool = True,
                        **options: Any) -> list[Prepared]:
    """Prepares every data set a training config reads: a TinyAlign config's training, evaluation and memory sets
    (`config.data.kind` 'llava' or 'easy_vqa'), or a CLUTRR config's `data.train` and `data.test` files (into
    `data_dir`, which CLUTRR configs do not name). `data_dir` replaces `config.data.data_dir` when given."""
    data = config.data
    options = options or shard_options()
    if "kind" not in data:
        if "train" not in data or not data.train:
            raise ValueError("this config names no data: config.data has neither `kind` (a TinyAlign config) "
                             "nor `train` (a CLUTRR config)")
        if not data_dir:
            raise ValueError("a CLUTRR config names CSV files but no tfds data directory: give --data-dir OUT")
        return [prepare_clutrr(data.train, tuple(data.test), data_dir, clutrr_name, **options)]
    data_dir = data_dir or data.data_dir
    if data.kind == "easy_vqa":
        configs = [data.train_config, data.eval_config] + ([data.memory_config] if data.memory_config else [])
        return prepare_easy_vqa(data_dir or None, configs, **options)
    if data.kind != "llava":
        raise ValueError(f"config.data.kind={data.kind!r}; expected 'easy_vqa' or 'llava'")
    if not data.manual_dir or not data_dir:
        raise ValueError("config.data.kind='llava' needs config.data.manual_dir (the JSON and image folder) and "
                         "config.data.data_dir (where the tfds data set is written; or --data-dir)")
    sets = [("train", data.train_json, data.train_name, data.image_root),
            ("eval", data.eval_json, data.eval_name, data.eval_image_root)]
    if data.memory_json:
        sets.append(("memory", data.memory_json, data.memory_name, data.memory_image_root))
    prepared = []
    for role, json_file, name, image_root in sets:
        prepared.append(_prepare_llava_set(data.manual_dir, json_file, image_root, name, data_dir,
                                           check_images=check_images, fail_fast=data.fail_fast, role=role,
                                           **options))
    return prepared
