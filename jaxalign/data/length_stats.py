"""Synthetic sample lengths shaped like LLaVA-v1.5-mix665k, for padding benchmarks without the data.

`synthetic_mix665k_lengths` draws spliced lengths (text tokens plus the image's positions, as the pipeline counts
them: `batching.spliced_length`) from a three-part mixture. It is an approximation written from the mix's
published make-up, not a measurement of the real file (which is not available here):

- **single-turn image VQA** (the rest, about 77%): one image (729 SigLIP-so400m positions) plus a short prompt and
  answer in the chat template: text ~ lognormal with median 90 tokens and sigma 0.35 (most between 60 and 130),
  clipped to [30, 400];
- **multi-turn image conversations** (17%, LLaVA-Instruct and the multi-question VQA records): one image plus
  200-1300 text tokens, log-uniform;
- **text-only conversations** (6%, ShareGPT): no image, 100-1000 text tokens, log-uniform.

Every length is capped at `max_length` (the pipeline truncates longer samples). Measure the real file's lengths
(`batching.spliced_length` over `pipeline` samples) before trusting figures made from this mixture.

Public API:
  synthetic_mix665k_lengths(num_samples, seed=0, image_length=729, max_length=2048) -> [num_samples] int64
"""
from __future__ import annotations

import numpy as np

MULTI_TURN_SHARE = 0.17
TEXT_ONLY_SHARE = 0.06
SINGLE_TURN_MEDIAN, SINGLE_TURN_SIGMA, SINGLE_TURN_RANGE = 90.0, 0.35, (30, 400)
MULTI_TURN_RANGE = (200, 1300)
TEXT_ONLY_RANGE = (100, 1000)


def _log_uniform(rng: np.random.Generator, low: float, high: float, size: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def synthetic_mix665k_lengths(num_samples: int, seed: int = 0, image_length: int = 729,
                              max_length: int = 2048) -> np.ndarray:
    """[num_samples] int64 spliced lengths drawn from the mixture in the module docstring (seeded).

    Args:
        num_samples: how many lengths.
        seed: the draw's seed.
        image_length: positions an image takes (729 for SigLIP-so400m/14-384 behind an MLP connector).
        max_length: the cap (the pipeline's max_length).
    """
    rng = np.random.default_rng([seed, 665])
    kind = rng.choice(3, size=num_samples, p=[1 - MULTI_TURN_SHARE - TEXT_ONLY_SHARE, MULTI_TURN_SHARE,
                                              TEXT_ONLY_SHARE])
    single = np.clip(rng.lognormal(np.log(SINGLE_TURN_MEDIAN), SINGLE_TURN_SIGMA, num_samples), *SINGLE_TURN_RANGE)
    multi = _log_uniform(rng, *MULTI_TURN_RANGE, num_samples)
    text_only = _log_uniform(rng, *TEXT_ONLY_RANGE, num_samples)
    text = np.where(kind == 0, single, np.where(kind == 1, multi, text_only))
    lengths = np.round(text).astype(np.int64) + np.where(kind == 2, 0, image_length)
    return np.minimum(lengths, max_length)
