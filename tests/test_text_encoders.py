"""Text students: padding never changes states or predictions; the query's entity mentions do."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import text_encoders as te

LENGTH, PADDED = 7, 12


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_lstm(p, x, mask, reverse):
    """Reference LSTM over one sequence x [L, in]: steps only over the real tokens, in the chosen order."""
    w_in, b_in, w_rec = (np.asarray(p["input"]["kernel"]), np.asarray(p["input"]["bias"]),
                         np.asarray(p["recurrent"]["kernel"]))
    hidden = w_rec.shape[0]
    h, c = np.zeros(hidden), np.zeros(hidden)
    out = np.zeros((len(x), hidden))
    order = range(len(x) - 1, -1, -1) if reverse else range(len(x))
    for t in order:
        if not mask[t]:
            continue
        i, f, g, o = np.split(x[t] @ w_in + b_in + h @ w_rec, 4)
        c = _sigmoid(f + 1.0) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out[t] = h
    return out


def _batch(tokens, length, padded, rng, source=(0, 3), target=(5,)):
    """A token batch of one story with `length` real tokens, padded to `padded` with junk token ids."""
    ids = np.concatenate([tokens[:length], rng.integers(2, 30, padded - length)]).astype(np.int32)
    mask = np.arange(padded) < length
    source_mentions, target_mentions = np.zeros(padded, bool), np.zeros(padded, bool)
    source_mentions[list(source)], target_mentions[list(target)] = True, True
    token_node = np.full(padded, -1, np.int32)
    token_node[list(source)], token_node[list(target)] = 0, 2
    return {"tokens": ids[None], "token_mask": mask[None], "source_mentions": source_mentions[None],
            "target_mentions": target_mentions[None], "token_node": token_node[None]}


@pytest.fixture(scope="module", params=["bilstm", "transformer"])
def model(request):
    config = te.TextEncoderConfig(kind=request.param, vocab_size=30, embed=8, hidden=8, num_layers=2, num_heads=2,
                                  mlp=16, max_length=PADDED, num_classes=5, max_nodes=4)
    params = te.init(config, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(2, 30, PADDED)
    return config, params, tokens, jax.jit(te.apply, static_argnums=2)


def test_padding_does_not_change_states_or_logits(model):
    config, params, tokens, apply = model
    rng = np.random.default_rng(1)
    short = apply(params, _batch(tokens, LENGTH, LENGTH, rng), config)
    padded = apply(params, _batch(tokens, LENGTH, PADDED, rng), config)
    np.testing.assert_allclose(short.token_states[:, :LENGTH], padded.token_states[:, :LENGTH], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(padded.token_states[:, LENGTH:], 0.0)
    np.testing.assert_allclose(short.logits, padded.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(short.entity_states, padded.entity_states, rtol=1e-5, atol=1e-5)


def test_a_padded_example_in_a_batch_matches_its_own_run(model):
    config, params, tokens, apply = model
    rng = np.random.default_rng(2)
    examples = [_batch(tokens, n, PADDED, rng) for n in (LENGTH, PADDED, 6)]
    stacked = {key: np.concatenate([e[key] for e in examples]) for key in examples[0]}
    together = apply(params, stacked, config)
    for b, example in enumerate(examples):
        np.testing.assert_allclose(together.logits[b], apply(params, example, config).logits[0], rtol=1e-5,
                                   atol=1e-5)


def test_query_mentions_and_entity_tokens_change_the_answer(model):
    config, params, tokens, apply = model
    rng = np.random.default_rng(3)
    base = apply(params, _batch(tokens, LENGTH, PADDED, rng), config)
    other_source = apply(params, _batch(tokens, LENGTH, PADDED, rng, source=(1, 2)), config)
    changed_tokens = tokens.copy()
    changed_tokens[5] = (changed_tokens[5] + 1) % 28 + 2                   # rename the target's mention
    other_entity = apply(params, _batch(changed_tokens, LENGTH, PADDED, rng), config)
    assert np.abs(np.asarray(base.logits - other_source.logits)).max() > 1e-4
    assert np.abs(np.asarray(base.logits - other_entity.logits)).max() > 1e-4
    assert base.latent.shape == (1, config.latent_dim) and np.all(np.isfinite(np.asarray(base.latent)))


def test_entity_states_average_each_nodes_mentions():
    rng = np.random.default_rng(4)
    states = rng.normal(size=(2, 5, 3)).astype(np.float32)
    token_node = np.array([[0, -1, 0, 2, -1], [1, 1, 1, -1, -1]], np.int32)
    got = np.asarray(te.entity_states(jnp.asarray(states), jnp.asarray(token_node), 3))
    np.testing.assert_allclose(got[0, 0], states[0, [0, 2]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got[0, 1], 0.0)
    np.testing.assert_allclose(got[0, 2], states[0, 3], rtol=1e-6)
    np.testing.assert_allclose(got[1, 1], states[1, :3].mean(0), rtol=1e-6)


def test_lstm_matches_a_numpy_loop_in_both_directions():
    config = te.TextEncoderConfig(kind="bilstm", vocab_size=10, embed=4, hidden=3)
    params = te.init(config, jax.random.key(5))["lstm"]["layer_0"]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 6, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    for direction, reverse in (("forward", False), ("backward", True)):
        got = np.asarray(jax.jit(te.lstm, static_argnums=3)(params[direction], x, mask, reverse))
        for b in range(2):
            np.testing.assert_allclose(got[b], _np_lstm(params[direction], x[b], mask[b], reverse), rtol=1e-5,
                                       atol=1e-5)


def test_config_checks():
    with pytest.raises(ValueError, match="'bilstm' or 'transformer'"):
        te.TextEncoderConfig(kind="gru")
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        te.TextEncoderConfig(kind="transformer", hidden=10, num_heads=4)
    assert te.TextEncoderConfig(kind="bilstm", hidden=8).latent_dim == 48
