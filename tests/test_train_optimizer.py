"""Freeze rules, optimizer state of frozen params, weight-decay mask and the learning-rate schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.train import optimizer as opt_lib
from jaxalign.train.state import create_train_state
from jaxalign.train.step import make_train_step


def tiny_params():
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    return {"vision": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jnp.zeros(4)},
            "connector": {"kernel": jax.random.normal(k2, (4, 4)), "norm": {"scale": jnp.ones(4)}},
            "head": {"kernel": jax.random.normal(k3, (4, 2))}}


def loss_fn(params, batch, rng):
    h = jnp.tanh(batch["x"] @ params["vision"]["kernel"] + params["vision"]["bias"])
    h = (h @ params["connector"]["kernel"]) * params["connector"]["norm"]["scale"]
    out = h @ params["head"]["kernel"]
    loss = jnp.mean((out - batch["y"]) ** 2)
    return loss, {"mse": loss}


RULES = [("vision/.*", None), ("head/.*", None), (".*", optax.adam(0.1))]


def test_paths_and_first_matching_rule_wins():
    params = tiny_params()
    assert opt_lib.param_paths(params)["connector"]["norm"]["scale"] == "connector/norm/scale"
    labels = opt_lib.rule_labels(params, [("connector/kernel", optax.sgd(1.0)), ("connector/.*", None),
                                          (".*", optax.adam(1.0))])
    assert labels["connector"]["kernel"] == "rule_0"
    assert labels["connector"]["norm"]["scale"] == "frozen"
    assert labels["vision"]["bias"] == "rule_2"


def test_unmatched_param_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"head/kernel"):
        opt_lib.build_optimizer(tiny_params(), [("vision/.*", None), ("connector/.*", optax.adam(0.1))])


def test_frozen_leaves_have_no_optimizer_state_and_do_not_change():
    params = tiny_params()
    optimizer = opt_lib.build_optimizer(params, RULES)
    mask = opt_lib.trainable_mask(params, RULES)
    assert mask == {"vision": {"kernel": False, "bias": False}, "connector": {"kernel": True, "norm": {"scale": True}},
                    "head": {"kernel": False}}
    state = create_train_state(params, optimizer, jax.random.PRNGKey(1))
    # Adam's mu and nu for the two trainable leaves, plus counts: no array of a frozen param's shape (3, 4), (4, 2).
    state_shapes = [leaf.shape for leaf in jax.tree.leaves(state.opt_state)]
    assert (3, 4) not in state_shapes and (4, 2) not in state_shapes
    assert state_shapes.count((4, 4)) == 2 and state_shapes.count((4,)) == 2
    step = jax.jit(make_train_step(loss_fn, optimizer, mask))
    batch = {"x": jax.random.normal(jax.random.PRNGKey(2), (8, 3)), "y": jnp.ones((8, 2))}
    for _ in range(3):
        state, metrics = step(state, batch)
    np.testing.assert_array_equal(state.params["vision"]["kernel"], params["vision"]["kernel"])
    np.testing.assert_array_equal(state.params["head"]["kernel"], params["head"]["kernel"])
    assert not np.allclose(state.params["connector"]["kernel"], params["connector"]["kernel"])
    assert int(state.step) == 3 and float(metrics["grad_norm"]) > 0


def test_split_and_merge_round_trip():
    params = tiny_params()
    mask = opt_lib.trainable_mask(params, RULES)
    trainable, frozen = opt_lib.split_trainable(params, mask)
    assert trainable["vision"]["kernel"] is None and frozen["connector"]["kernel"] is None
    assert len(jax.tree.leaves(trainable)) == 2 and len(jax.tree.leaves(frozen)) == 3
    merged = opt_lib.merge_trainable(trainable, frozen, mask)
    jax.tree.map(np.testing.assert_array_equal, merged, params)


def test_weight_decay_skips_biases_and_norms():
    mask = opt_lib.weight_decay_mask(tiny_params())
    assert mask["vision"] == {"kernel": True, "bias": False}
    assert mask["connector"] == {"kernel": True, "norm": {"scale": False}}


def test_adamw_decays_only_masked_leaves_and_clips():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    transform = opt_lib.build_optimizer(params, [(".*", opt_lib.adamw(0.1, weight_decay=0.5, clip_norm=1.0))])
    opt_state = transform.init(params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(transform.update)(zero_grads, opt_state, params)
    # Zero gradients: only decoupled weight decay moves the kernel (-lr * wd * p); the bias is not decayed.
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.05 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["dense"]["bias"], np.zeros(2), atol=0)


def test_warmup_cosine_schedule_values():
    schedule = opt_lib.warmup_cosine_schedule(1.0, total_steps=100, warmup_ratio=0.1, end_ratio=0.1)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(55)), 0.1 + 0.9 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 0.1, rtol=1e-5)
    with pytest.raises(ValueError, match="warmup_steps"):
        opt_lib.warmup_cosine_schedule(1.0, total_steps=10, warmup_steps=11)
