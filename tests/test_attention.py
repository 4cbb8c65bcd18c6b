"""Attention kernels (jaxalign.models.attention): every implementation that runs on CPU agrees with the einsum
reference, forward and backward, with causal masks, left and right padding and grouped key/value heads; the
chunked kernel's backward needs far less memory; the models accept the kernel as configuration."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import attention, decoder, layers, vit

B, T, H, K, D = 3, 128, 4, 2, 16  # rows: no padding, right padding, left padding


def inputs(q_len=T, kv_len=T, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, q_len, H, D), dtype)
    k = jax.random.normal(keys[1], (B, kv_len, K, D), dtype)
    v = jax.random.normal(keys[2], (B, kv_len, K, D), dtype)
    weights = jax.random.normal(keys[3], (B, q_len, H, D), jnp.float32)  # a random linear read-out of the output
    return q, k, v, weights


def padded_rows(length):
    """[B, length] bool: a full row, a right-padded row and a left-padded row (with 100 real tokens of 128)."""
    index = np.arange(length)
    real = length * 100 // 128
    return jnp.asarray(np.stack([index >= 0, index < real, index >= length - real]))


def value_and_grads(implementation, q, k, v, weights, query_valid, **kwargs):
    """The read-out sum(out * weights) over real queries, and its gradients with respect to q, k and v."""
    def read_out(q, k, v):
        out = attention.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * weights * query_valid[:, :, None, None])
    return jax.jit(jax.value_and_grad(read_out, argnums=(0, 1, 2)))(q, k, v)


def assert_trees_close(actual, expected, atol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), atol=atol, rtol=atol)


# The cuDNN path (padding gathered into sequence lengths) runs on CPU with the XLA kernel underneath.
def _lengths_xla(q, k, v, *, causal, key_valid):
    return attention.length_masked_attention(q, k, v, causal=causal, key_valid=key_valid, scale=D ** -0.5,
                                             implementation="xla")


@pytest.mark.parametrize("implementation", ["xla", "chunked", "splash", "lengths_xla"])
def test_causal_padded_grouped_attention_matches_einsum(implementation):
    q, k, v, weights = inputs()
    valid = padded_rows(T)
    kwargs = dict(causal=True, key_valid=valid)
    if implementation == "chunked":
        kwargs["chunk_size"] = 48  # 128 keys = 2 full chunks + a padded one
    expected = value_and_grads("einsum", q, k, v, weights, valid, **kwargs)
    if implementation == "lengths_xla":
        def read_out(q, k, v):
            out = _lengths_xla(q, k, v, causal=True, key_valid=valid)
            return jnp.sum(out * weights * valid[:, :, None, None])
        actual = jax.jit(jax.value_and_grad(read_out, argnums=(0, 1, 2)))(q, k, v)
    else:
        actual = value_and_grads(implementation, q, k, v, weights, valid, **kwargs)
    assert_trees_close(actual, expected, atol=1e-5)
    assert float(jnp.abs(actual[1][1]).max()) > 0  # the key gradients are not trivially zero


@pytest.mark.parametrize("implementation", ["xla", "chunked", "splash"])
def test_cross_attention_with_padded_keys_matches_einsum(implementation):
    """Not causal, 96 queries over 200 keys of which some are padding (sizes that are no multiple of a block)."""
    q, k, v, weights = inputs(q_len=96, kv_len=200, seed=1)
    key_valid = padded_rows(200)
    everyone = jnp.ones((B, 96))
    expected = value_and_grads("einsum", q, k, v, weights, everyone, key_valid=key_valid)
    actual = value_and_grads(implementation, q, k, v, weights, everyone, key_valid=key_valid, chunk_size=64)
    assert_trees_close(actual, expected, atol=1e-5)


def test_positions_decide_the_causal_mask_like_a_kv_cache():
    """Four new tokens over 16 cache slots, some empty: 'xla' and 'chunked' read positions as 'einsum' does."""
    q, k, v, weights = inputs(q_len=4, kv_len=16, seed=2)
    key_positions = jnp.asarray(np.tile(np.arange(16) - 3, (B, 1)), jnp.int32)
    key_valid = key_positions >= 0
    query_positions = jnp.asarray(np.tile(np.arange(9, 13), (B, 1)), jnp.int32)
    kwargs = dict(causal=True, key_valid=key_valid, query_positions=query_positions, key_positions=key_positions)
    everyone = jnp.ones((B, 4))
    expected = value_and_grads("einsum", q, k, v, weights, everyone, **kwargs)
    for implementation in ("xla", "chunked"):
        actual = value_and_grads(implementation, q, k, v, weights, everyone, chunk_size=5, **kwargs)
        assert_trees_close(actual, expected, atol=1e-5)


def test_bfloat16_chunked_is_close_to_einsum():
    q, k, v, weights = inputs(dtype=jnp.bfloat16, seed=3)
    valid = padded_rows(T)
    expected = value_and_grads("einsum", q, k, v, weights, valid, causal=True, key_valid=valid)
    actual = value_and_grads("chunked", q, k, v, weights, valid, causal=True, key_valid=valid, chunk_size=64)
    np.testing.assert_allclose(float(actual[0]), float(expected[0]), rtol=2e-2)
    for a, e in zip(actual[1], expected[1]):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.abs(a - e).max() <= 0.05 * np.abs(e).max()


def test_chunked_backward_needs_much_less_memory_than_einsum():
    """Gradient program of a 4-layer decoder on 1024 tokens: einsum keeps float32 [B, H, T, T] probabilities per
    layer (measured: 202 MB of temporaries), chunked keeps q, k, v, the output and one log-sum-exp per query and
    head, plus one chunk's [H, T, 512] work arrays at a time (measured: 47 MB)."""
    temp = {name: _decoder_grad_temp_bytes(name, "none", length=1024, num_layers=4) for name in ("einsum", "chunked")}
    assert temp["chunked"] < 0.4 * temp["einsum"], temp


# ------------------------------------------------------------------------------------------------- choosing


def test_auto_picks_by_backend_dtype_and_length():
    pick = functools.partial(attention.resolve_implementation, "auto", head_dim=64, causal=True)
    assert pick(dtype=jnp.bfloat16, q_len=2048, kv_len=2048, backend="gpu") == "cudnn"
    assert pick(dtype=jnp.float32, q_len=2048, kv_len=2048, backend="gpu") == "chunked"
    assert pick(dtype=jnp.bfloat16, q_len=1, kv_len=2048, backend="gpu") == "chunked"  # decoding: not self-attn
    assert pick(dtype=jnp.bfloat16, q_len=2048, kv_len=2048, backend="tpu") == "splash"
    assert pick(dtype=jnp.float32, q_len=2048, kv_len=2048, backend="cpu") == "chunked"
    assert pick(dtype=jnp.float32, q_len=256, kv_len=256, backend="cpu") == "xla"
    assert attention.resolve_implementation("einsum", dtype=jnp.float32, q_len=8, kv_len=8, head_dim=64,
                                            causal=False, backend="gpu") == "einsum"


def test_unknown_implementation_names_the_choices():
    with pytest.raises(ValueError, match="DecoderConfig.attention='flash'.*chunked"):
        decoder.DecoderConfig(attention="flash")
    with pytest.raises(ValueError, match="DecoderConfig.remat='all'.*save_dots"):
        decoder.DecoderConfig(remat="all")


def test_cudnn_on_cpu_or_in_float32_is_a_clear_error():
    q, k, v, _ = inputs(q_len=8, kv_len=8)
    with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
        attention.dot_product_attention(q, k, v, implementation="cudnn")
    # Past the backend check, float32 is refused too (simulated GPU platform).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "_platform", lambda backend: "gpu")
        with pytest.raises(ValueError, match="bfloat16 or float16"):
            attention.dot_product_attention(q, k, v, implementation="cudnn")
        with pytest.raises(ValueError, match="'splash' is a TPU kernel"):
            attention.dot_product_attention(q, k, v, implementation="splash")


def test_layers_attention_still_takes_a_boolean_mask():
    q, k, v, _ = inputs(q_len=8, kv_len=8)
    mask = layers.causal_mask(jnp.tile(jnp.arange(8), (B, 1)), jnp.tile(jnp.arange(8), (B, 1)))
    np.testing.assert_allclose(layers.attention(q, k, v, mask),
                               attention.dot_product_attention(q, k, v, implementation="einsum", causal=True),
                               atol=1e-6)


# --------------------------------------------------------------------------------------------------- models

TINY_LM = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _tiny_lm_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    shapes = layers.shapes(decoder.param_specs(cfg))
    return jax.tree.map(lambda s: jnp.asarray(0.15 * rng.standard_normal(s.shape), jnp.float32), shapes)


def _decoder_grad_temp_bytes(implementation: str, remat: str, length: int, num_layers: int = 2) -> int:
    """Temporary bytes of the compiled gradient program of a tiny decoder on one row of `length` tokens."""
    cfg = decoder.DecoderConfig(**{**TINY_LM, "num_layers": num_layers}, attention=implementation, remat=remat)
    params = _tiny_lm_params(cfg)
    ids = jnp.zeros((1, length), jnp.int32)

    def loss(params):
        return decoder.forward(params, cfg, input_ids=ids).logits.mean()

    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_decoder_logits_do_not_depend_on_the_kernel():
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (B, 24)), jnp.int32)
    mask = padded_rows(24)
    params = _tiny_lm_params(decoder.DecoderConfig(**TINY_LM))
    logits = {}
    for implementation in ("einsum", "xla", "chunked"):
        cfg = decoder.DecoderConfig(**TINY_LM, attention=implementation)
        logits[implementation] = np.asarray(jax.jit(functools.partial(decoder.forward, cfg=cfg))(
            params, input_ids=ids, attention_mask=mask).logits)[np.asarray(mask)]
    np.testing.assert_allclose(logits["xla"], logits["einsum"], atol=1e-5)
    np.testing.assert_allclose(logits["chunked"], logits["einsum"], atol=1e-5)


def test_vision_tower_kernel_and_remat_leave_features_unchanged():
    base = vit.VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4)
    params = vit.init(base, jax.random.key(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    expected = vit.encode(params, base, pixels)
    cfg = vit.VisionConfig(**{**base.__dict__, "attention": "chunked", "remat": "nothing"})
    actual = vit.encode(params, cfg, pixels)
    np.testing.assert_allclose(actual.hidden_states, expected.hidden_states, atol=1e-5)
    np.testing.assert_allclose(actual.pooled, expected.pooled, atol=1e-5)
    with pytest.raises(ValueError, match="VisionConfig.attention='flash'"):
        vit.encode(params, vit.VisionConfig(**{**base.__dict__, "attention": "flash"}), pixels)


@pytest.mark.parametrize("batch", [8, 6])
def test_splash_runs_per_device_under_a_sharded_mesh(eight_devices, batch):
    """On a multi-device mesh the Pallas kernel runs inside a shard_map (8 rows over 2 x 4 devices); a batch the
    devices do not divide (6) takes the chunked kernel. Both equal the einsum reference on real queries."""
    from jaxalign import sharding

    mesh = sharding.make_mesh((2, 4, 1))
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, T, H, D), jnp.float32)
    k, v = (jax.random.normal(key, (batch, T, K, D), jnp.float32) for key in keys[1:])
    valid = jnp.asarray(np.arange(T)[None] < np.array([T, 100, 64, T, 7, T, 90, T])[:batch, None])

    def splash(q, k, v, valid):
        return attention.dot_product_attention(q, k, v, implementation="splash", causal=True, key_valid=valid)

    # 8 rows arrive split over the devices; 6 rows arrive whole, as a host batch of a bank build does.
    rows = sharding.batch_sharding(mesh, 1) if batch == 8 else sharding.replicated(mesh)
    traced = jax.jit(sharding.trace_in_mesh(splash, mesh), in_shardings=(rows,) * 4, out_shardings=rows)
    text = traced.lower(q, k, v, valid).as_text()
    assert ("shard_map" in text or "sdy.manual_computation" in text) == (batch == 8)
    expected = attention.dot_product_attention(q, k, v, implementation="einsum", causal=True, key_valid=valid)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(traced(q, k, v, valid))[real], np.asarray(expected)[real], atol=1e-5)
