"""Query pooling: the faithful mode equals an independent NumPy reference; the default mode ignores padding and
answer tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.align import query
from jaxalign.align.query import QueryConfig
from jaxalign.data.chat_templates import IGNORE_LABEL as IGNORE
from jaxalign.data.chat_templates import IMAGE_TOKEN_ID, RETRIEVAL_TOKEN_ID
# One compilation per input shape instead of one dispatch per operation: keeps the file fast on 2 loaded cores.
faithful_query = jax.jit(query.faithful_query)
masked_query = jax.jit(query.masked_query)
build_query = jax.jit(query.build_query, static_argnums=0)


def reference_query(image, text, text_start, alpha=0.4):
    """The official pooling for one sample, written from the paper's code description (NumPy, float64)."""
    img = image / np.linalg.norm(image, axis=-1, keepdims=True)
    txt = text[text_start:]
    txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    m = np.concatenate([alpha * img, (1 - alpha) * txt], axis=0)
    scores = m @ m.T
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    attention = scores / scores.sum(axis=1, keepdims=True)
    pooled = attention.mean(axis=0) @ m
    return pooled / np.linalg.norm(pooled)


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 4, 8)).astype(np.float32)
    text = rng.normal(size=(3, 12, 8)).astype(np.float32)
    # Make the pooling far from uniform so that a wrong softmax axis or mean axis would show.
    image[:, 0] *= 5.0
    text[:, :, 0] += 3.0
    return image, text


def test_faithful_matches_numpy_reference(sample):
    image, text = sample
    got = np.asarray(faithful_query(jnp.asarray(image), jnp.asarray(text), text_start=5))
    for b in range(3):
        np.testing.assert_allclose(got[b], reference_query(image[b].astype(np.float64), text[b].astype(np.float64), 5),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-6)


def test_faithful_text_end_equals_the_batch_trimmed_to_its_longest_sample(sample):
    """A batch padded past its longest sample (a length bucket) with text_end gives the official query of the batch
    padded only to its longest sample (positions 0..8 here): the NumPy reference on text[:9]."""
    image, text = sample
    got = np.asarray(faithful_query(jnp.asarray(image), jnp.asarray(text), text_start=5, text_end=9))
    for b in range(3):
        np.testing.assert_allclose(got[b], reference_query(image[b].astype(np.float64),
                                                           text[b, :9].astype(np.float64), 5), rtol=1e-5, atol=1e-5)


def test_faithful_with_per_row_text_start(sample):
    image, text = sample
    starts = np.array([0, 3, 11])
    cfg = QueryConfig(mode="faithful", text_start=99)  # the batch's starts win over the config's
    got = np.asarray(build_query(cfg, jnp.asarray(image), jnp.asarray(text), text_start=jnp.asarray(starts)))
    for b, start in enumerate(starts):
        np.testing.assert_allclose(got[b], reference_query(image[b].astype(np.float64), text[b].astype(np.float64),
                                                           start), rtol=1e-5, atol=1e-5)


def test_faithful_weights_are_configurable(sample):
    image, text = sample
    got = np.asarray(faithful_query(jnp.asarray(image), jnp.asarray(text), 2, image_weight=0.7,
                                          text_weight=0.3))
    np.testing.assert_allclose(got[1], reference_query(image[1].astype(np.float64), text[1].astype(np.float64), 2,
                                                       alpha=0.7), rtol=1e-5, atol=1e-5)


def _prompt_batch(text, prompt_length, answer_length, pad_length, rng):
    """text [B, prompt, d] followed by random answer embeddings and random padding embeddings."""
    batch, _, width = text.shape
    answer = rng.normal(size=(batch, answer_length, width)).astype(np.float32)
    pad = rng.normal(size=(batch, pad_length, width)).astype(np.float32)
    embeddings = np.concatenate([text[:, :prompt_length], answer, pad], axis=1)
    length = embeddings.shape[1]
    attention = np.arange(length)[None, :] < prompt_length + answer_length
    labels = np.where((np.arange(length)[None, :] >= prompt_length) & attention, 7, IGNORE)
    return embeddings, np.broadcast_to(attention, (batch, length)), np.broadcast_to(labels, (batch, length))


def test_default_ignores_padding_and_answer_but_faithful_does_not(sample):
    image, text = sample
    rng = np.random.default_rng(1)
    cfg = QueryConfig(mode="default")
    faithful = QueryConfig(mode="faithful", text_start=2)
    results = {}
    for name, (answer_length, pad_length) in {"short": (2, 7), "long": (5, 4)}.items():
        embeddings, attention, labels = _prompt_batch(text, 8, answer_length, pad_length, rng)
        mask = query.prompt_text_mask(jnp.asarray(attention), jnp.asarray(labels), text_start=2)
        results[name] = (
            np.asarray(build_query(cfg, jnp.asarray(image), jnp.asarray(embeddings), text_mask=mask)),
            np.asarray(build_query(faithful, jnp.asarray(image), jnp.asarray(embeddings))))
    np.testing.assert_allclose(results["short"][0], results["long"][0], rtol=1e-6, atol=1e-6)
    assert np.abs(results["short"][1] - results["long"][1]).max() > 1e-3
    # The default query equals the reference pooling over exactly the prompt tokens 2..7.
    for b in range(3):
        expected = reference_query(image[b].astype(np.float64), text[b, 2:8].astype(np.float64), 0)
        np.testing.assert_allclose(results["short"][0][b], expected, rtol=1e-5, atol=1e-5)


def test_prompt_text_mask_values():
    attention = jnp.array([[1, 1, 1, 1, 1, 0]])
    labels = jnp.array([[IGNORE, IGNORE, IGNORE, IGNORE, 9, IGNORE]])
    ids = jnp.array([[5, IMAGE_TOKEN_ID, RETRIEVAL_TOKEN_ID, 6, 9, 0]])
    mask = query.prompt_text_mask(attention, labels, ids)
    np.testing.assert_array_equal(np.asarray(mask), [[True, False, False, True, False, False]])
    mask = query.prompt_text_mask(attention, labels, ids, text_start=jnp.array([3]))
    np.testing.assert_array_equal(np.asarray(mask), [[False, False, False, True, False, False]])


def test_rows_without_image_use_text_only(sample):
    image, text = sample
    text_mask = jnp.ones(text.shape[:2], bool)
    image_mask = jnp.array([[True] * 4, [False] * 4, [True] * 4])
    got = np.asarray(masked_query(jnp.asarray(image), jnp.asarray(text), text_mask, image_mask))
    expected = reference_query(np.zeros((0, 8)), text[1].astype(np.float64), 0)
    np.testing.assert_allclose(got[1], expected, rtol=1e-5, atol=1e-5)
    empty = masked_query(jnp.asarray(image), jnp.asarray(text), jnp.zeros(text.shape[:2], bool),
                               jnp.zeros(image.shape[:2], bool))
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


def test_query_carries_no_gradient(sample):
    image, text = sample
    mask = jnp.ones(text.shape[:2], bool)

    def total(image_tokens, text_embeddings):
        return (query.masked_query(image_tokens, text_embeddings, mask) * jnp.arange(8.0)).sum()

    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(image), jnp.asarray(text))
    for grad in grads:
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_config_errors(sample):
    image, text = sample
    with pytest.raises(ValueError, match="mode"):
        QueryConfig(mode="learned")
    with pytest.raises(ValueError, match="text_mask"):
        query.build_query(QueryConfig(mode="default"), jnp.asarray(image), jnp.asarray(text))
    with pytest.raises(ValueError, match="width"):
        query.faithful_query(jnp.zeros((3, 4, 5)), jnp.asarray(text))
