"""The TinyAlign training loss: next-token cross-entropy on answer tokens only.

Only text positions that carry a label (the answer / caption tokens and the assistant's end-of-turn token) are
counted: prompt, image, retrieved and padding positions have label -100 after the splice, and the loss mask
also requires the target position to be a TEXT token, so an image or retrieved position can never carry loss
even if a label were to land there. The cross-entropy is computed in vocabulary chunks
(`jaxalign.train.losses.chunked_cross_entropy`), so [batch, tokens, vocab] float32 logits never exist.

The loss is a mean over the batch's answer tokens, whose number varies from sample to sample, so the loss
function reports that number as its 'loss_weight' metric: `jaxalign.train.step.make_train_step` then weights
gradient-accumulation micro-batches by their answer tokens, and the update is the gradient of the whole batch's
token mean (not a mean of micro-batch means). Pass `summed_metrics=SUMMED_METRICS` so that 'num_tokens' and
'loss_sum' are the whole batch's totals for any accum_steps.

Public API:
  loss_mask(labels [B,L], token_kind [B,L]) -> [B, L-1] bool (targets that count)
  answer_loss(hidden, labels, token_kind, lm_params, lm_cfg, chunk_size) -> (sum, count)
  make_loss_fn(cfg, memory, train=True) -> loss_fn(params, batch, rng) -> (token-mean loss, metrics)
  SUMMED_METRICS: the metrics of make_loss_fn that are totals over the batch
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxalign.align import model as model_lib
from jaxalign.align import splice
from jaxalign.models.decoder import DecoderConfig
from jaxalign.train.losses import IGNORE_INDEX, chunked_cross_entropy
from jaxalign.train.step import LOSS_WEIGHT

PyTree = Any

# Totals over the batch: summed, not averaged, over gradient-accumulation micro-batches.
SUMMED_METRICS = ("num_tokens", "loss_sum")


def loss_mask(labels: jax.Array, token_kind: jax.Array) -> jax.Array:
    """[B, L-1] bool: position t's hidden state is trained to predict label t+1, which must be a TEXT token's
    real label."""
    targets, kinds = labels[:, 1:], token_kind[:, 1:]
    return (targets != IGNORE_INDEX) & (kinds == splice.TEXT)


def answer_loss(hidden: jax.Array, labels: jax.Array, token_kind: jax.Array, lm_params: dict, lm_cfg: DecoderConfig,
                chunk_size: int = 8192) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over answer tokens, and their count (float32 scalars).

    Args:
      hidden: [B, L, E] final-normed LM hidden states.
      labels: [B, L] unshifted labels (-100 where unsupervised).
      token_kind: [B, L] splice token kinds.
      lm_params, lm_cfg: the LM (its head, or the tied embedding, projects hidden states to the vocabulary).
    """
    if lm_cfg.tie_word_embeddings:
        kernel, bias = lm_params["embed"]["embedding"].T, None
    else:
        kernel, bias = lm_params["lm_head"]["kernel"], lm_params["lm_head"].get("bias")
    return chunked_cross_entropy(hidden[:, :-1], kernel, labels[:, 1:], loss_mask(labels, token_kind),
                                 chunk_size=chunk_size, head_bias=bias)


def make_loss_fn(cfg: model_lib.TinyAlignConfig, memory: Any, train: bool = True
                 ) -> Callable[[PyTree, dict, jax.Array], tuple[jax.Array, dict]]:
    """`loss_fn(params, batch, rng) -> (mean answer-token loss, metrics)` for `jaxalign.train.step`.

    `memory` may be a traced argument (the trainer passes the bank into the jitted step). The loss is 0 for a
    batch without answer tokens. Metrics: 'num_tokens' (answer tokens in the batch), 'loss_weight' (the same
    count, `jaxalign.train.step.LOSS_WEIGHT`: micro-batches are weighted by it), 'loss_sum' and, with
    retrieval, 'own_id_retrieved' (share of retrieved neighbours that are the sample itself: 0 with
    leave-one-out), 'same_group_retrieved' when the batch carries `group_member_ids` (share of retrieved
    neighbours of the sample's group, itself included: 0 with leave_out 'group'; under 'self' it measures
    what a test sample can never retrieve) and 'retrieval_score' (mean top-1 score).
    """
    def loss_fn(params: PyTree, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        hidden, labels, aux = model_lib.vlm_forward(params, cfg, batch, memory, rng, train)
        loss_sum, count = answer_loss(hidden, labels, aux["token_kind"], params["lm"], cfg.lm, cfg.loss_chunk_size)
        metrics = {"num_tokens": count, LOSS_WEIGHT: count, "loss_sum": loss_sum}
        if cfg.retrieval:
            found = aux["retrieved_ids"] >= 0
            own = model_lib.sample_ids_equal(aux["retrieved_ids"], batch["sample_index"]) & found
            metrics["own_id_retrieved"] = jnp.sum(own) / jnp.maximum(jnp.sum(found), 1)
            if model_lib.GROUP_FIELD in batch:
                same = model_lib.in_sample_group(aux["retrieved_ids"], batch[model_lib.GROUP_FIELD])
                metrics["same_group_retrieved"] = jnp.sum(same & found) / jnp.maximum(jnp.sum(found), 1)
            metrics["retrieval_score"] = jnp.mean(aux["scores"][:, 0])
        return loss_sum / jnp.maximum(count, 1.0), metrics
    return loss_fn
