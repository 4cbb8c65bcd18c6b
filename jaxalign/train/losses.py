"""Cross-entropy losses, including one that never materialises [batch, tokens, vocab] logits.

`chunked_cross_entropy` is the LM loss for large vocabularies: it takes the final hidden states and the output
head instead of logits, and walks over the vocabulary in chunks of `chunk_size` columns with an online
log-sum-exp. The forward pass keeps only [B*T] running statistics; the backward pass (a custom VJP)
recomputes each chunk's logits to form its softmax gradient. A vocabulary that the chunk size does not divide
(Qwen2's 151,936 in chunks of 16,384) ends with one smaller block, never with padding columns. Peak extra memory is one [B*T, chunk] float32
block instead of [B, T, V]. Logits are computed in float32 whatever the hidden / kernel dtype.

Public API:
  chunked_cross_entropy(hidden [B,T,E], head_kernel [E,V], labels [B,T], label_mask [B,T] | None = None,
                        chunk_size=8192, head_bias [V] | None = None, ignore_index=-100)
      -> (sum_loss float32 scalar, num_tokens float32 scalar)
  softmax_cross_entropy(logits [B,C], labels [B], weights [B] | None = None) -> mean loss (float32 scalar)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def _chunk_logits(hidden: jax.Array, kernel: jax.Array, bias: jax.Array, start: jax.Array | int, size: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Float32 logits [N, size] of vocabulary columns start .. start + size, and their column ids."""
    kernel_chunk = jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1)
    bias_chunk = jax.lax.dynamic_slice_in_dim(bias, start, size, axis=0)
    logits = jnp.dot(hidden, kernel_chunk, preferred_element_type=jnp.float32) + bias_chunk.astype(jnp.float32)
    return logits, start + jnp.arange(size)


def _chunks(vocab_size: int, chunk_size: int) -> tuple[int, int]:
    """(number of full chunks, columns left over): the vocabulary is walked in full chunks under a scan, and the
    remainder is one smaller block after it, so no padding column is ever computed."""
    return vocab_size // chunk_size, vocab_size % chunk_size


def _forward_statistics(hidden, kernel, bias, labels, chunk_size):
    """Per-token log-sum-exp [N] and label logit [N], by an online log-sum-exp over vocabulary chunks."""
    num_chunks, tail = _chunks(kernel.shape[1], chunk_size)
    n = hidden.shape[0]

    def update(carry, start, size):
        running_max, running_sum, label_logit = carry
        logits, columns = _chunk_logits(hidden, kernel, bias, start, size)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=1)
        label_logit = label_logit + jnp.sum(jnp.where(columns[None, :] == labels[:, None], logits, 0.0), axis=1)
        return new_max, running_sum, label_logit

    carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    carry, _ = jax.lax.scan(lambda c, index: (update(c, index * chunk_size, chunk_size), None), carry,
                            jnp.arange(num_chunks))
    if tail:
        carry = update(carry, num_chunks * chunk_size, tail)
    running_max, running_sum, label_logit = carry
    return running_max + jnp.log(running_sum), label_logit


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _token_loss_sum(hidden, kernel, bias, labels, weights, chunk_size):
    lse, label_logit = _forward_statistics(hidden, kernel, bias, labels, chunk_size)
    return jnp.sum((lse - label_logit) * weights)


def _token_loss_sum_forward(hidden, kernel, bias, labels, weights, chunk_size):
    lse, label_logit = _forward_statistics(hidden, kernel, bias, labels, chunk_size)
    return jnp.sum((lse - label_logit) * weights), (hidden, kernel, bias, labels, weights, lse)


def _token_loss_sum_backward(chunk_size, residuals, cotangent):
    hidden, kernel, bias, labels, weights, lse = residuals
    num_chunks, tail = _chunks(kernel.shape[1], chunk_size)
    scale = (cotangent * weights)[:, None]
    hidden32 = hidden.astype(jnp.float32)

    def block_grads(hidden_grad, start, size):
        logits, columns = _chunk_logits(hidden, kernel, bias, start, size)
        # d loss / d logits = softmax - one_hot(label), per token, times the token's weight.
        logits_grad = (jnp.exp(logits - lse[:, None]) - (columns[None, :] == labels[:, None])) * scale
        kernel_chunk = jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1)
        hidden_grad = hidden_grad + jnp.dot(logits_grad, kernel_chunk.astype(jnp.float32).T)
        return hidden_grad, (jnp.dot(hidden32.T, logits_grad), jnp.sum(logits_grad, axis=0))

    hidden_grad, (kernel_grads, bias_grads) = jax.lax.scan(
        lambda g, index: block_grads(g, index * chunk_size, chunk_size), jnp.zeros(hidden.shape, jnp.float32),
        jnp.arange(num_chunks))
    # [chunks, E, chunk] -> [E, chunks * chunk]
    kernel_grad = jnp.transpose(kernel_grads, (1, 0, 2)).reshape(kernel.shape[0], num_chunks * chunk_size)
    bias_grad = bias_grads.reshape(-1)
    if tail:
        hidden_grad, (tail_kernel_grad, tail_bias_grad) = block_grads(hidden_grad, num_chunks * chunk_size, tail)
        kernel_grad = jnp.concatenate([kernel_grad, tail_kernel_grad], axis=1)
        bias_grad = jnp.concatenate([bias_grad, tail_bias_grad])
    return (hidden_grad.astype(hidden.dtype), kernel_grad.astype(kernel.dtype), bias_grad.astype(bias.dtype),
            None, None)


_token_loss_sum.defvjp(_token_loss_sum_forward, _token_loss_sum_backward)


def chunked_cross_entropy(hidden: jax.Array, head_kernel: jax.Array, labels: jax.Array,
                          label_mask: jax.Array | None = None, chunk_size: int = 8192,
                          head_bias: jax.Array | None = None, ignore_index: int = IGNORE_INDEX
                          ) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy of `hidden @ head_kernel (+ head_bias)` against `labels`, vocab in chunks.

    Args:
      hidden: [B, T, E] final hidden states (any float dtype).
      head_kernel: [E, V] output projection (for tied embeddings pass `embedding.T`).
      labels: [B, T] int target ids; positions equal to `ignore_index` carry no loss.
      label_mask: optional [B, T] bool / 0-1 mask; positions where it is false carry no loss.
      chunk_size: vocabulary columns per chunk; V need not be a multiple (the remainder is one smaller block:
        no padding column is computed and the head is never copied to a padded width).
      head_bias: optional [V] output bias.
      ignore_index: label value meaning "no loss here".

    Returns:
      (sum of per-token losses over counted positions, number of counted positions), both float32 scalars;
      divide them for the mean. Differentiable with respect to hidden, head_kernel and head_bias.
    """
    batch, tokens, width = hidden.shape
    vocab_size = head_kernel.shape[1]
    if head_kernel.shape[0] != width:
        raise ValueError(f"head_kernel {head_kernel.shape} does not match hidden width {width} (want [E, V])")
    if labels.shape != (batch, tokens):
        raise ValueError(f"labels {labels.shape} do not match hidden {hidden.shape[:2]}")
    chunk_size = min(chunk_size, vocab_size)
    bias = jnp.zeros((vocab_size,), jnp.float32) if head_bias is None else head_bias
    valid = labels != ignore_index
    if label_mask is not None:
        valid = valid & label_mask.astype(bool)
    weights = valid.reshape(-1).astype(jnp.float32)
    safe_labels = jnp.where(valid, labels, 0).reshape(-1).astype(jnp.int32)
    loss_sum = _token_loss_sum(hidden.reshape(batch * tokens, width), head_kernel, bias, safe_labels, weights,
                               chunk_size)
    return loss_sum, jnp.sum(weights)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of [B, C] logits against [B] int labels (weighted mean if [B] `weights` given)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    losses = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if weights is None:
        return jnp.mean(losses)
    weights = weights.astype(jnp.float32)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1e-9)
