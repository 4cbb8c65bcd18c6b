"""A tfds builder for LLaVA-format data: a JSON list of samples plus an image folder, given as the manual directory.

A sample is `{"id": ..., "image": "relative/path.jpg", "conversations": [{"from": "human" | "gpt", "value":
...}]}`; samples without an `image` key are text-only and are kept with empty image bytes. Layouts of the two
public sets (put them, unchanged, in the manual directory):
- LLaVA-Pretrain: `blip_laion_cc_sbu_558k.json` and `images/00000/000000000.jpg`, ... (config `pretrain`, image
  paths relative to `images/`);
- LLaVA-v1.5 mix: `llava_v1_5_mix665k.json` and `coco/train2017/...`, `gqa/images/...`, `ocr_vqa/images/...`,
  `textvqa/train_images/...`, `vg/VG_100K/...` (config `mix665k`, paths relative to the manual directory).
Any other JSON file: `LlavaConfig(name="mine", json_file="mine.json", image_root="")`.

Samples whose image is missing or cannot be decoded, and samples with an empty conversation, are left out and
counted by reason with their ids in a `SkipReport` that is printed at the end of the build and saved next to the
data as `build_report.json` (`read_build_report`); with `fail_fast=True` the first one raises instead. Checking
that every image decodes costs one full decode per image (minutes for 558K images on a few cores); it catches
truncated JPEGs, which a header check does not.

`prepare_llava_shards` writes the same data set (same records, same order) shard by shard, split over processes
and threads and resumable after an interruption (`jaxalign prepare-data llava`, `jaxalign.data.sharded_prepare`).

Records keep the raw image file bytes (JPEG stays JPEG); `conversations` is the sample's JSON text and
`json_index` its position in the JSON list (tfds returns records in its own order).

Example::

    builder, report = prepare_llava("pretrain", manual_dir="/data/LLaVA-Pretrain", data_dir="/data/tfds")
    source = tfds.data_source("jaxalign_llava/pretrain", data_dir="/data/tfds", split="train")
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils.epath import Path  # tfds depends on etils; epath handles local and gs:// paths alike

from jaxalign.data.batching import SkipReport
from jaxalign.data.image_ops import ImageError, decode_image

BUILD_REPORT_FILE = "build_report.json"


@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    """Which JSON file of the manual directory to read, and where its image paths start.

    Attributes:
        json_file: file name of the JSON list inside the manual directory.
        image_root: folder (relative to the manual directory) that the samples' `image` paths are relative to.
    """

    json_file: str = ""
    image_root: str = ""


class LlavaDataset(tfds.core.GeneratorBasedBuilder):
    """LLaVA-format conversations with their image bytes; one split, `train`."""

    name = "jaxalign_llava"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the LLaVA JSON file and its image folder in the manual directory, unchanged: for LLaVA-Pretrain "
        "blip_laion_cc_sbu_558k.json and images/; for the LLaVA-v1.5 mix llava_v1_5_mix665k.json and coco/, gqa/, "
        "ocr_vqa/, textvqa/, vg/. Pass download_config=tfds.download.DownloadConfig(manual_dir=...).")
    BUILDER_CONFIGS = [
        LlavaConfig(name="pretrain", description="LLaVA-Pretrain (558K image-caption pairs).",
                    json_file="blip_laion_cc_sbu_558k.json", image_root="images"),
        LlavaConfig(name="mix665k", description="LLaVA-v1.5 instruction mix (665K).",
                    json_file="llava_v1_5_mix665k.json", image_root=""),
    ]

    def __init__(self, *, fail_fast: bool = False, check_images: bool = True, **kwargs: Any):
        """Args: fail_fast: raise at the first bad sample instead of reporting it; check_images: decode every
        image once during the build (off: only check that the file exists). Others go to tfds."""
        self.fail_fast = fail_fast
        self.check_images = check_images
        self.build_report: SkipReport | None = None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA-format samples: `image` holds the raw image file bytes (empty for text-only "
                        "samples), `conversations` the sample's conversation as JSON text.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "json_index": np.int64,
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "image_path": tfds.features.Text(),
                "has_image": np.bool_,
                "conversations": tfds.features.Text(),
            }),
            homepage="https://llava-vl.github.io/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config: LlavaConfig = self.builder_config
        if not config.json_file:
            raise ValueError(f"LLaVA config {config.name!r} names no json_file")
        manual_dir = Path(dl_manager.manual_dir)
        json_path = manual_dir / config.json_file
        samples = read_samples(json_path)
        return {"train": self._generate_examples(samples, manual_dir / config.image_root, str(json_path))}

    def _generate_examples(self, samples: list, image_root: Path, source: str):
        report = SkipReport(action="kept")
        for position, sample in enumerate(samples):
            report.total += 1
            try:
                record = self._record(position, sample, image_root)
            except SampleError as error:
                if self.fail_fast:
                    raise ValueError(f"{source}: {error} (fail_fast is on; turn it off to skip and report such "
                                     "samples)") from error
                report.add(error)
                continue
            yield position, record
        self.build_report = report
        print(f"LLaVA build of {source}:\n{report}")

    def _record(self, position: int, sample: Any, image_root: Path) -> dict[str, Any]:
        return sample_record(position, sample, image_root, check_images=self.check_images)


def read_samples(json_path: str | Path) -> list:
    """The JSON list of samples of a LLaVA-format file (clear errors for a missing file, bad JSON, not a list)."""
    json_path = Path(json_path)
    if not json_path.exists():
        raise FileNotFoundError(f"{json_path}: the LLaVA JSON file is missing from the manual directory. "
                                + LlavaDataset.MANUAL_DOWNLOAD_INSTRUCTIONS)
    try:
        samples = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path}: not valid JSON ({error})") from error
    if not isinstance(samples, list):
        raise ValueError(f"{json_path}: expected a JSON list of samples, found {type(samples).__name__}")
    return samples


def sample_record(position: int, sample: Any, image_root: Path, *, check_images: bool = True) -> dict[str, Any]:
    """The record of the JSON list's entry `position` (image bytes read from `image_root`).

    Raises:
        SampleError: the sample is left out (malformed, empty conversation, missing or undecodable image).
    """
    if not isinstance(sample, dict):
        raise SampleError(f"#{position}", "malformed_sample", f"entry {position} is not a JSON object")
    sample_id = str(sample.get("id", f"#{position}"))
    conversation = sample.get("conversations")
    if (not isinstance(conversation, list) or not conversation
            or not any(isinstance(turn, dict) and str(turn.get("value", "")).strip() for turn in conversation)):
        raise SampleError(sample_id, "empty_conversation", "no turn with text")
    image_bytes, image_path = b"", ""
    if sample.get("image"):
        image_path = str(sample["image"])
        path = Path(image_root) / image_path
        if not path.exists():
            raise SampleError(sample_id, "missing_image", f"{path} does not exist")
        image_bytes = path.read_bytes()
        if check_images:
            try:
                decode_image(image_bytes, sample_id)
            except ImageError as error:
                raise SampleError(sample_id, "corrupt_image", f"{path}: {error.detail}") from error
    return {"id": sample_id, "json_index": position, "image": image_bytes, "image_path": image_path,
            "has_image": bool(image_path), "conversations": json.dumps(conversation)}


class SampleError(ValueError):
    """A sample the builder leaves out. Attributes: sample_id, reason (counted by `SkipReport`), detail."""

    def __init__(self, sample_id: Any, reason: str, detail: str):
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail
        super().__init__(f"sample {sample_id!r}: {reason}: {detail}")


def prepare_llava(
    config: str | LlavaConfig,
    manual_dir: str,
    data_dir: str,
    *,
    fail_fast: bool = False,
    check_images: bool = True,
) -> tuple[LlavaDataset, SkipReport]:
    """Builds (once) a LLaVA data set and returns the builder and the report of the samples left out.

    Args:
        config: 'pretrain', 'mix665k', or a `LlavaConfig` naming another JSON file.
        manual_dir: the folder holding the JSON file and the images.
        data_dir: the tfds data directory to write to (read from, when already built).
        fail_fast, check_images: see `LlavaDataset.__init__`.

    The report is saved as `build_report.json` in the builder's data directory, so a later call on the built data
    returns the same report.
    """
    builder = LlavaDataset(config=config, data_dir=data_dir, file_format="array_record", fail_fast=fail_fast,
                           check_images=check_images)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    report_path = Path(builder.data_dir) / BUILD_REPORT_FILE
    if builder.build_report is not None:
        report_path.write_text(json.dumps(builder.build_report.to_json(), indent=1))
        return builder, builder.build_report
    return builder, read_build_report(builder.data_dir)


def read_build_report(dataset_dir: str) -> SkipReport:
    """The report saved by `prepare_llava` in a built data set's directory."""
    path = Path(dataset_dir) / BUILD_REPORT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no build report; the data set was not built with prepare_llava")
    return SkipReport.from_json(json.loads(path.read_text()))


def llava_config(name: str, json_file: str, image_root: str = "") -> str | LlavaConfig:
    """The builder config of a JSON file and its image folder under the tfds config name `name`.

    tfds refuses a new config under a registered name ('pretrain', 'mix665k'): those names give the registered
    config, which must then describe the same JSON file and image folder (ValueError otherwise).
    """
    registered = {known.name: known for known in LlavaDataset.BUILDER_CONFIGS}
    if name not in registered:
        return LlavaConfig(name=name, json_file=json_file, image_root=image_root)
    known = registered[name]
    if (known.json_file, known.image_root) != (json_file, image_root):
        raise ValueError(f"the data set name {name!r} is the registered LLaVA config for {known.json_file} with "
                         f"images under {known.image_root!r}/, but {json_file} with images under {image_root!r}/ "
                         "was given; give it another name")
    return name


def prepare_llava_shards(
    config: str | LlavaConfig,
    manual_dir: str,
    data_dir: str,
    *,
    fail_fast: bool = False,
    check_images: bool = True,
    **shard_options: Any,
):
    """Writes the data set `prepare_llava` builds (same records, same order) shard by shard: split over processes
    and threads, resumable (`jaxalign.data.sharded_prepare.prepare_shards`, whose options `shard_options` are).

    Returns the `PrepareResult`; the data set's folder also gets `build_report.json`, so `prepare_llava` and
    training read the same report afterwards. The JSON file's SHA-256 is part of the plan: a rerun after the file
    changed starts over (changed image files are not noticed).
    """
    import hashlib

    from jaxalign.data import sharded_prepare

    builder = LlavaDataset(config=config, data_dir=data_dir, file_format="array_record", fail_fast=fail_fast,
                           check_images=check_images)
    chosen: LlavaConfig = builder.builder_config
    json_path = Path(manual_dir) / chosen.json_file
    result = sharded_prepare.finished(builder, shard_options.get("process_index", 0))
    if result is not None:  # prepared, or built by tfds (whose report is build_report.json)
        if not result.reports and (Path(builder.data_dir) / BUILD_REPORT_FILE).exists():
            result.reports = {"train": read_build_report(builder.data_dir)}
        return result
    samples = read_samples(json_path)
    image_root = Path(manual_dir) / chosen.image_root

    def make_example(position: int) -> dict[str, Any]:
        return sample_record(position, samples[position], image_root, check_images=check_images)

    def finish(folder: Path, reports: dict) -> None:
        (folder / BUILD_REPORT_FILE).write_text(json.dumps(reports["train"].to_json(), indent=1))

    fingerprint = {"json_file": chosen.json_file, "json_sha256": hashlib.sha256(json_path.read_bytes()).hexdigest(),
                   "image_root": chosen.image_root, "check_images": check_images}
    try:
        return sharded_prepare.prepare_shards(
            builder, [sharded_prepare.SplitPlan("train", list(range(len(samples))), make_example)],
            fingerprint=fingerprint, skip_errors=(SampleError,), fail_fast=fail_fast, finish=finish,
            **shard_options)
    except SampleError as error:  # only with fail_fast
        raise ValueError(f"{json_path}: {error} (fail_fast is on; turn it off to skip and report such "
                         "samples)") from error
