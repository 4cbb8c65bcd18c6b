"""Input pipelines: a tfds data source of LLaVA-format records -> fixed-shape numpy batches for the jitted step.

A record (from `easy_vqa` or `llava`) has `id`, `image` (encoded bytes, empty for text-only samples) and
`conversations` (LLaVA JSON text). grain reads and maps the records (`grain.MapDataset.source(...)
.map_with_index(...)`, zero worker processes: the target machines have 2 cores); the order, the host slice, the
replacement of bad samples and the resumable position are this module's, because a filtered grain stream cannot
be restarted at a step number.

The order of a training run, all of it a function of the arguments:
1. **Fraction.** `select_fraction(len(source), fraction, fraction_seed)` keeps the first `round(fraction * N)`
   indexes of a seeded permutation of all N. With the same seed a smaller fraction is a prefix of a larger one
   (the 40% subset lies inside the 80% subset), and every host computes the same subset.
2. **Host slice.** The selected indexes, sorted, are split into `process_count` contiguous, disjoint parts
   (`np.array_split`); host `process_index` reads only its part. Nothing is dropped to even them out.
3. **Epochs.** Epoch e visits the host's part in the order of a permutation seeded by (seed, e) (or in order
   with `shuffle=False`). Batches are cut from the concatenated stream of *valid* samples, so they are always
   full and may span an epoch boundary.
4. **Bad samples** (masking errors, over-long samples, missing or corrupt images) are replaced by the next valid
   ones; each is counted by reason with its id in the pass's `SkipReport`, which is printed at the end of every
   pass (epoch). `fail_fast=True` raises instead.

Multi-host: each host yields `batch_size` rows per step; the global batch is assembled with
`jax.make_array_from_process_local_data`. Hosts skip different numbers of bad samples, so with a finite
`num_epochs` they could run out at different steps: train with `num_epochs=None` and a step count.

Resume: `make_vqa_dataset(..., start_step=s)` yields exactly the batches an uninterrupted run yields from step s
on. It finds the position by replaying the selection of steps 0..s-1 (tokenising and decoding those samples
without building batches), which also rebuilds the current pass's report; `iterator.state` /
`start_state=` restore the position at no cost instead.

Less padding (`length_buckets`, `group_by_length`; see `length_buckets` for the why and the figures):
5. **Buckets.** With `length_buckets` each batch is padded to the smallest bucket (max_length is the last) that
   holds its longest sample's spliced length, instead of to max_length. With several hosts, every host pads a step
   to the largest bucket any host picked (`agree_length`, by default one all-gather of one integer per step).
6. **Grouping.** With `group_by_length` = W > 0 the stream of valid samples (3-4 above, unchanged) is cut into
   windows of W batches. A window is planned with a text-only pass (tokenising, no image decoding): its samples
   are sorted by spliced length, cut into W batches and visited in an order seeded by (seed, window number), the
   same on every host. Images are decoded when a batch is built; a sample whose image then fails to decode is
   counted in the report and its row becomes a padding row without labels (the loss is a token mean, so the row
   weighs nothing). The last window of a finite run keeps only full batches. `state` is then the position where
   the current window starts plus the step: restoring it re-plans that window and skips its batches already
   yielded; replaying steps (`start_step`) plans windows without decoding images, so images that would fail in
   replayed batches are missing from the rebuilt report. States of grouped and ungrouped iterators do not mix.
7. **Accounting.** `padding` (a `length_buckets.PaddingStats`) counts real spliced tokens against computed ones
   (rows x padded length) over every batch the iterator built or replayed (steps 0.. with `start_step`, from the
   restored step with `start_state`); the line printed at the end of each pass shows it so far. It is not split
   by pass because in grouped mode a window mixes the end of one pass with the start of the next. Replayed steps
   count with this host's own bucket (the hosts' agreement is not replayed).

Leave-one-out by group (`group_members`, TinyAlign's `leave_out='group'`): a callable from a batch's
`sample_index` [B] to [B, G] int32 bank ids (`jaxalign.align.memory_keys.GroupMembers`); training batches then
carry them as `group_member_ids`. Evaluation batches never do: a test sample excludes nothing.

Oracle values (`oracle_values`, TinyAlign's 'oracle' retrieval control): every batch, training, evaluation and
generation alike, carries `oracle_value_ids` [B, value_length], each sample's own value in the token form of the
bank's values (`OracleValues`). At test time the sample is not in the bank, so the batch is where it comes from.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from jaxalign.data.batching import Sample, SampleSpec, SkipReport, collate, process_record, spliced_length
from jaxalign.data.chat_templates import (
    IGNORE_LABEL, ChatTemplate, MaskingError, TokenizedExample, encode_conversation)
from jaxalign.data.image_ops import blank_image
from jaxalign.data.length_buckets import PaddingStats, bucket_for, check_buckets, group_window, max_over_processes
from jaxalign.data.tokenizer import Tokenizer


# ------------------------------------------------------------------------------------------- selection
def select_fraction(num_records: int, fraction: float, seed: int) -> np.ndarray:
    """The source indexes [round(fraction * num_records)] of a data fraction, in selection order.

    A seeded permutation of all indexes, cut after the fraction: for one seed, a smaller fraction's indexes are
    a prefix of a larger fraction's.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    permutation = np.random.default_rng([seed, 0xF4AC]).permutation(num_records)
    count = int(round(fraction * num_records))
    if count == 0:
        raise ValueError(f"fraction {fraction} of {num_records} records selects none; use a larger fraction")
    return permutation[:count]


def host_slice(indexes: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """The contiguous part of `indexes` read by host `process_index` of `process_count` (parts are disjoint and
    cover all indexes; their sizes differ by at most one)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return np.array_split(indexes, process_count)[process_index]


def _jax_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only needed for the defaults; keeps the data code importable without initialising jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _source_dataset(data_source: Any, spec: SampleSpec, for_generation: bool = False, decode_image: bool = True
                    ) -> grain.MapDataset:
    return grain.MapDataset.source(data_source).map_with_index(
        lambda index, record: process_record(spec, index, record, for_generation, decode_image))


class _SampleCache:
    """The processed result (a `Sample` or the error that makes the record unusable) of each source index, made
    once and kept for the iterator's life (or, given a shared `results` dict, for the process's): later epochs
    skip decoding, resizing and tokenising. Processing is a pure function of (index, record), so a cached epoch
    yields what a fresh one would; bad records are still counted in every pass's report, since the report counts
    at `_next_valid`, not here."""

    def __init__(self, dataset: Any, results: dict[int, Any] | None = None):
        self.dataset, self.results = dataset, {} if results is None else results

    def __getitem__(self, index: int):
        if index not in self.results:
            self.results[index] = self.dataset[index]
        return self.results[index]


# Processed training samples kept for the whole process, by (the caller's name for the records, spec fingerprint):
# the demo's 28 runs read 3 seeds' subsets of one easy-vqa split with one spec, so each sample is decoded once.
_SHARED_SAMPLES: dict[tuple[str, str], dict[int, Any]] = {}


def _spec_fingerprint(spec: SampleSpec) -> str:
    """Everything `process_record` reads besides the record: the tokenizer's vocabulary and special tokens and the
    spec's other fields (template, image size and normalisation, lengths, flags)."""
    tokenizer = spec.tokenizer
    digest = hashlib.sha256(tokenizer.backend.to_str().encode())
    digest.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                        dataclasses.replace(spec, tokenizer=None))).encode())
    return digest.hexdigest()


def shared_sample_count() -> int:
    """How many processed samples the process-wide cache (`make_vqa_dataset(share_cache_as=...)`) holds."""
    return sum(len(results) for results in _SHARED_SAMPLES.values())


def clear_shared_samples() -> None:
    """Empties the process-wide cache of processed training samples."""
    _SHARED_SAMPLES.clear()


def _padding_row(spec: SampleSpec) -> Sample:
    """A row that is no sample: one padding token, no label, blank pixels, sample_index -1."""
    example = TokenizedExample([spec.tokenizer.pad_id], [IGNORE_LABEL], -1, -1, -1, 0)
    return Sample(-1, None, example, blank_image(spec.image_size), "", "")


# ------------------------------------------------------------------------------------------- oracle values
ORACLE_FIELD = "oracle_value_ids"
ORACLE_SOURCES = ("answer", "caption")


@dataclasses.dataclass(frozen=True)
class OracleValues:
    """How batches get `oracle_value_ids` [B, value_length]: each sample's own value, made exactly as the bank's
    values are (the labelled tokens of a conversation, encoded with the batch's tokenizer and template, then
    `to_values`), so that the 'oracle' control differs from 'real' only in whose value it is.

    Attributes:
      to_values: labels [B, L] -> [B, value_length] int32, the function the bank's values are made with
        (`jaxalign.align.memory_keys.answer_token_values` at the run's value_length; build this with
        `memory_keys.oracle_values`).
      source: 'answer': the labelled tokens of the sample's own conversation (its answer; a caption record's
        caption), read from the batch's labels for training-style rows and from the re-encoded record for
        generation prompts. 'caption': of `caption_conversation(record['caption'])`, for a bank of captions next
        to question data (easy-vqa: `easy_vqa.caption_conversation`); a record without a caption gets an empty
        value (all padding).
      caption_conversation: source 'caption': caption text -> the conversation the bank's caption records have.
    """

    to_values: Callable[[np.ndarray], np.ndarray]
    source: str = "answer"
    caption_conversation: Callable[[str], list] | None = None

    def __post_init__(self):
        if self.source not in ORACLE_SOURCES:
            raise ValueError(f"OracleValues.source={self.source!r}; expected one of {ORACLE_SOURCES}")
        if self.source == "caption" and self.caption_conversation is None:
            raise ValueError("OracleValues(source='caption') needs caption_conversation (caption -> conversation)")


def _stack_labels(rows: Sequence[np.ndarray]) -> np.ndarray:
    width = max([len(row) for row in rows] + [1])
    labels = np.full((len(rows), width), IGNORE_LABEL, np.int32)
    for position, row in enumerate(rows):
        labels[position, :len(row)] = row
    return labels


def _record_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _oracle_value_ids(oracle: OracleValues, spec: SampleSpec, data_source: Any, samples: Sequence[Sample],
                      labels: np.ndarray | None, cache: dict | None = None) -> np.ndarray:
    """[B, value_length] own values of `samples` (padding rows, index -1, get an empty value). `labels`: the
    batch's labels when its rows are training-style (whole conversations), else None (generation prompts).
    `cache`: {(index, sample_id): encoded label row} kept by the caller across batches, so that a training run's
    later epochs neither re-read the records nor re-encode them (the row is a function of the record and the
    spec alone; reading and encoding were half the host time of an 'oracle' training step on 2 cores)."""
    if oracle.source == "answer" and labels is not None:
        return np.asarray(oracle.to_values(labels), np.int32)
    rows = []
    for sample in samples:
        key = (sample.index, sample.sample_id)
        if cache is not None and key in cache:
            rows.append(cache[key])
            continue
        rows.append(_oracle_label_row(oracle, spec, data_source, sample))
        if cache is not None:
            cache[key] = rows[-1]
    return np.asarray(oracle.to_values(_stack_labels(rows)), np.int32)


def _oracle_label_row(oracle: OracleValues, spec: SampleSpec, data_source: Any, sample: Sample) -> np.ndarray:
    """[labels] int32 of `sample`'s own value, encoded from its record (empty for a padding row or no value)."""
    conversation = None
    if sample.index >= 0:
        record = data_source[sample.index]
        if oracle.source == "caption":
            caption = _record_text(record.get("caption", ""))
            conversation = oracle.caption_conversation(caption) if caption.strip() else None
        else:
            conversation = json.loads(_record_text(record["conversations"]))
    try:   # as `batching.process_record` encodes a training-style row (its labels do not depend on length)
        example = None if conversation is None else encode_conversation(
            spec.tokenizer, spec.template, conversation, insert_retrieval=spec.insert_retrieval,
            sample_id=sample.sample_id, image_length=spec.image_length, retrieval_length=spec.retrieval_length)
    except MaskingError:
        example = None
    return np.zeros(0, np.int32) if example is None else np.asarray(example.labels, np.int32)


# ------------------------------------------------------------------------------------------- training
class TrainBatches(Iterator[dict[str, np.ndarray]]):
    """Endless (or `num_epochs`) full training batches of one host; see the module docstring for the order.

    Attributes:
        state: {'epoch', 'position', 'step'}: where the next batch starts (pass it as `start_state`); with
            grouping, where the current window starts (see the module docstring).
        report: the `SkipReport` of the current pass so far; `reports`: those of the finished passes.
        padding: the `PaddingStats` of the batches built or replayed so far (module docstring, 7).
        host_indexes: the source indexes this host reads.
        length_buckets: the checked buckets (() when off); group_by_length: batches per sorted window (0: off).
        group_members: sample_index [B] -> group_member_ids [B, G], added to every batch (None: not added).
        oracle_values: adds `oracle_value_ids` [B, value_length] to every batch (None: not added).
        cache_samples: keep every processed sample in memory after its first epoch (`_SampleCache`).
        share_cache_as: a name for `data_source`'s records: processed samples are then kept for the process and
            shared with every iterator of that name and an equal spec (`make_vqa_dataset`); implies caching.
    """

    def __init__(self, data_source: Any, spec: SampleSpec, batch_size: int, seed: int, host_indexes: np.ndarray,
                 shuffle: bool, num_epochs: int | None, fail_fast: bool, verbose: bool,
                 length_buckets: Sequence[int] = (), group_by_length: int = 0,
                 agree_length: Callable[[int], int] | None = None,
                 group_members: Callable[[np.ndarray], np.ndarray] | None = None,
                 oracle_values: OracleValues | None = None, cache_samples: bool = False,
                 share_cache_as: str | None = None):
        if len(host_indexes) == 0:
            raise ValueError("this host's slice of the data is empty; use fewer processes or more data")
        if group_by_length < 0:
            raise ValueError(f"group_by_length={group_by_length}: batches per sorted window, 0 for no grouping")
        self.dataset = _source_dataset(data_source, spec)
        if share_cache_as is not None:
            key = (share_cache_as, _spec_fingerprint(spec))
            self.dataset = _SampleCache(self.dataset, _SHARED_SAMPLES.setdefault(key, {}))
        elif cache_samples:
            self.dataset = _SampleCache(self.dataset)
        self.spec, self.batch_size, self.seed = spec, batch_size, seed
        self.host_indexes, self.shuffle, self.num_epochs = host_indexes, shuffle, num_epochs
        self.fail_fast, self.verbose = fail_fast, verbose
        self.length_buckets = check_buckets(length_buckets, spec.max_length)
        self.group_by_length = int(group_by_length)
        self.agree_length = agree_length
        self.group_members = group_members
        self.data_source, self.oracle_values = data_source, oracle_values
        self._oracle_rows: dict = {}   # the oracle's label rows, read and encoded once per sample
        self.epoch, self.position, self.step = 0, 0, 0
        self._report_covers_pass = True  # False while the report lacks the start of the pass (after `restore`)
        self.report = SkipReport()
        self.reports: list[SkipReport] = []
        self.padding = PaddingStats()
        self._order = self._epoch_order(0)
        # Grouping: the text-only dataset that plans windows, and the current window's plan.
        self._planning = _source_dataset(data_source, spec, decode_image=False) if self.group_by_length else None
        self._plan: np.ndarray | None = None            # [batches, batch_size] source indexes, in visiting order
        self._plan_lengths: np.ndarray | None = None    # their spliced lengths
        self._cursor = 0                                 # batches of the plan already taken
        self._window_start = (0, 0)                      # (epoch, position) where the plan's window starts

    @property
    def state(self) -> dict[str, int]:
        if self._plan is not None and self._cursor < len(self._plan):
            epoch, position = self._window_start
        else:
            epoch, position = self.epoch, self.position
        return {"epoch": epoch, "position": position, "step": self.step}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from `state` (from `.state`); the current pass's report and the padding stats restart empty."""
        self.epoch, self.position, self.step = int(state["epoch"]), int(state["position"]), int(state["step"])
        self._order = self._epoch_order(self.epoch)
        self.report, self.padding = SkipReport(), PaddingStats()
        self._report_covers_pass = self.position == 0
        self._plan = None
        if self.group_by_length and self.step % self.group_by_length:
            self._plan_window()  # the window in progress, whose first step % W batches were yielded already
            self._cursor = self.step % self.group_by_length

    def skip_steps(self, steps: int) -> None:
        """Moves past `steps` batches exactly as `next` would, without building them."""
        for _ in range(steps):
            try:
                if self.group_by_length:
                    _, lengths = self._take_planned()
                else:
                    lengths = [spliced_length(self.spec, sample.example) for sample in self._take_samples()]
            except StopIteration:
                raise ValueError(f"cannot start at step {self.step + steps}: the {self.num_epochs} epoch(s) end "
                                 f"after step {self.step}") from None
            self.padding.add(lengths, self._local_length(lengths))
            self.step += 1

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.host_indexes
        return np.random.default_rng([self.seed, epoch]).permutation(self.host_indexes)

    def _end_pass(self) -> None:
        if self.verbose:
            padding = f"\n  padding so far: {self.padding}" if self.padding.batches else ""
            print(f"data pass {self.epoch}: {self.report}{padding}", file=sys.stderr, flush=True)
        # After a restore mid-pass the samples kept before it are not in the report: no verdict on that pass.
        if self.report.total and self.report.kept == 0 and self._report_covers_pass:
            raise ValueError(f"no usable sample in a whole pass over this host's data:\n{self.report}")
        self.reports.append(self.report)
        self.report = SkipReport()
        self._report_covers_pass = True
        self.epoch += 1
        self.position = 0
        self._order = self._epoch_order(self.epoch)

    def _next_valid(self, dataset: Any) -> tuple[int, Sample] | None:
        """(source index, sample) of the next valid record in pass order, read through `dataset`; bad records on
        the way are counted in the pass's report (or raised with fail_fast). None when the epochs are done."""
        while self.num_epochs is None or self.epoch < self.num_epochs:
            index = int(self._order[self.position])
            result = dataset[index]
            self.position += 1
            self.report.total += 1
            if not isinstance(result, Sample):
                if self.fail_fast:
                    raise result
                self.report.add(result)
            if self.position == len(self._order):
                self._end_pass()
            if isinstance(result, Sample):
                return index, result
        return None

    def _take_samples(self) -> list[Sample]:
        samples: list[Sample] = []
        while len(samples) < self.batch_size:
            found = self._next_valid(self.dataset)
            if found is None:
                raise StopIteration
            samples.append(found[1])
        return samples

    def _plan_window(self) -> None:
        """Plans the next window: up to W x batch_size valid samples (text only), grouped by `group_window`."""
        self._window_start = (self.epoch, self.position)
        indexes: list[int] = []
        lengths: list[int] = []
        while len(indexes) < self.group_by_length * self.batch_size:
            found = self._next_valid(self._planning)
            if found is None:
                break
            indexes.append(found[0])
            lengths.append(spliced_length(self.spec, found[1].example))
        usable = len(indexes) // self.batch_size * self.batch_size  # a finite run's last window: full batches only
        if usable == 0:
            raise StopIteration
        rows = group_window(lengths[:usable], self.batch_size, self.seed, self.step // self.group_by_length)
        self._plan = np.asarray(indexes[:usable])[rows]
        self._plan_lengths = np.asarray(lengths[:usable])[rows]
        self._cursor = 0

    def _take_planned(self) -> tuple[np.ndarray, np.ndarray]:
        """The source indexes [batch_size] and spliced lengths of the next planned batch."""
        if self._plan is None or self._cursor == len(self._plan):
            self._plan_window()
        indexes, lengths = self._plan[self._cursor], self._plan_lengths[self._cursor]
        self._cursor += 1
        return indexes, lengths

    def _load(self, index: int) -> Sample:
        """A planned sample with its image; a padding row (counted in the report) when the image fails."""
        result = self.dataset[index]
        if isinstance(result, Sample):
            return result
        if self.fail_fast:
            raise result
        self.report.add(result)
        return _padding_row(self.spec)

    def _local_length(self, lengths: Sequence[int]) -> int:
        """This host's padded length for a batch of these spliced lengths."""
        return bucket_for(max(lengths), self.length_buckets) if self.length_buckets else self.spec.max_length

    def __next__(self) -> dict[str, np.ndarray]:
        if self.group_by_length:
            samples = [self._load(int(index)) for index in self._take_planned()[0]]
        else:
            samples = self._take_samples()
        self.step += 1
        lengths = [spliced_length(self.spec, sample.example) for sample in samples]
        length = self._local_length(lengths)
        if self.length_buckets and self.agree_length is not None:
            agreed = int(self.agree_length(length))
            if agreed not in self.length_buckets or agreed < length:
                raise ValueError(f"the hosts agreed on length {agreed} for step {self.step - 1}, which is not a "
                                 f"bucket >= this host's {length} (buckets {self.length_buckets})")
            length = agreed
        self.padding.add(lengths, length)
        batch = collate(samples, self.spec, length=length)
        if self.group_members is not None:
            batch["group_member_ids"] = np.asarray(self.group_members(batch["sample_index"]), np.int32)
        if self.oracle_values is not None:
            batch[ORACLE_FIELD] = _oracle_value_ids(self.oracle_values, self.spec, self.data_source, samples,
                                                    batch["labels"], cache=self._oracle_rows)
        return batch


def make_vqa_dataset(
    data_source: Any,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_length: int,
    batch_size: int,
    seed: int,
    *,
    fraction: float = 1.0,
    fraction_seed: int | None = None,
    insert_retrieval: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    start_state: Mapping[str, int] | None = None,
    fail_fast: bool = False,
    truncate: bool = False,
    image_length: int = 1,
    retrieval_length: int = 1,
    pad_to_square: bool = False,
    verbose: bool = True,
    length_buckets: Sequence[int] = (),
    group_by_length: int = 0,
    agree_length: Callable[[int], int] | None = None,
    group_members: Callable[[np.ndarray], np.ndarray] | None = None,
    oracle_values: OracleValues | None = None,
    cache_samples: bool = False,
    share_cache_as: str | None = None,
) -> TrainBatches:
    """Training batches of this host: an iterator of dicts of numpy arrays, each with `batch_size` rows.

    Batch: pixels [B, H, W, 3] float32 (zeros for text-only samples); input_ids, labels, attention_mask [B, L]
    int32 (right padded to `max_length`, or to the batch's length bucket); image_index, retrieval_index,
    text_start [B] int32 (-1: none);
    sample_index [B] int32, the record's row in `data_source` (the memory-bank id for leave-one-out);
    with `group_members`, group_member_ids [B, G] int32 (the bank ids of each sample's group, -1 padded);
    with `oracle_values`, oracle_value_ids [B, value_length] int32 (each sample's own value, `OracleValues`).

    Args:
        data_source: random access records (`tfds.data_source(...)`, or any sequence of dicts).
        image_size, mean, std: the vision tower's input (see `image_ops`).
        max_length: L, counting `image_length` / `retrieval_length` positions per sentinel.
        batch_size: rows per batch on this host.
        seed: shuffling seed (epoch e uses (seed, e)); also the fraction seed unless `fraction_seed` is given.
        fraction: share of the source to train on, chosen by `select_fraction`.
        num_epochs: stop after this many passes (the last partial batch is not yielded); None runs forever.
        process_index, process_count: this host and the number of hosts; default `jax.process_index()` /
            `jax.process_count()`.
        start_step: resume so that the first batch is the one an uninterrupted run yields at this step.
        start_state: an iterator's `.state`, restored directly (no replay); overrides `start_step`.
        fail_fast: raise the first bad sample's error instead of skipping and counting it.
        truncate: cut over-long samples instead of skipping them (reason `too_long`).
        pad_to_square: LLaVA's 'pad' aspect mode.
        verbose: print each pass's `SkipReport` and `PaddingStats` to stderr when the pass ends.
        length_buckets: pad each batch to the smallest of these lengths that holds its longest sample (max_length
            is always the last); empty: every batch has max_length.
        group_by_length: batches per length-sorted window (module docstring, 6); 0: no grouping.
        agree_length: `(this host's padded length) -> the step's padded length`, called once per built batch
            when bucketing; every host must get the same answer. Default: the largest over the JAX processes
            (`length_buckets.max_over_processes`) when `process_count` > 1, else this host's own.
        group_members: `sample_index [B] -> [B, G]` bank ids of each sample's group (module docstring); the
            batches then carry `group_member_ids`. None: no such field.
        oracle_values: the 'oracle' control's own values (`OracleValues`); the batches then carry
            `oracle_value_ids`. None: no such field. A value read from its record (source 'caption') is read and
            encoded once per iterator and kept for later epochs.
        cache_samples: keep each processed sample (pixels, token ids) in memory once made, so that epochs after
            the first cost no decoding or tokenising: for small data trained over many epochs (the demo's 3,000
            easy-vqa questions at 32 px: about 40 MB). It holds this host's whole slice, image_size^2 x 12 bytes
            per sample at most: not for LLaVA-size data. Batches are identical with or without it.
        share_cache_as: keep the processed samples for the whole process instead, shared by every iterator made
            with this name and an equal spec (tokenizer, template, image size and normalisation, lengths): the
            caller names the records (e.g. 'easy_vqa/questions/train in <data_dir>') and vouches that one name
            means one set of records. For many short runs over one small data set in one process (the demo's 28
            runs decode each sample once instead of once per run); it grows with the distinct samples read
            (`shared_sample_count`, `clear_shared_samples`). Batches are identical with or without it.
    """
    process_index, process_count = _jax_process(process_index, process_count)
    if agree_length is None and process_count > 1:
        agree_length = max_over_processes
    spec = SampleSpec(tokenizer, template, image_size, tuple(mean), tuple(std), max_length, insert_retrieval,
                      image_length, retrieval_length, pad_to_square, truncate)
    selected = np.sort(select_fraction(len(data_source), fraction, seed if fraction_seed is None else fraction_seed))
    iterator = TrainBatches(data_source, spec, batch_size, seed, host_slice(selected, process_index, process_count),
                            shuffle, num_epochs, fail_fast, verbose, length_buckets, group_by_length, agree_length,
                            group_members, oracle_values, cache_samples, share_cache_as)
    if start_state is not None:
        iterator.restore(start_state)
    else:
        iterator.skip_steps(start_step)
    return iterator


# ----------------------------------------------------------------------------------------- evaluation
class EvalBatches:
    """Every usable sample of this host's slice exactly once, in source order, per iteration (a pass).

    Each batch has the training keys plus `valid` [B] bool (False on the rows that pad the last batches),
    `answer` and `question_type` [B] (str objects: remove them before sending the batch to devices). Every host
    yields the same number of batches, ceil(largest host slice / batch_size), so that multi-host evaluation
    steps stay in lockstep. Bad samples are counted in `report` (printed at the end of the pass), not yielded.

    Padding rows repeat padding ids with attention on a single position (the first, or the last with left
    padding), so the model computes finite values there; mask them with `valid`. With `oracle_values` each batch
    also has `oracle_value_ids` [B, value_length] (generation prompts too: re-encoded from the record).
    """

    def __init__(self, data_source: Any, spec: SampleSpec, batch_size: int, host_indexes: np.ndarray,
                 num_batches: int, for_generation: bool, fail_fast: bool, verbose: bool,
                 oracle_values: OracleValues | None = None):
        self.dataset = _source_dataset(data_source, spec, for_generation)
        self.data_source, self.oracle_values = data_source, oracle_values
        self.spec, self.batch_size, self.host_indexes = spec, batch_size, host_indexes
        self.num_batches, self.for_generation = num_batches, for_generation
        self.fail_fast, self.verbose = fail_fast, verbose
        self.report = SkipReport()

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.report = SkipReport()
        samples: list[Sample] = []
        yielded = 0
        for index in self.host_indexes:
            result = self.dataset[int(index)]
            self.report.total += 1
            if isinstance(result, Sample):
                samples.append(result)
            elif self.fail_fast:
                raise result
            else:
                self.report.add(result)
            if len(samples) == self.batch_size:
                yield self._batch(samples)
                yielded, samples = yielded + 1, []
        while yielded < self.num_batches:
            yield self._batch(samples)
            yielded, samples = yielded + 1, []
        if self.verbose:
            print(f"evaluation pass: {self.report}", file=sys.stderr, flush=True)

    def _batch(self, samples: list[Sample]) -> dict[str, np.ndarray]:
        side = "left" if self.for_generation else "right"
        rows = samples + [_padding_row(self.spec)] * (self.batch_size - len(samples))
        batch = collate(rows, self.spec, side=side)
        batch["valid"] = np.arange(self.batch_size) < len(samples)
        batch["answer"] = np.asarray([row.answer for row in rows], dtype=object)
        batch["question_type"] = np.asarray([row.question_type for row in rows], dtype=object)
        if self.oracle_values is not None:
            batch[ORACLE_FIELD] = _oracle_value_ids(self.oracle_values, self.spec, self.data_source, rows,
                                                    None if self.for_generation else batch["labels"])
        return batch


def make_eval_dataset(
    data_source: Any,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_length: int,
    batch_size: int,
    *,
    for_generation: bool = False,
    fraction: float = 1.0,
    fraction_seed: int = 0,
    insert_retrieval: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    fail_fast: bool = False,
    truncate: bool = False,
    image_length: int = 1,
    retrieval_length: int = 1,
    pad_to_square: bool = False,
    verbose: bool = True,
    length_buckets: Sequence[int] = (),
    group_by_length: int = 0,
    group_members: Callable[[np.ndarray], np.ndarray] | None = None,
    oracle_values: OracleValues | None = None,
) -> EvalBatches:
    """Evaluation batches of this host (see `EvalBatches`); iterate it once per evaluation.

    With `for_generation` the rows are prompts (the conversation up to its last answer, left padded, labels all
    ignored) and `answer` holds the reference answer; otherwise rows are training-style (loss, perplexity).
    Other arguments as in `make_vqa_dataset`; `length_buckets`, `group_by_length` and `group_members` are
    accepted so that one options dict serves training and evaluation, and ignored: evaluation batches always
    have max_length, and a test sample leaves nothing out of the bank. `oracle_values` adds `oracle_value_ids`
    to every batch, prompts included (as in `make_vqa_dataset`).
    """
    del length_buckets, group_by_length, group_members
    process_index, process_count = _jax_process(process_index, process_count)
    spec = SampleSpec(tokenizer, template, image_size, tuple(mean), tuple(std), max_length, insert_retrieval,
                      image_length, retrieval_length, pad_to_square, truncate)
    selected = np.sort(select_fraction(len(data_source), fraction, fraction_seed))
    largest = len(np.array_split(selected, process_count)[0])
    return EvalBatches(data_source, spec, batch_size, host_slice(selected, process_index, process_count),
                       -(-largest // batch_size), for_generation, fail_fast, verbose, oracle_values)
