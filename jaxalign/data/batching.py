"""Many samples at once: records -> encoded samples (or the reason they are unusable) -> fixed-shape batches.

`chat_templates` turns one conversation into ids and labels; this module is the batch-level half used by the data
pipeline: `SkipReport` (samples that could not be used, by reason, with their ids: never dropped silently),
`encode_many` and `pad_batch` (fixed shapes, right padding for training, left padding for generation), and for
image-text records `process_record` (ids, labels and pixels of one record, or its error) and `collate`.
The order in which records are read is `pipeline`'s job.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from jaxalign.data.chat_templates import (
    ASSISTANT, IGNORE_LABEL, IMAGE_PLACEHOLDER, ChatTemplate, MaskingError, TokenizedExample, encode_conversation,
    encode_prompt)
from jaxalign.data.image_ops import ImageError, blank_image, preprocess_image
from jaxalign.data.tokenizer import Tokenizer


@dataclasses.dataclass
class SkipReport:
    """Samples that could not be encoded, by reason, with their ids; print it at the end of a pass.

    Attributes:
        total: samples seen.
        skipped: reason -> ids of the samples skipped for it.
        action: the verb of the summary line ("encoded 2 of 6 samples"; a data-set build says "kept").
    """

    total: int = 0
    skipped: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    action: str = "encoded"

    def add(self, error: MaskingError | ImageError) -> None:
        """Counts one skipped sample under the error's `reason`, with its `sample_id`."""
        self.skipped[error.reason].append(error.sample_id)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ids as written in the data); `from_json` reads it back."""
        return {"total": self.total, "action": self.action, "counts": self.counts,
                "skipped": {reason: list(ids) for reason, ids in sorted(self.skipped.items())}}

    @classmethod
    def from_json(cls, content: Mapping[str, Any]) -> "SkipReport":
        report = cls(total=int(content["total"]), action=content.get("action", "encoded"))
        for reason, ids in content.get("skipped", {}).items():
            report.skipped[reason].extend(ids)
        return report

    def merge(self, other: "SkipReport") -> "SkipReport":
        """A report covering both passes (for example the slices of several hosts)."""
        merged = SkipReport(total=self.total + other.total, action=self.action)
        for report in (self, other):
            for reason, ids in report.skipped.items():
                merged.skipped[reason].extend(ids)
        return merged

    @property
    def counts(self) -> dict[str, int]:
        return {reason: len(ids) for reason, ids in sorted(self.skipped.items())}

    @property
    def num_skipped(self) -> int:
        return sum(len(ids) for ids in self.skipped.values())

    @property
    def kept(self) -> int:
        return self.total - self.num_skipped

    def __str__(self, max_ids: int = 10) -> str:
        lines = [f"{self.action} {self.kept} of {self.total} samples; skipped {self.num_skipped}"]
        for reason, ids in sorted(self.skipped.items()):
            shown = ", ".join(repr(sample_id) for sample_id in ids[:max_ids])
            more = f" and {len(ids) - max_ids} more" if len(ids) > max_ids else ""
            lines.append(f"  {reason}: {len(ids)} (ids: {shown}{more})")
        return "\n".join(lines)


def encode_many(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    samples: Iterable[Mapping[str, Any]],
    *,
    max_length: int | None = None,
    insert_retrieval: bool = False,
    image_length: int = 1,
    retrieval_length: int = 1,
    fail_fast: bool = False,
    progress: bool | None = None,
) -> tuple[list[TokenizedExample], SkipReport]:
    """Encodes LLaVA-format samples `{'id': ..., 'conversations': [...]}`, collecting the ones that fail.

    Args:
        samples: the samples; a sample without an 'id' is named by its position.
        fail_fast: raise the first MaskingError instead of counting it.
        progress: show a progress bar; None shows one when stderr is a terminal.
        Others: as in `encode_conversation`.

    Returns:
        The encoded examples in input order and a `SkipReport` of the rest (never dropped silently).
    """
    report = SkipReport()
    examples = []
    show = sys.stderr.isatty() if progress is None else progress
    for position, sample in enumerate(tqdm(samples, desc="tokenising", unit="sample", disable=not show)):
        report.total += 1
        sample_id = sample.get("id", position) if isinstance(sample, Mapping) else position
        try:
            conversation = sample.get("conversations") if isinstance(sample, Mapping) else None
            if conversation is None:
                raise MaskingError(sample_id, "empty_conversation", "the sample has no 'conversations' field")
            examples.append(encode_conversation(
                tokenizer, template, conversation, max_length=max_length, insert_retrieval=insert_retrieval,
                sample_id=sample_id, image_length=image_length, retrieval_length=retrieval_length))
        except MaskingError as error:
            if fail_fast:
                raise
            report.add(error)
    return examples, report


def pad_batch(
    examples: Sequence[TokenizedExample],
    max_length: int | None,
    pad_id: int,
    side: str = "right",
) -> dict[str, np.ndarray]:
    """Stacks examples into fixed-shape int32 arrays (static shapes keep jit from recompiling).

    Args:
        examples: encoded examples, none longer than `max_length`.
        max_length: the padded length L; None uses the longest example.
        pad_id: id written at padding positions (they get label IGNORE_LABEL and attention 0).
        side: 'right' for training, 'left' for batched generation (every prompt ends at the last column); with
            'left' the indices below are shifted by each row's padding.

    Returns:
        input_ids [B, L], labels [B, L], attention_mask [B, L] (1 on real tokens), image_index [B],
        retrieval_index [B], text_start [B] (-1 stays -1).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    length = max(len(example) for example in examples) if max_length is None else max_length
    batch = len(examples)
    input_ids = np.full((batch, length), pad_id, dtype=np.int32)
    labels = np.full((batch, length), IGNORE_LABEL, dtype=np.int32)
    attention_mask = np.zeros((batch, length), dtype=np.int32)
    indices = {name: np.full((batch,), -1, dtype=np.int32) for name in ("image_index", "retrieval_index",
                                                                       "text_start")}
    for row, example in enumerate(examples):
        size = len(example)
        if size > length:
            raise ValueError(f"sample {example.sample_id!r} has {size} tokens, more than max_length {length}; "
                             "encode it with the same max_length")
        offset = length - size if side == "left" else 0
        input_ids[row, offset:offset + size] = example.input_ids
        labels[row, offset:offset + size] = example.labels
        attention_mask[row, offset:offset + size] = 1
        for name in indices:
            value = getattr(example, name)
            indices[name][row] = value + offset if value >= 0 else -1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **indices}


# ------------------------------------------------------------------------------------- records to batches
@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """How one record becomes model inputs (shared by training and evaluation).

    Attributes:
        tokenizer, template: see `chat_templates`.
        image_size, mean, std, pad_to_square: see `image_ops.preprocess_image`.
        max_length: padded sequence length L, counting `image_length` / `retrieval_length` positions for the
            sentinels (what the LM will see).
        insert_retrieval: put the retrieval sentinel after the image sentinel (TinyAlign).
        truncate: cut over-long samples (keeping the start) instead of skipping them as `too_long`.
    """

    tokenizer: Tokenizer
    template: ChatTemplate
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    max_length: int
    insert_retrieval: bool = False
    image_length: int = 1
    retrieval_length: int = 1
    pad_to_square: bool = False
    truncate: bool = False


@dataclasses.dataclass
class Sample:
    """A record turned into inputs: `example` (ids and labels), `pixels` [H, W, 3], its source row and texts."""

    index: int
    sample_id: Any
    example: TokenizedExample
    pixels: np.ndarray
    answer: str
    question_type: str


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def spliced_length(spec: SampleSpec, example: TokenizedExample) -> int:
    """Positions the example takes in the LM's spliced sequence: its text tokens, each sentinel counted as the
    `image_length` / `retrieval_length` positions it stands for (what must fit in max_length or a length bucket)."""
    return len(example) + (spec.image_length - 1) * (example.image_index >= 0) + (
        spec.retrieval_length - 1) * (example.retrieval_index >= 0)


def process_record(spec: SampleSpec, index: int, record: Mapping[str, Any], for_generation: bool = False,
                   decode_image: bool = True) -> Sample | MaskingError | ImageError:
    """The inputs of one record, or the error that makes it unusable (returned, so the caller counts it).

    Reasons besides those of `chat_templates.MaskingError`: `too_long` (longer than `max_length` and
    `truncate` is off), `missing_image` (an `<image>` marker but no image bytes), `image_without_marker` (image
    bytes the conversation never refers to) and `corrupt_image` (`image_ops.ImageError`).
    With `decode_image=False` the image is not decoded (`pixels` is None, `corrupt_image` cannot be found): the
    cheap text-only pass that length grouping plans its batches with.
    """
    sample_id = _text(record.get("id", index))
    try:
        conversation = json.loads(_text(record["conversations"]))
    except (KeyError, json.JSONDecodeError) as error:
        return MaskingError(sample_id, "malformed_turn", f"conversations is not LLaVA JSON ({error})")
    encode_options = dict(insert_retrieval=spec.insert_retrieval, sample_id=sample_id,
                          image_length=spec.image_length, retrieval_length=spec.retrieval_length)
    answer = ""
    try:
        if for_generation:
            last_answer = max((i for i, turn in enumerate(conversation) if isinstance(turn, Mapping)
                               and turn.get("from") == ASSISTANT), default=None)
            if last_answer is None:
                raise MaskingError(sample_id, "no_assistant_turn", "nothing to compare a generated answer with")
            answer = str(conversation[last_answer].get("value", ""))
            example = encode_prompt(spec.tokenizer, spec.template, conversation[:last_answer],
                                    max_length=spec.max_length, **encode_options)
        else:
            example = encode_conversation(spec.tokenizer, spec.template, conversation, **encode_options)
            length = spliced_length(spec, example)
            if length > spec.max_length:
                if not spec.truncate:
                    raise MaskingError(sample_id, "too_long", f"needs {length} positions, max_length is "
                                       f"{spec.max_length} (truncate=True cuts such samples instead)")
                example = encode_conversation(spec.tokenizer, spec.template, conversation,
                                              max_length=spec.max_length, **encode_options)
    except MaskingError as error:
        return error
    image_bytes = bytes(record.get("image", b"") or b"")
    has_marker = example.image_index >= 0
    if has_marker and not image_bytes:
        return MaskingError(sample_id, "missing_image", f"the conversation has {IMAGE_PLACEHOLDER} but the record "
                            "has no image")
    if image_bytes and not has_marker:
        return MaskingError(sample_id, "image_without_marker", f"the record has an image but no "
                            f"{IMAGE_PLACEHOLDER} in its conversation, so the model would never see it")
    try:
        pixels = None
        if decode_image:
            pixels = (preprocess_image(image_bytes, spec.image_size, spec.mean, spec.std, pad=spec.pad_to_square,
                                       sample_id=sample_id) if image_bytes else blank_image(spec.image_size))
    except ImageError as error:
        return error
    if not answer:
        answer = _text(record.get("answer", ""))
    return Sample(index=index, sample_id=sample_id, example=example, pixels=pixels, answer=answer,
                  question_type=_text(record.get("question_type", "")))


def collate(samples: Sequence[Sample], spec: SampleSpec, side: str = "right", length: int | None = None
            ) -> dict[str, np.ndarray]:
    """Stacks samples into a batch: pixels [B, H, W, 3] float32; input_ids, labels, attention_mask [B, L] int32;
    image_index, retrieval_index, text_start, sample_index [B] int32. L is `length` (a length bucket that holds
    every sample's `spliced_length`) or, by default, `spec.max_length`."""
    pad_id = spec.tokenizer.pad_id
    if pad_id is None:
        raise ValueError(f"the tokenizer from {spec.tokenizer.source} has neither a pad nor an EOS token to pad with")
    batch = pad_batch([sample.example for sample in samples], length or spec.max_length, pad_id, side=side)
    batch["pixels"] = np.stack([sample.pixels for sample in samples])
    batch["sample_index"] = np.asarray([sample.index for sample in samples], np.int32)
    return batch
