"""Writing a tfds data set shard by shard: split over processes and threads, resumable, never half-finished.

tfds's own `download_and_prepare` writes a data set in one pass of one process, and an interrupted pass starts
again from nothing. `prepare_shards` writes the same data set (same features, same files, same record order, read
with `tfds.data_source` as before) in fixed shards that are independent pieces of work:

- **Order.** tfds sorts the examples of a split by the MD5 of (split name, example key). The shards here are
  consecutive runs of that order, computed from the keys alone before any image is read, so the records of the
  finished data set come out in exactly the order of a tfds build of the same builder (record i is the same
  sample either way; only the shard files differ).
- **Split.** Shard s of the plan is written by process `s % process_count`, and within a process by a pool of
  `workers` threads (image reading and decoding release the GIL). Every process must see the same `data_dir`
  (a shared file system or `gs://`).
- **Resumable.** A shard is written under a temporary name and renamed when complete; a small marker file
  (`shard-<split>-<s>.json`: its length, bytes and skip report) follows the rename. A rerun skips every shard
  with a marker. The plan (keys, shard size, source fingerprint) is saved as `plan.json`: a rerun over changed
  input starts over instead of mixing old and new shards.
- **Never half-finished.** Everything is written to `<version>.preparing/` next to the data set's version folder;
  when every shard has its marker, process 0 writes tfds's metadata and the reports and renames the folder to
  `<version>/`. tfds takes a data set as built when that folder exists, so an interrupted preparation is never
  read as a finished one. (On a POSIX file system the rename is atomic; on gs:// it is a copy, as it is for
  tfds's own builds.)

With several processes the steps are separated by `barrier` (every process calls it): process 0 checks or
writes the plan; every process writes its shards; process 0 finishes; every process checks the result.

Public API:
  prepare_shards(builder, splits, fingerprint=..., ...) -> PrepareResult;  SplitPlan(name, keys, make_example)
  finished(builder) -> PrepareResult | None;  existing_result(dataset_dir);  read_prepare_report(dataset_dir)
  ordered_shards(split, keys, examples_per_shard), shard_assignment(num_shards, process_index, process_count)

Example::

    builder = LlavaDataset(config=..., data_dir=out, file_format="array_record")
    result = prepare_shards(builder, [SplitPlan("train", keys, make_example)], fingerprint={"json": digest})
    print(result.report)          # the merged skip report of every split
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow_datasets as tfds
import tqdm
from etils.epath import Path
from tensorflow_datasets.core import example_serializer, file_adapters, hashing

from jaxalign.data.batching import SkipReport

log = logging.getLogger(__name__)

PREPARE_REPORT_FILE = "prepare_report.json"
PLAN_FILE = "plan.json"
WORK_SUFFIX = ".preparing"
DEFAULT_EXAMPLES_PER_SHARD = 1024


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """What one split holds, before any example is made.

    Attributes:
        name: the tfds split name ('train', 'test_1_3').
        keys: one tfds example key per item, in source order (they decide the record order, as in tfds).
        make_example: item index (into `keys`) -> the example dict of the builder's features; raises one of
            `skip_errors` (an error with `sample_id` and `reason`) to leave the item out and count it.
        skipped_before: items already left out before the plan (rows a reader rejected), counted in the report.
    """

    name: str
    keys: Sequence[int | str]
    make_example: Callable[[int], dict[str, Any]]
    skipped_before: SkipReport | None = None


@dataclasses.dataclass
class PrepareResult:
    """What `prepare_shards` did.

    Attributes:
        dataset_dir: the finished data set's version folder.
        reports: split name -> the SkipReport of its items (the items rejected before the plan included).
        prepared: False when the data set was already there and nothing was written.
        shards_written / shards_reused: shards this process wrote in this call / found written by an earlier one.
        report_json: the content of `prepare_report.json`.
    """

    dataset_dir: str
    reports: dict[str, SkipReport]
    prepared: bool
    shards_written: int = 0
    shards_reused: int = 0
    report_json: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def report(self) -> SkipReport:
        """The skip reports of every split, merged."""
        merged = SkipReport(action="kept")
        for report in self.reports.values():
            merged = merged.merge(report)
        return merged


def finished(builder: tfds.core.DatasetBuilder, process_index: int = 0) -> PrepareResult | None:
    """The result of `builder`'s data set when it exists (prepared, or built by tfds: then without reports), else
    None. Process 0 removes the work folder of an interrupted preparation that the data set no longer needs."""
    final = Path(builder.data_dir)
    if not final.exists():
        return None
    if process_index == 0 and work_dir(builder).exists():
        work_dir(builder).rmtree()
    return existing_result(final)


def work_dir(builder: tfds.core.DatasetBuilder) -> Path:
    """Where a preparation of `builder`'s data set writes until it is finished: `<version>.preparing/`."""
    return Path(builder.data_dir).parent / (Path(builder.data_dir).name + WORK_SUFFIX)


def shard_assignment(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The shards that process `process_index` of `process_count` writes: s with s % process_count == index."""
    return list(range(process_index, num_shards, process_count))


def ordered_shards(split: str, keys: Sequence[int | str], examples_per_shard: int) -> list[list[int]]:
    """The item indexes of each shard of a split: items sorted as tfds sorts them (MD5 of the key salted with the
    split name), cut into runs of `examples_per_shard`. At least one shard, possibly empty."""
    hasher = hashing.Hasher(split)
    order = sorted(range(len(keys)), key=lambda index: hasher.hash_key(keys[index]))
    return [order[start:start + examples_per_shard]
            for start in range(0, len(order), examples_per_shard)] or [[]]


def read_prepare_report(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The `prepare_report.json` of a data set written by `prepare_shards`."""
    path = Path(dataset_dir) / PREPARE_REPORT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no preparation report; the data set was not written by prepare-data")
    return json.loads(path.read_text())


def prepare_shards(
    builder: tfds.core.GeneratorBasedBuilder,
    splits: Sequence[SplitPlan],
    *,
    fingerprint: dict[str, Any],
    skip_errors: tuple[type[Exception], ...] = (),
    fail_fast: bool = False,
    examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
    workers: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[str], None] | None = None,
    finish: Callable[[Path, dict[str, SkipReport]], None] | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Writes `builder`'s data set (array_record) from `splits`, or returns at once when it exists.

    Args:
        builder: a tfds builder made with `file_format="array_record"`; gives the name, version, features and
            folder. Its own generation code is not run.
        splits: what each split holds.
        fingerprint: what the input is (file digests, builder options): part of the plan, so that a rerun over
            other input starts over.
        skip_errors: exception types of `make_example` that leave an item out (counted by `reason`).
        fail_fast: raise the first skip error instead of counting it.
        examples_per_shard: items per shard (the unit of resumption and of work split).
        workers: threads per process writing shards.
        process_index, process_count: this process's place; shard s is written by process s % process_count.
        barrier: called with a name by every process at the same points (None: one process).
        finish: called by process 0 with the work folder and the reports before the rename (extra files).
        progress: show a progress bar (hidden when stderr is not a terminal).
    """
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard={examples_per_shard}: must be at least 1")
    barrier = barrier or (lambda name: None)
    final = Path(builder.data_dir)
    done = finished(builder, process_index)
    if done is not None:
        return done
    work = work_dir(builder)
    shards = {split.name: ordered_shards(split.name, split.keys, examples_per_shard) for split in splits}
    plan = {"dataset": f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name,
            "version": str(builder.version), "examples_per_shard": examples_per_shard, "fingerprint": fingerprint,
            "splits": {split.name: {"items": len(split.keys), "shards": len(shards[split.name]),
                                    "keys": _digest(split.keys)} for split in splits}}

    # --- plan: process 0 starts the work folder, or keeps one of the same plan (a resumed preparation) ---------
    if process_index == 0:
        _start_work_dir(work, plan)
    barrier("jaxalign prepare-data: plan")

    # --- this process's shards (a marker means written by an earlier run) --------------------------------------
    started = time.perf_counter()
    todo, reused = [], 0
    for split in splits:
        for shard in shard_assignment(len(shards[split.name]), process_index, process_count):
            if (work / _marker_name(split.name, shard)).exists():
                reused += 1
            else:
                todo.append((split, shard))
    writer = _ShardWriter(builder, work, skip_errors, fail_fast, process_index)
    with tqdm.tqdm(total=sum(len(shards[split.name][shard]) for split, shard in todo), unit=" examples",
                   desc=f"preparing {plan['dataset']}", disable=None if progress else True) as bar:
        def write(task):
            split, shard = task
            writer.write(split, shard, len(shards[split.name]), shards[split.name][shard])
            bar.update(len(shards[split.name][shard]))

        if workers <= 1:
            for task in todo:
                write(task)
        else:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
            try:
                for future in concurrent.futures.as_completed([pool.submit(write, task) for task in todo]):
                    future.result()
            finally:  # after a failure, shards not yet started are left for the rerun
                pool.shutdown(wait=True, cancel_futures=True)
    log.info("process %d wrote %d shards of %s (%d were written before) in %.1f s", process_index, len(todo),
             plan["dataset"], reused, time.perf_counter() - started)
    barrier("jaxalign prepare-data: shards written")

    # --- process 0 writes tfds's metadata and the reports, then renames the folder: the data set exists --------
    if process_index == 0:
        _finish(builder, work, final, splits, shards, plan, finish, process_count)
    barrier("jaxalign prepare-data: finished")
    result = existing_result(final)
    result.prepared, result.shards_written, result.shards_reused = True, len(todo), reused
    _verify(builder, final, result.report_json)
    return result


class _ShardWriter:
    """Makes, serialises and writes the examples of one shard; thread-safe (no shared mutable state)."""

    def __init__(self, builder, work: Path, skip_errors, fail_fast: bool, process_index: int):
        self.features = builder.info.features
        self.serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())
        self.adapter = file_adapters.ADAPTER_FOR_FORMAT[builder.info.file_format]
        self.template = _template(builder, work)
        self.work, self.skip_errors, self.fail_fast = work, skip_errors, fail_fast
        self.process_index = process_index

    def write(self, split: SplitPlan, shard: int, num_shards: int, items: Sequence[int]) -> None:
        """Writes shard `shard` of `split` (`items` in record order), then its marker."""
        started = time.perf_counter()
        serialized, skipped = [], []
        for item in items:
            try:
                example = split.make_example(item)
            except self.skip_errors as error:
                if self.fail_fast:
                    raise
                skipped.append([item, error.reason, error.sample_id])
                continue
            serialized.append((split.keys[item], self.serializer.serialize_example(
                self.features.encode_example(example))))
        path = self.template.replace(split=split.name).sharded_filepath(shard_index=shard, num_shards=num_shards)
        temporary = path.parent / f"{path.name}.tmp-{os.getpid()}"
        self.adapter.write_examples(temporary, serialized)
        temporary.rename(path)
        _write_json(self.work / _marker_name(split.name, shard), {
            "split": split.name, "shard": shard, "items": len(items), "examples": len(serialized),
            "bytes": sum(len(data) for _, data in serialized), "skipped": skipped, "process": self.process_index,
            "seconds": round(time.perf_counter() - started, 3)})


def _template(builder, folder: Path) -> tfds.core.ShardedFileTemplate:
    """tfds's shard file names ('jaxalign_llava-train.array_record-00000-of-00004') inside `folder`."""
    return tfds.core.ShardedFileTemplate(data_dir=folder, dataset_name=builder.name,
                                         filetype_suffix=builder.info.file_format.file_suffix)


def _marker_name(split: str, shard: int) -> str:
    return f"shard-{split}-{shard:05d}.json"


def _digest(keys: Sequence[int | str]) -> str:
    digest = hashlib.sha256()
    for key in keys:
        digest.update(str(key).encode("utf-8") + b"\0")
    return digest.hexdigest()


def _write_json(path: Path, content: Any) -> None:
    """Writes JSON under a temporary name, then renames: a reader never sees half a file."""
    temporary = path.parent / f"{path.name}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(content, indent=1))
    temporary.rename(path)


def _start_work_dir(work: Path, plan: dict) -> None:
    plan_path = work / PLAN_FILE
    if plan_path.exists():
        try:
            same = json.loads(plan_path.read_text()) == json.loads(json.dumps(plan))
        except json.JSONDecodeError:
            same = False
        if same:
            log.info("resuming the preparation in %s", work)
            return
        log.warning("%s holds a preparation of other input (or other settings); starting over", work)
    if work.exists():
        work.rmtree()
    work.mkdir(parents=True)
    _write_json(plan_path, plan)


def _finish(builder, work: Path, final: Path, splits: Sequence[SplitPlan], shards: dict, plan: dict,
            finish: Callable | None, process_count: int) -> None:
    split_infos, reports, split_json, writers = [], {}, {}, {}
    for split in splits:
        markers = []
        for shard in range(len(shards[split.name])):
            marker = work / _marker_name(split.name, shard)
            if not marker.exists():
                raise RuntimeError(
                    f"{marker} is missing: shard {shard} of split {split.name!r} (process "
                    f"{shard % process_count}'s share) was not written. Every process must write to the same data "
                    "directory (a shared file system or gs://); rerun prepare-data to finish it")
            markers.append(json.loads(marker.read_text()))
        # Skipped items in source order, whichever shard (in tfds's order) they fell in.
        report = SkipReport(action="kept").merge(split.skipped_before or SkipReport())
        report.total += sum(content["items"] for content in markers)
        for _, reason, sample_id in sorted(item for content in markers for item in content["skipped"]):
            report.skipped[reason].append(sample_id)
        for content in markers:
            writers.setdefault(str(content["process"]), []).append(f"{split.name}/{content['shard']}")
        reports[split.name] = report
        lengths = [content["examples"] for content in markers]
        if not sum(lengths):
            raise ValueError(f"{plan['dataset']}: split {split.name!r} keeps no example of {report.total}:\n{report}")
        split_infos.append(tfds.core.SplitInfo(name=split.name, shard_lengths=lengths,
                                               num_bytes=sum(content["bytes"] for content in markers),
                                               filename_template=_template(builder, work).replace(split=split.name)))
        split_json[split.name] = {"examples": sum(lengths), "shards": len(lengths), **report.to_json()}
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.write_to_directory(work)
    merged = SkipReport(action="kept")
    for report in reports.values():
        merged = merged.merge(report)
    _write_json(work / PREPARE_REPORT_FILE, {
        "dataset": plan["dataset"], "version": plan["version"], "data_dir": os.fspath(final),
        "examples_per_shard": plan["examples_per_shard"], "fingerprint": plan["fingerprint"],
        "splits": split_json, "skipped": merged.to_json(), "shards_by_process": writers})
    if finish is not None:
        finish(work, reports)
    for path in work.iterdir():  # bookkeeping and the temporary files of interrupted writes
        if path.name == PLAN_FILE or path.name.startswith("shard-") or ".tmp-" in path.name:
            path.unlink()
    work.rename(final)


def existing_result(final: str | os.PathLike) -> PrepareResult:
    """The result of a finished data set, from its report (no reports for a data set tfds built itself)."""
    final = Path(final)
    path = final / PREPARE_REPORT_FILE
    if not path.exists():
        return PrepareResult(os.fspath(final), {}, prepared=False)
    content = json.loads(path.read_text())
    reports = {name: SkipReport.from_json(split) for name, split in content["splits"].items()}
    return PrepareResult(os.fspath(final), reports, prepared=False, report_json=content)


def _verify(builder, final: Path, report: dict) -> None:
    """Opens every split as training will and checks its length against the report."""
    name = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name
    for split, content in report.get("splits", {}).items():
        source = tfds.data_source(name, data_dir=os.fspath(Path(builder.data_dir_root)), split=split)
        if len(source) != content["examples"]:
            raise RuntimeError(f"{final}: split {split!r} reads {len(source)} examples but its report says "
                               f"{content['examples']}")
