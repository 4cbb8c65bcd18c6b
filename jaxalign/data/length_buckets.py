"""Length bucketing and length-grouped batching: less padding, with a bounded number of compiled shapes.

Without buckets every training batch is padded to `max_length`, so that the jitted step compiles once. LLaVA-style
data is mostly short (an image's 729 tokens plus a short question and answer) with a tail of long conversations, so
most of what a max_length batch computes is padding. Two tools, used by `pipeline.TrainBatches`:

- **Buckets** (`length_buckets`, e.g. (1024, 1280, 1536, 2048)): a batch is padded to the smallest bucket that
  holds its longest sample; `max_length` is always the last bucket. The step compiles once per bucket used.
  Lengths are *spliced* lengths (`batching.spliced_length`: text tokens with each sentinel counted as the
  `image_length` / `retrieval_length` positions it stands for), so the model's spliced sequence always fits in
  the bucket and the model cuts its output at the batch's width (`jaxalign.align.model.build_lm_inputs`).
- **Grouping** (`group_by_length` = W, LLaVA's `group_by_modality_length`, Hugging Face's `group_by_length`):
  the stream of samples is cut into windows of W batches; each window is sorted by length, cut into W batches of
  similar lengths, and the batches are visited in a seeded random order (`group_window`). Without grouping a
  batch of 128 random samples almost always holds one long conversation and lands in the largest bucket.

Hosts: every host must pad a step's batch to the same length. Hosts hold different samples, so each picks the
bucket of its own rows and the hosts agree on the largest (`max_over_processes`, one tiny all-gather per step,
done by the pipeline). All hosts shuffle a window's batches with the same permutation, so at a given step every
host holds the batch of the same length rank of its own window: their buckets mostly agree already.

Accounting: `PaddingStats` counts real (spliced) tokens against computed ones (rows x padded length);
`simulate_padding` / `real_token_share` give the same figures for a list of lengths without reading any data
(for benchmarks and for choosing buckets), and `length_stats.synthetic_mix665k_lengths` makes such a list.

Public API:
  check_buckets(buckets, max_length) -> sorted tuple ending with max_length (empty: bucketing off)
  bucket_for(length, buckets) -> the smallest bucket >= length
  group_window(lengths, batch_size, seed, window_number) -> [W, batch_size] positions into lengths
  PaddingStats: batches, real_tokens, computed_tokens, share, per-length batch counts
  simulate_padding(lengths, batch_size, buckets, window, seed, max_length=None) -> PaddingStats
  real_token_share(lengths, batch_size, buckets, window, seed, max_length=None) -> float
  max_over_processes(length) -> the largest `length` over all JAX processes
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

_GROUP_TAG = 0x6B0C  # keeps the batch-order stream apart from the epoch-order stream of the same seed


def check_buckets(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The sorted buckets up to `max_length`, which is always the last; () when `buckets` is empty (bucketing off).

    Buckets above max_length are left out, so that overriding `config.model.max_length` alone (a shorter run)
    keeps the smaller buckets instead of failing. Raises ValueError for a bucket that is not a positive integer.
    """
    if not buckets:
        return ()
    values = sorted({int(bucket) for bucket in buckets})
    if values[0] < 1:
        raise ValueError(f"config.data.length_buckets={tuple(buckets)}: every bucket must be a positive number of "
                         "positions")
    return tuple(value for value in values if value < max_length) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest of the sorted `buckets` that holds `length` positions."""
    position = int(np.searchsorted(np.asarray(buckets), length, side="left"))
    if position == len(buckets):
        raise ValueError(f"a sample needs {length} positions, more than the largest bucket {buckets[-1]}")
    return int(buckets[position])


def group_window(lengths: Sequence[int], batch_size: int, seed: int, window_number: int) -> np.ndarray:
    """Batches of similar lengths from one window of samples, in a seeded random order.

    Args:
        lengths: [N] spliced lengths of the window's samples in stream order; N a multiple of batch_size.
        batch_size: rows per batch.
        seed, window_number: the batch order is a permutation seeded by (seed, window_number), the same on every
            host.
    Returns:
        [N / batch_size, batch_size] int positions into `lengths`: row i is the i-th batch to visit; each batch
        holds consecutive samples of the window sorted by length (ties keep stream order).
    """
    lengths = np.asarray(lengths)
    if len(lengths) % batch_size:
        raise ValueError(f"a window of {len(lengths)} samples does not cut into batches of {batch_size}")
    batches = np.argsort(lengths, kind="stable").reshape(-1, batch_size)
    order = np.random.default_rng([seed, window_number, _GROUP_TAG]).permutation(len(batches))
    return batches[order]


@dataclasses.dataclass
class PaddingStats:
    """Real against computed token positions of the batches of a pass.

    Attributes:
        batches: batches counted.
        real_tokens: sum of the rows' spliced lengths (what the LM reads that is not padding).
        computed_tokens: sum over batches of rows x padded length (what the LM computes).
        batches_per_length: padded length -> number of batches padded to it.
    """

    batches: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    batches_per_length: dict[int, int] = dataclasses.field(default_factory=lambda: collections.defaultdict(int))

    def add(self, lengths: Sequence[int], padded_length: int) -> None:
        """Counts one batch whose rows have these spliced lengths, padded to `padded_length`."""
        self.batches += 1
        self.real_tokens += int(np.sum(lengths))
        self.computed_tokens += len(lengths) * int(padded_length)
        self.batches_per_length[int(padded_length)] += 1

    @property
    def share(self) -> float | None:
        """real_tokens / computed_tokens (None before the first batch)."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else None

    def merge(self, other: "PaddingStats") -> "PaddingStats":
        merged = PaddingStats(self.batches + other.batches, self.real_tokens + other.real_tokens,
                              self.computed_tokens + other.computed_tokens)
        for stats in (self, other):
            for length, count in stats.batches_per_length.items():
                merged.batches_per_length[length] += count
        return merged

    def to_json(self) -> dict[str, Any]:
        return {"batches": self.batches, "real_tokens": self.real_tokens, "computed_tokens": self.computed_tokens,
                "real_share": self.share,
                "batches_per_length": {str(length): count for length, count in sorted(self.batches_per_length.items())}}

    @classmethod
    def from_json(cls, content: Mapping[str, Any]) -> "PaddingStats":
        stats = cls(int(content["batches"]), int(content["real_tokens"]), int(content["computed_tokens"]))
        for length, count in content.get("batches_per_length", {}).items():
            stats.batches_per_length[int(length)] = int(count)
        return stats

    def __str__(self) -> str:
        if not self.computed_tokens:
            return "no batch built"
        lengths = ", ".join(f"{length}: {count}" for length, count in sorted(self.batches_per_length.items()))
        return (f"real tokens {self.real_tokens:,} of {self.computed_tokens:,} computed ({100 * self.share:.1f}%) "
                f"in {self.batches} batches (batches per padded length: {lengths})")


def simulate_padding(lengths: Sequence[int], batch_size: int, buckets: Sequence[int], window: int, seed: int,
                     max_length: int | None = None) -> PaddingStats:
    """The padding of the batches one pass of the training pipeline forms from samples of these lengths.

    Mirrors `pipeline.TrainBatches` on one host with every sample usable and `num_epochs=1`: the samples are
    visited in the pipeline's epoch-0 order for `seed`, grouped in windows of `window` batches when `window` > 0,
    and each batch is padded to its bucket (to max_length when `buckets` is empty). The last partial batch is
    dropped, as in the pipeline. No JAX, no data: for benchmarks and for choosing buckets and windows.

    Args:
        lengths: [N] spliced sample lengths (`batching.spliced_length`).
        batch_size: rows per batch (the global batch on one host: the bucket applies to the whole batch, all its
            gradient-accumulation micro-batches and devices included).
        buckets: as `config.data.length_buckets`; empty: every batch is padded to max_length.
        window: `config.data.group_by_length` (batches per sorted window); 0: no grouping.
        seed: the pipeline's seed (`config.seed`).
        max_length: the last bucket; default the largest bucket (required when `buckets` is empty).
    """
    lengths = np.asarray(lengths, np.int64)
    if max_length is None:
        if not buckets:
            raise ValueError("simulate_padding needs max_length when buckets is empty")
        max_length = max(buckets)
    buckets = check_buckets(buckets, max_length) or (max_length,)
    if lengths.size and lengths.max() > max_length:
        raise ValueError(f"a length of {lengths.max()} exceeds max_length {max_length}")
    order = np.random.default_rng([seed, 0]).permutation(len(lengths))  # the pipeline's epoch-0 order
    usable = len(order) // batch_size * batch_size
    stats = PaddingStats()
    span = window * batch_size if window > 0 else usable
    for window_number, start in enumerate(range(0, usable, max(span, 1))):
        window_lengths = lengths[order[start:min(start + span, usable)]]
        rows = (group_window(window_lengths, batch_size, seed, window_number) if window > 0
                else np.arange(len(window_lengths)).reshape(-1, batch_size))
        for batch in rows:
            batch_lengths = window_lengths[batch]
            stats.add(batch_lengths, bucket_for(int(batch_lengths.max()), buckets))
    return stats


def real_token_share(lengths: Sequence[int], batch_size: int, buckets: Sequence[int], window: int, seed: int,
                     max_length: int | None = None) -> float:
    """Real tokens / computed tokens of the batches `simulate_padding` forms (same arguments)."""
    share = simulate_padding(lengths, batch_size, buckets, window, seed, max_length).share
    if share is None:
        raise ValueError(f"{len(lengths)} samples make no full batch of {batch_size}")
    return share


def max_over_processes(length: int) -> int:
    """The largest `length` over all JAX processes (every process must call it at the same point).

    The pipeline calls it once per training batch when there are several processes, so that every host pads the
    step's batch to the same bucket.
    """
    import jax  # only multi-host runs need it; keeps the data code importable without initialising jax
    if jax.process_count() == 1:
        return int(length)
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray([length], np.int32))))
