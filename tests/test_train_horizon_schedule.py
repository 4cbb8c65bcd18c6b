"""The learning-rate schedule whose horizon is optimizer state: its values against a by-hand formula and optax's
schedule, its AdamW against `optimizer.adamw`, one compiled program for runs of different lengths (the TinyAlign
trainer's own case is in tests/test_align_trainer.py), the logged rate, and resume taking the horizon from the
config."""
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxalign.train import horizon_schedule, optimizer as opt_lib
from jaxalign.train.loop import train
from jaxalign.train.metrics import read_metrics
from jaxalign.train.state import create_train_state
from jaxalign.train.step import make_train_step


def by_hand(count, peak, warmup, total, end_ratio):
    """The schedule in float64 from its definition: linear warm-up to the peak, cosine decay to end_ratio * peak."""
    if count < warmup:
        return peak * count / warmup
    decay = max(total, warmup + 1) - warmup
    progress = min(count - warmup, decay) / decay
    return peak * (end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("peak, warmup, total, end_ratio", [(1e-3, 6, 200, 0.0), (0.5, 0, 37, 0.1),
                                                            (2.0, 10, 10, 0.0), (3e-3, 3, 80, 0.2)])
def test_rate_matches_the_formula_and_optax(peak, warmup, total, end_ratio):
    counts = list(range(0, total + 5)) + [10 * total]
    rates = jax.jit(jax.vmap(horizon_schedule.warmup_cosine_rate, in_axes=(0, None, None, None, None)))(
        jnp.asarray(counts), jnp.float32(peak), jnp.float32(warmup), jnp.float32(total), jnp.float32(end_ratio))
    expected = [by_hand(count, peak, warmup, total, end_ratio) for count in counts]
    np.testing.assert_allclose(rates, expected, rtol=2e-6, atol=1e-7 * peak)
    optax_schedule = opt_lib.warmup_cosine_schedule(peak, total, warmup_steps=warmup, end_ratio=end_ratio)
    np.testing.assert_allclose(rates, [float(optax_schedule(count)) for count in counts], rtol=1e-6,
                               atol=1e-8 * peak)


def test_rejects_a_bad_horizon():
    with pytest.raises(ValueError, match="total_steps must be positive"):
        horizon_schedule.scale_by_horizon_schedule(1.0, 0)
    with pytest.raises(ValueError, match="warmup_steps=11"):
        horizon_schedule.scale_by_horizon_schedule(1.0, 10, warmup_steps=11)


def params_and_grads(seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {"dense": {"kernel": jax.random.normal(keys[0], (5, 3)), "bias": jax.random.normal(keys[1], (3,))}}
    grads = {"dense": {"kernel": jax.random.normal(keys[2], (5, 3)), "bias": jax.random.normal(keys[3], (3,))}}
    return params, grads


def test_adamw_matches_optimizer_adamw_with_the_optax_schedule():
    settings = dict(warmup_ratio=0.25, end_ratio=0.1)
    ours = horizon_schedule.adamw(0.05, 12, weight_decay=0.01, clip_norm=1.0, **settings)
    reference = opt_lib.adamw(opt_lib.warmup_cosine_schedule(0.05, 12, **settings), weight_decay=0.01, clip_norm=1.0)
    params, _ = params_and_grads(0)
    ours_state, reference_state = ours.init(params), reference.init(params)
    ours_params = reference_params = params
    for step in range(14):  # past the horizon too: the rate holds at end_ratio * peak
        _, grads = params_and_grads(step + 1)
        update, ours_state = jax.jit(ours.update)(grads, ours_state, ours_params)
        ours_params = jax.tree.map(jnp.add, ours_params, update)
        update, reference_state = jax.jit(reference.update)(grads, reference_state, reference_params)
        reference_params = jax.tree.map(jnp.add, reference_params, update)
        for got, want in zip(jax.tree.leaves(ours_params), jax.tree.leaves(reference_params)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_runs_of_different_lengths_lower_to_one_program():
    params, grads = params_and_grads(0)

    def lowered(transform):
        return jax.jit(transform.update).lower(grads, transform.init(params), params).as_text()

    assert (lowered(horizon_schedule.adamw(1e-3, 200, warmup_ratio=0.03))
            == lowered(horizon_schedule.adamw(1e-3, 80, warmup_ratio=0.03)))
    # The closed-over optax schedule bakes its horizon in: two programs (why the state-held horizon exists).
    assert (lowered(opt_lib.adamw(opt_lib.warmup_cosine_schedule(1e-3, 200, warmup_ratio=0.03)))
            != lowered(opt_lib.adamw(opt_lib.warmup_cosine_schedule(1e-3, 80, warmup_ratio=0.03))))


def test_learning_rate_metric_comes_from_the_state():
    params, grads = params_and_grads(0)
    batch = {"x": np.ones((4, 5), np.float32)}

    def loss_fn(p, batch, rng):
        loss = jnp.mean((batch["x"] @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2)
        return loss, {}

    optimizer = opt_lib.build_optimizer(params, [(".*", horizon_schedule.adamw(0.5, 10, warmup_ratio=0.2))])
    mask = jax.tree.map(lambda _: True, params)
    step = jax.jit(make_train_step(loss_fn, optimizer, mask))
    state = create_train_state(params, optimizer, jax.random.PRNGKey(0))
    for count in range(4):
        state, metrics = step(state, batch)
        np.testing.assert_allclose(metrics["learning_rate"], by_hand(count, 0.5, 2, 10, 0.0), rtol=1e-6)
    assert horizon_schedule.learning_rate_in(opt_lib.adamw(0.1).init(params)) is None


def test_keep_horizon_takes_settings_from_the_config_and_the_count_from_the_checkpoint():
    params, _ = params_and_grads(0)
    restored = horizon_schedule.adamw(0.1, 100).init(params)
    restored = jax.tree.map(lambda node: node._replace(count=jnp.int32(42))
                            if isinstance(node, horizon_schedule.HorizonState) else node,
                            restored, is_leaf=lambda node: isinstance(node, horizon_schedule.HorizonState))
    configured = horizon_schedule.adamw(0.2, 300, warmup_ratio=0.1).init(params)
    kept = horizon_schedule.keep_horizon(restored, configured)
    (state,) = [node for node in jax.tree.leaves(kept, is_leaf=lambda n: isinstance(n, horizon_schedule.HorizonState))
                if isinstance(node, horizon_schedule.HorizonState)]
    assert int(state.count) == 42
    assert (float(state.peak_lr), float(state.warmup_steps), float(state.total_steps)) == pytest.approx((0.2, 30, 300))


def test_a_lengthened_run_resumes_on_the_longer_schedule(tmp_path):
    """Train a 6-step run, then lengthen it to 20 steps and resume the same workdir: the resumed steps follow the
    20-step schedule (the config's horizon), not the checkpoint's (whose rate is 0 from step 6 on)."""
    params, _ = params_and_grads(0)

    def loss_fn(p, batch, rng):
        return jnp.mean((batch["x"] @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2), {}

    def batches(start, start_state=None):
        for index in itertools.count(start):
            yield {"x": np.full((4, 5), 0.1 * (index % 3), np.float32)}

    def run(total_steps):
        optimizer = opt_lib.build_optimizer(params, [(".*", horizon_schedule.adamw(0.5, total_steps))])
        mask = jax.tree.map(lambda _: True, params)
        step = jax.jit(make_train_step(loss_fn, optimizer, mask))
        state = create_train_state(params, optimizer, jax.random.PRNGKey(0))
        return train(state=state, train_step=step, batch_iterator_factory=batches, total_steps=total_steps,
                     workdir=str(tmp_path), log_every=1, checkpoint_every=2, keep=2, examples_per_step=4,
                     config=ml_collections.ConfigDict({"total_steps": total_steps}), async_checkpoints=False)

    run(6)
    result = run(20)
    assert int(result.state.step) == 20
    rates = {record["step"]: record["learning_rate"] for record in read_metrics(str(tmp_path))
             if "learning_rate" in record}
    for step in (7, 10, 15, 20):  # the metric logged at step s is the rate of update s (count s - 1)
        np.testing.assert_allclose(rates[step], by_hand(step - 1, 0.5, 0, 20, 0.0), rtol=1e-5)
