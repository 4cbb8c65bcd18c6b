"""Connectors: linear, mlp{N}x_gelu and the Perceiver resampler against NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import connector, layers
from jaxalign.models.connector import ConnectorConfig


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _layer_norm(p, x, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _random_params(cfg, seed, scale=0.5):
    """Non-trivial values for every parameter (norm scales and biases too), so the references test them.

    Drawn with NumPy from the connector's specs: drawing with `connector.init` compiles one random kernel per
    parameter shape, which is slow on a loaded 2-core machine; `init` itself is tested on its own.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32),
                        layers.shapes(connector.param_specs(cfg)))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)


def test_linear_is_one_dense_layer(tokens):
    cfg = ConnectorConfig(kind="linear", in_dim=6, out_dim=4)
    params = _random_params(cfg, 1)
    out = connector.apply(params, cfg, jnp.asarray(tokens))
    p = _numpy(params)["dense_0"]
    np.testing.assert_allclose(np.asarray(out), tokens @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,num_layers", [("mlp2x_gelu", 2), ("mlp3x_gelu", 3), ("rag2x_gelu", 2)])
def test_mlp_gelu_matches_reference(tokens, kind, num_layers):
    cfg = ConnectorConfig(kind=kind, in_dim=6, out_dim=4)
    assert cfg.num_dense_layers == num_layers
    params = _random_params(cfg, 2)
    assert sorted(params) == [f"dense_{i}" for i in range(num_layers)]
    out = connector.apply(params, cfg, jnp.asarray(tokens))
    p = _numpy(params)
    expected = tokens.astype(np.float64) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
    for index in range(1, num_layers):
        expected = _gelu(expected) @ p[f"dense_{index}"]["kernel"] + p[f"dense_{index}"]["bias"]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def _resampler_reference(p, cfg, x, mask):
    """Flamingo-style resampler written out with NumPy, one example at a time."""
    eps = cfg.layer_norm_eps
    outputs = []
    for b in range(x.shape[0]):
        inputs = x[b] @ p["input_projection"]["kernel"] + p["input_projection"]["bias"]
        latents = p["latents"].copy()
        for layer in range(cfg.num_layers):
            lp = jax.tree.map(lambda a: a[layer], p["layers"])
            media = _layer_norm(lp["input_norm"], inputs, eps)
            lat = _layer_norm(lp["latent_norm"], latents, eps)
            context = np.concatenate([media, lat], 0)
            valid = np.concatenate([mask[b], np.ones(cfg.num_latents, bool)])
            heads = []
            for h in range(cfg.num_heads):
                q = lat @ lp["query"]["kernel"][:, h] + lp["query"]["bias"][h]
                k = context @ lp["key"]["kernel"][:, h] + lp["key"]["bias"][h]
                v = context @ lp["value"]["kernel"][:, h] + lp["value"]["bias"][h]
                logits = q @ k.T / math.sqrt(q.shape[-1])
                logits = np.where(valid[None, :], logits, -1e30)
                heads.append(_softmax(logits) @ v)
            attended = np.stack(heads, 1)  # [Q, H, D]
            latents = latents + np.einsum("thd,hde->te", attended, lp["out"]["kernel"]) + lp["out"]["bias"]
            hidden = _layer_norm(lp["mlp_norm"], latents, eps)
            hidden = _gelu(hidden @ lp["mlp_in"]["kernel"] + lp["mlp_in"]["bias"])
            latents = latents + hidden @ lp["mlp_out"]["kernel"] + lp["mlp_out"]["bias"]
        outputs.append(_layer_norm(p["final_norm"], latents, eps))
    return np.stack(outputs)


@pytest.fixture(scope="module")
def resampler():
    cfg = ConnectorConfig(kind="resampler", in_dim=6, out_dim=8, num_latents=3, num_layers=2, num_heads=2,
                          mlp_ratio=2)
    params = _random_params(cfg, 4, scale=0.3)
    return cfg, params, jax.jit(lambda p, x, m: connector.apply(p, cfg, x, m))


def test_resampler_matches_reference(resampler, tokens):
    cfg, params, apply = resampler
    mask = np.array([[True] * 5, [True, True, True, False, False]])
    out = np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert out.shape == (2, 3, 8)
    expected = _resampler_reference(_numpy(params), cfg, tokens.astype(np.float64), mask)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_resampler_ignores_masked_tokens_and_token_order(resampler, tokens):
    cfg, params, apply = resampler
    mask = np.array([[True, True, True, False, False]] * 2)
    base = np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(mask)))
    changed = tokens.copy()
    changed[:, 3:] = 100.0  # masked tokens: no effect
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(changed), jnp.asarray(mask))), base, atol=1e-5)
    permuted = tokens[:, [2, 0, 1, 3, 4]]  # no positions: the resampler is a set function of its inputs
    np.testing.assert_allclose(np.asarray(apply(params, jnp.asarray(permuted), jnp.asarray(mask))), base, atol=1e-5)
    real_changed = tokens.copy()
    real_changed[:, 0] += 1.0
    assert np.abs(np.asarray(apply(params, jnp.asarray(real_changed), jnp.asarray(mask))) - base).max() > 1e-3


def test_config_validation_and_axes():
    with pytest.raises(ValueError, match="mlp"):
        ConnectorConfig(kind="mlp2x_relu", in_dim=4, out_dim=4)
    with pytest.raises(ValueError, match="num_heads"):
        ConnectorConfig(kind="resampler", in_dim=4, out_dim=6, num_heads=4)
    cfg = ConnectorConfig(kind="resampler", in_dim=6, out_dim=8, num_latents=3, num_layers=2, num_heads=2)
    params = jax.eval_shape(lambda: connector.init(cfg, jax.random.key(0)))
    axes = connector.logical_axes(cfg)
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    is_spec = lambda a: isinstance(a, jax.sharding.PartitionSpec)  # noqa: E731
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=is_spec))
    for path, array in flat_params:
        assert len(flat_axes[path]) == array.ndim
    assert params["layers"]["query"]["kernel"].shape == (2, 8, 2, 4)
    assert cfg.num_output_tokens(17) == 3
    assert ConnectorConfig(kind="linear", in_dim=1, out_dim=1).num_output_tokens(17) == 17
    with pytest.raises(ValueError, match="in_dim=6"):
        connector.apply(_random_params(cfg, 0), cfg, jnp.zeros((1, 2, 5)))


def test_init_draws_small_weights_and_zero_biases():
    cfg = ConnectorConfig(kind="mlp2x_gelu", in_dim=64, out_dim=32)
    params = connector.init(cfg, jax.random.key(0))
    kernel = np.asarray(params["dense_0"]["kernel"])
    assert kernel.shape == (64, 32) and 0.015 < kernel.std() < 0.025
    assert not np.array_equal(kernel[:32], np.asarray(params["dense_1"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(params["dense_1"]["bias"]), 0.0)


def test_bfloat16_compute(tokens):
    cfg32 = ConnectorConfig(kind="mlp2x_gelu", in_dim=6, out_dim=4)
    cfg16 = ConnectorConfig(kind="mlp2x_gelu", in_dim=6, out_dim=4, dtype="bfloat16")
    params = _random_params(cfg32, 5)
    out16 = connector.apply(params, cfg16, jnp.asarray(tokens))
    out32 = connector.apply(params, cfg32, jnp.asarray(tokens))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), rtol=5e-2, atol=5e-3)
