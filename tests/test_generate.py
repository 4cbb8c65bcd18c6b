"""Batched generation with the KV cache: greedy parity with transformers, EOS handling, sampling."""
import jax
import numpy as np
import pytest

import hf_fixtures_lm as fx
from jaxalign.io import hf_lm
from jaxalign.models import decoder
from jaxalign.models.generate import generate

NEW_TOKENS = 16
PAD = 0


@pytest.fixture(scope="module", params=("llama", "qwen2", "phi"))
def loaded(request):
    folder, model = fx.hf_model(request.param)
    cfg, params = hf_lm.load(folder)
    return cfg, params, model


def hf_generate(model, ids, mask, eos_id):
    """transformers' greedy continuation [B, NEW_TOKENS], padded with PAD where it stopped early."""
    import torch

    model.generation_config.eos_token_id = eos_id
    sequences = model.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                               attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=False,
                               max_new_tokens=NEW_TOKENS, eos_token_id=eos_id, pad_token_id=PAD).numpy()
    new = sequences[:, ids.shape[1]:]
    return np.pad(new, ((0, 0), (0, NEW_TOKENS - new.shape[1])), constant_values=PAD)


def first_fresh_token(tokens: np.ndarray, start: int) -> tuple[int, int, int]:
    """(row, index, token) of the first token at or after `start` in some row that does not occur earlier in
    that row: an EOS id that the row reaches mid-way."""
    for row, sequence in enumerate(tokens):
        for index in range(start, len(sequence)):
            if sequence[index] not in sequence[:index]:
                return row, index, int(sequence[index])
    raise AssertionError(f"no row of {tokens} has a fresh token after index {start}")


def test_greedy_generation_matches_transformers(loaded):
    cfg, params, model = loaded
    ids, mask = fx.prompt_batch("left")
    unstopped = hf_generate(model, ids, mask, eos_id=None)
    # An EOS that one row reaches mid-way, so stopping and padding are compared too.
    stop_row, stop_index, eos = first_fresh_token(unstopped, 4)
    expected = hf_generate(model, ids, mask, eos_id=eos)
    assert (expected[stop_row, stop_index + 1:] == PAD).all()

    out = generate(params, cfg, input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_id=eos,
                   pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    for row, sequence in enumerate(expected.tolist()):
        assert int(out.lengths[row]) == (sequence.index(eos) + 1 if eos in sequence else NEW_TOKENS)
    assert int(out.lengths[stop_row]) == stop_index + 1


@pytest.fixture(scope="module")
def llama():
    cfg, params = hf_lm.load(fx.hf_model("llama")[0])
    ids, mask = fx.prompt_batch("left")
    greedy = generate(params, cfg, input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_id=None)
    return cfg, params, ids, mask, np.asarray(greedy.tokens)


def test_without_eos_every_row_runs_to_the_end(llama):
    cfg, params, ids, mask, greedy = llama
    out = generate(params, cfg, input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_id=None)
    np.testing.assert_array_equal(np.asarray(out.lengths), [NEW_TOKENS, NEW_TOKENS])


def test_inputs_embeds_generate_like_input_ids(llama):
    cfg, params, ids, mask, greedy = llama
    out = generate(params, cfg, inputs_embeds=decoder.embed(params, cfg, ids), attention_mask=mask,
                   max_new_tokens=NEW_TOKENS, eos_id=None)
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy)


def test_right_padded_prompts_generate_like_left_padded(llama):
    cfg, params, ids, mask, greedy = llama
    real = fx.PROMPT - fx.PAD_SLOTS
    right_ids, right_mask = ids.copy(), mask.copy()
    right_ids[1, :real], right_ids[1, real:] = ids[1, fx.PAD_SLOTS:], 0
    right_mask[1, :real], right_mask[1, real:] = 1, 0
    out = generate(params, cfg, input_ids=right_ids, attention_mask=right_mask, max_new_tokens=NEW_TOKENS,
                   eos_id=None)
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy)


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(llama):
    cfg, params, ids, mask, greedy = llama

    def sample(seed, top_p):
        return np.asarray(generate(params, cfg, input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                   rng=jax.random.key(seed), temperature=1.0, top_p=top_p, eos_id=None).tokens)

    first, again, other_seed = sample(3, 0.9), sample(3, 0.9), sample(4, 0.9)
    np.testing.assert_array_equal(first, again)
    assert (first != other_seed).any()
    assert (first != greedy).any()  # sampling at temperature 1 does leave the greedy path
    np.testing.assert_array_equal(sample(5, 1e-6), greedy)


def test_bad_arguments_are_clear_errors(llama):
    cfg, params, ids, mask, _ = llama
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        generate(params, cfg, input_ids=ids, inputs_embeds=decoder.embed(params, cfg, ids), max_new_tokens=2)
    with pytest.raises(ValueError, match="needs an rng key"):
        generate(params, cfg, input_ids=ids, attention_mask=mask, max_new_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, cfg, input_ids=ids, max_new_tokens=2, rng=jax.random.key(0), temperature=1.0, top_p=0.0)
