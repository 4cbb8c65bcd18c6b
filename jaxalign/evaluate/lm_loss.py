"""Language-model loss and perplexity over an evaluation set, weighted by tokens.

The mean is over answer tokens of the whole set (sum of token losses / number of tokens), not a mean of batch
means, so batches with more answer tokens weigh more and padding rows (no labelled tokens) weigh nothing.

Public API:
  evaluate_loss(eval_step, batches, to_device=None, max_batches=None, progress=True)
      -> {'loss', 'perplexity', 'num_tokens', 'num_batches'}
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm


def evaluate_loss(eval_step: Callable[[Any], dict], batches: Iterable[dict],
                  to_device: Callable[[dict], Any] | None = None, max_batches: int | None = None,
                  progress: bool = True) -> dict[str, float]:
    """Token-weighted mean loss and perplexity.

    Args:
      eval_step: device batch -> metrics with scalar 'loss_sum' (summed token losses) and 'num_tokens'
        (for example a jitted `jaxalign.align.loss.make_loss_fn(..., train=False)` wrapped to return its metrics).
      batches: host batches.
      to_device: host batch -> what `eval_step` takes (e.g. dropping string fields and making global arrays).
      max_batches: stop after this many batches.
    Returns:
      {'loss', 'perplexity', 'num_tokens', 'num_batches'}; loss and perplexity are NaN when no token was seen.
    """
    loss_sum, tokens, count = 0.0, 0.0, 0
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    for batch in tqdm(batches, total=total, desc="loss eval", disable=None if progress else True):
        if max_batches is not None and count >= max_batches:
            break
        metrics = jax.device_get(eval_step(to_device(batch) if to_device else batch))
        loss_sum += float(np.asarray(metrics["loss_sum"]))
        tokens += float(np.asarray(metrics["num_tokens"]))
        count += 1
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)) if tokens else float("nan"),
            "num_tokens": tokens, "num_batches": count}
