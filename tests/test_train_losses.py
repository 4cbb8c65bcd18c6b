"""Chunked-vocabulary cross-entropy against a full-softmax reference, in value and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.train.losses import chunked_cross_entropy, softmax_cross_entropy


def reference_loss(hidden, kernel, bias, labels, mask):
    logits = jnp.einsum("bte,ev->btv", hidden.astype(jnp.float32), kernel.astype(jnp.float32)) + bias
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    valid = (labels != -100) & mask
    token = -jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(token * valid), jnp.sum(valid).astype(jnp.float32)


@pytest.fixture(scope="module")
def inputs():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    batch, tokens, width, vocab = 2, 5, 8, 37   # 37 = not a multiple of the chunk: a smaller last block
    hidden = jax.random.normal(k1, (batch, tokens, width))
    kernel = 0.5 * jax.random.normal(k2, (width, vocab))
    bias = 0.1 * jax.random.normal(k3, (vocab,))
    labels = jax.random.randint(k4, (batch, tokens), 0, vocab).at[0, 0].set(-100)
    mask = jnp.ones((batch, tokens), bool).at[1, 4].set(False)
    return hidden, kernel, bias, labels, mask


@pytest.mark.parametrize("chunk_size", [8, 37, 64])
def test_value_and_gradients_match_full_softmax(inputs, chunk_size):
    hidden, kernel, bias, labels, mask = inputs

    def chunked(h, w, b):
        total, count = chunked_cross_entropy(h, w, labels, mask, chunk_size=chunk_size, head_bias=b)
        return total / count

    def full(h, w, b):
        total, count = reference_loss(h, w, b, labels, mask)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(hidden, kernel, bias)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(full, argnums=(0, 1, 2)))(hidden, kernel, bias)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_counts_ignored_and_masked_tokens_out(inputs):
    hidden, kernel, bias, labels, mask = inputs
    total, count = jax.jit(chunked_cross_entropy, static_argnames="chunk_size")(
        hidden, kernel, labels, mask, chunk_size=16, head_bias=bias)
    assert float(count) == 2 * 5 - 2
    ref_total, _ = reference_loss(hidden, kernel, bias, labels, mask)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)


def test_without_bias_and_bfloat16_hidden(inputs):
    hidden, kernel, _, labels, mask = inputs
    total, count = jax.jit(chunked_cross_entropy, static_argnames="chunk_size")(
        hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), labels, mask, chunk_size=10)
    ref_total, _ = reference_loss(hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                                  jnp.zeros(kernel.shape[1]), labels, mask)
    assert total.dtype == jnp.float32
    np.testing.assert_allclose(total, ref_total, rtol=1e-4)
    grad = jax.jit(jax.grad(lambda h: chunked_cross_entropy(h, kernel.astype(jnp.bfloat16), labels, mask, 10)[0]))(
        hidden.astype(jnp.bfloat16))
    assert grad.dtype == jnp.bfloat16


def test_logits_of_full_vocabulary_never_materialise(inputs):
    hidden, kernel, bias, labels, mask = inputs
    vocab = kernel.shape[1]
    fn = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, labels, mask, chunk_size=8, head_bias=bias)[0],
                          argnums=(0, 1)))
    hlo = fn.lower(hidden, kernel).as_text()
    # No intermediate with a [tokens, vocab] (or padded [tokens, 40]) float32 shape appears in the program.
    assert f"tensor<10x{vocab}xf32>" not in hlo and "tensor<10x40xf32>" not in hlo
    assert "tensor<2x5x37xf32>" not in hlo
    assert "tensor<10x8xf32>" in hlo   # one [tokens, chunk] block at a time
    assert "tensor<10x5xf32>" in hlo   # and the 37 - 4 x 8 = 5 columns left over as one smaller block


def test_head_is_never_padded_to_a_multiple_of_the_chunk(inputs):
    """Qwen2's 151,936 columns in chunks of 16,384 were padded to 163,840: 8% more head work and a padded copy of
    the head. Now no array of the padded width exists, forward or backward."""
    hidden, kernel, bias, labels, mask = inputs
    fn = jax.jit(jax.grad(lambda h, w, b: chunked_cross_entropy(h, w, labels, mask, chunk_size=8, head_bias=b)[0],
                          argnums=(0, 1, 2)))
    hlo = fn.lower(hidden, kernel, bias).as_text()
    assert "x40xf32>" not in hlo and "tensor<40xf32>" not in hlo


def test_softmax_cross_entropy_values():
    logits = jnp.array([[2.0, 0.0], [0.0, 0.0]])
    labels = jnp.array([0, 1])
    expected = np.array([np.log1p(np.exp(-2.0)), np.log(2.0)])
    np.testing.assert_allclose(softmax_cross_entropy(logits, labels), expected.mean(), rtol=1e-6)
    np.testing.assert_allclose(softmax_cross_entropy(logits, labels, jnp.array([1.0, 0.0])), expected[0], rtol=1e-6)
