"""Batched text generation with a KV cache: one prefill over the prompt, then a jitted decode loop.

Prompts may be padded on the left (the usual layout for generation) or on the right: the first new token is
drawn from the hidden state of each row's last real token, and cache slots holding padding are masked out.
Each row stops at its first end-of-sequence token; later tokens of that row are `pad_id`. The loop ends early
once every row has stopped.

The whole of `generate` is one `jax.jit` compilation per (batch, prompt length, max_new_tokens, greedy or
sampling) combination: temperature, top-p, EOS and pad ids are traced values.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxalign.models import decoder
from jaxalign.models.decoder import DecoderConfig

_FROM_CONFIG = object()


class GenerationOutput(NamedTuple):
    """tokens [B, max_new_tokens] int32 (pad after each row's EOS); lengths [B] int32, the number of generated
    tokens of each row up to and including its EOS."""

    tokens: jax.Array
    lengths: jax.Array


def sample_token(logits: jax.Array, key: jax.Array | None, temperature: jax.Array | float,
                 top_p: jax.Array | float, greedy: bool) -> jax.Array:
    """Picks one token per row from logits [B, V]: argmax when `greedy`, else temperature and nucleus (top-p)
    sampling, keeping the smallest set of most likely tokens whose probability reaches `top_p`."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token is kept while the probability of the more likely tokens before it is still below top_p, so the
    # most likely token is always kept.
    keep = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def _generate(params, input_ids, inputs_embeds, attention_mask, rng, temperature, top_p, eos_ids, pad_id, *,
              cfg: DecoderConfig, max_new_tokens: int, greedy: bool) -> GenerationOutput:
    batch, prompt_length = attention_mask.shape
    cache = decoder.init_cache(cfg, batch, prompt_length + max_new_tokens)
    prefill = decoder.forward(params, cfg, input_ids=input_ids, inputs_embeds=inputs_embeds,
                              attention_mask=attention_mask, cache=cache, return_hidden=True, compute_logits=False)
    last_real = prompt_length - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)
    last_hidden = jnp.take_along_axis(prefill.hidden, last_real[:, None, None], axis=1)  # [B, 1, E]
    rng, key = jax.random.split(rng)
    first = sample_token(decoder.hidden_states_to_logits(params, cfg, last_hidden)[:, 0], key, temperature, top_p,
                         greedy)

    def is_eos(token):
        return jnp.any(token[:, None] == eos_ids[None, :], axis=-1)

    def keep_going(state):
        step, _, _, done, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(state):
        step, cache, token, done, tokens, lengths, rng = state
        token = jnp.where(done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_eos(token)
        out = decoder.forward(params, cfg, input_ids=token[:, None], cache=cache)
        rng, key = jax.random.split(rng)
        next_token = sample_token(out.logits[:, 0], key, temperature, top_p, greedy)
        return step + 1, out.cache, next_token, done, tokens, lengths, rng

    state = (jnp.zeros((), jnp.int32), prefill.cache, first, jnp.zeros((batch,), bool),
             jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32), rng)
    _, _, _, _, tokens, lengths, _ = jax.lax.while_loop(keep_going, decode_step, state)
    return GenerationOutput(tokens=tokens, lengths=lengths)


def generate(params: dict, cfg: DecoderConfig, *, input_ids: jax.Array | None = None,
             inputs_embeds: jax.Array | None = None, attention_mask: jax.Array | None = None,
             max_new_tokens: int, rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: Any = _FROM_CONFIG, pad_id: int | None = None) -> GenerationOutput:
    """Generates up to `max_new_tokens` tokens for each prompt of a batch.

    Args:
      params, cfg: the LM (see `jaxalign.models.decoder`).
      input_ids: [B, T] prompt ids, or
      inputs_embeds: [B, T, E] prompt embeddings (a VLM's spliced image and text tokens).
      attention_mask: [B, T], 1 on real prompt tokens; default all real. Left padding is the usual layout.
      max_new_tokens: number of tokens to generate (static: one compilation per value).
      rng: PRNG key, required when temperature > 0.
      temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
      top_p: nucleus sampling mass (1.0 keeps every token).
      eos_id: an id or a sequence of ids that end a row; default `cfg.eos_token_id`; None or () never stops.
      pad_id: id written after a row's EOS; default `cfg.pad_token_id`, else the first EOS id, else 0.
    Returns:
      GenerationOutput(tokens [B, max_new_tokens], lengths [B]).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate: pass exactly one of input_ids [batch, tokens] or inputs_embeds "
                         "[batch, tokens, width]")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be at least 1")
    greedy = float(temperature) <= 0.0
    if not greedy and rng is None:
        raise ValueError(f"generate: temperature={temperature} samples tokens and needs an rng key")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, length = prompt.shape[:2]
    if attention_mask is None:
        attention_mask = jnp.ones((batch, length), jnp.int32)
    if eos_id is _FROM_CONFIG:
        eos_ids: Sequence[int] = cfg.eos_token_ids
    elif eos_id is None:
        eos_ids = ()
    else:
        eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(params, None if input_ids is None else jnp.asarray(input_ids, jnp.int32), inputs_embeds,
                     jnp.asarray(attention_mask, jnp.int32), rng, jnp.float32(max(float(temperature), 1e-6)),
                     jnp.float32(top_p), jnp.asarray(eos_ids, jnp.int32).reshape(-1), jnp.int32(pad_id), cfg=cfg,
                     max_new_tokens=int(max_new_tokens), greedy=greedy)
