"""The update step: micro-batch accumulation (by examples, or by tokens for a loss that declares a
'loss_weight'), metrics, and a sharded step equal to the single-device one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.train import optimizer as opt_lib
from jaxalign.train.state import abstract_state, create_train_state, state_shardings
from jaxalign.train.step import jit_train_step, make_eval_step, make_train_step


def init_mlp(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"frozen_embed": {"kernel": jax.random.normal(k1, (4, 8))},
            "hidden": {"kernel": 0.3 * jax.random.normal(k2, (8, 16)), "bias": jnp.zeros(16)},
            "out": {"kernel": 0.3 * jax.random.normal(k3, (16, 3)), "bias": jnp.zeros(3)}}


AXES = {"frozen_embed": {"kernel": P(None, "embed")},
        "hidden": {"kernel": P("embed", "mlp"), "bias": P("mlp")},
        "out": {"kernel": P("mlp", None), "bias": P(None)}}


def mlp_loss(params, batch, rng):
    del rng
    h = jnp.tanh(batch["x"] @ params["frozen_embed"]["kernel"])
    h = jax.nn.gelu(h @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1))
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


SCHEDULE = opt_lib.warmup_cosine_schedule(0.05, total_steps=10, warmup_steps=2)
RULES = [("frozen_embed/.*", None), (".*", opt_lib.adamw(SCHEDULE, weight_decay=0.01, clip_norm=1.0))]


def make_batch(seed, size=16):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    return {"x": jax.random.normal(kx, (size, 4)), "y": jax.random.randint(ky, (size,), 0, 3)}


@pytest.fixture(scope="module")
def setup():
    params = init_mlp(jax.random.PRNGKey(0))
    optimizer = opt_lib.build_optimizer(params, RULES)
    mask = opt_lib.trainable_mask(params, RULES)
    return params, optimizer, mask


def test_accumulation_equals_one_big_batch(setup):
    params, optimizer, mask = setup
    batch = make_batch(1, size=16)
    results = []
    for accum_steps in (1, 4):
        step = jax.jit(make_train_step(mlp_loss, optimizer, mask, accum_steps=accum_steps, learning_rate_fn=SCHEDULE))
        state = create_train_state(params, optimizer, jax.random.PRNGKey(3))
        for _ in range(3):
            state, metrics = step(state, batch)
        results.append((state, metrics))
    (one, one_metrics), (four, four_metrics) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), one.params, four.params)
    for name in ("loss", "grad_norm", "accuracy", "learning_rate"):
        np.testing.assert_allclose(one_metrics[name], four_metrics[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(one_metrics["learning_rate"], SCHEDULE(2), rtol=1e-6)


def test_accumulation_rejects_indivisible_batch(setup):
    params, optimizer, mask = setup
    step = make_train_step(mlp_loss, optimizer, mask, accum_steps=3)
    with pytest.raises(ValueError, match="accum_steps=3"):
        step(create_train_state(params, optimizer, jax.random.PRNGKey(3)), make_batch(1, size=16))


def test_loss_falls_and_eval_step_reports_it(setup):
    params, optimizer, mask = setup
    step = jax.jit(make_train_step(mlp_loss, optimizer, mask))
    eval_step = jax.jit(make_eval_step(mlp_loss))
    state = create_train_state(params, optimizer, jax.random.PRNGKey(3))
    batch = make_batch(2)
    before = float(eval_step(state.params, batch)["loss"])
    for _ in range(10):
        state, _ = step(state, batch)
    assert float(eval_step(state.params, batch)["loss"]) < before - 0.05


def test_sharded_step_on_eight_devices_equals_single_device(setup, eight_devices):
    params, optimizer, mask = setup
    mesh = sharding.make_mesh((2, 4, 1))
    step_fn = make_train_step(mlp_loss, optimizer, mask, accum_steps=2, learning_rate_fn=SCHEDULE)
    batches = [make_batch(10 + i) for i in range(3)]

    single = create_train_state(params, optimizer, jax.random.PRNGKey(3))
    single_step = jax.jit(step_fn)
    for batch in batches:
        single, single_metrics = single_step(single, batch)

    state = create_train_state(params, optimizer, jax.random.PRNGKey(3))
    shardings = state_shardings(state, AXES, mesh)
    # Adam's mu / nu mirror the params they belong to: the hidden kernel [8, 16] is sharded over 'fsdp' on embed.
    assert shardings.params["hidden"]["kernel"].spec == P("fsdp", None)
    mirrored = [s.spec for s, leaf in zip(jax.tree.leaves(shardings.opt_state), jax.tree.leaves(state.opt_state))
                if leaf.shape == (8, 16)]
    assert mirrored == [P("fsdp", None)] * 2
    assert shardings.step.spec == P()
    state = jax.device_put(state, shardings)
    sharded_step = jit_train_step(step_fn, mesh, shardings, sharding.batch_sharding(mesh, 1))
    for batch in batches:
        state, metrics = sharded_step(state, jax.device_put(batch, sharding.batch_sharding(mesh, 1)))
    assert state.params["hidden"]["kernel"].sharding.spec == P("fsdp", None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), single.params, state.params)
    np.testing.assert_allclose(single_metrics["loss"], metrics["loss"], rtol=1e-6)
    abstract = abstract_state(state)
    assert abstract.params["hidden"]["kernel"].sharding == state.params["hidden"]["kernel"].sharding


# --- token-weighted accumulation: a loss that is a mean over a varying number of tokens -------------------------
VOCAB, WIDTH, TOKENS, IGNORE = 5, 3, 8, -100
# Answer tokens per example (batch of 16). With the strided split, accum_steps=2 gives micro-batches of 1 and 30
# tokens, accum_steps=4 gives 1, 16, 0 and 14.
TOKENS_PER_EXAMPLE = [1, 8, 0, 8, 0, 8, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0]


def token_sum_and_count(weights, batch):
    """Summed next-token cross-entropy over labelled positions of [B, T] labels, and their count."""
    labelled = batch["labels"] != IGNORE
    log_probs = jax.nn.log_softmax(batch["x"] @ weights)
    nll = -jnp.take_along_axis(log_probs, jnp.where(labelled, batch["labels"], 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(labelled, nll, 0.0)), jnp.sum(labelled).astype(jnp.float32)


def token_loss(params, batch, rng):
    """Token mean like TinyAlign's loss: declares its token count as 'loss_weight'."""
    del rng
    total, count = token_sum_and_count(params["w"], batch)
    return total / jnp.maximum(count, 1.0), {"loss_weight": count, "num_tokens": count, "loss_sum": total}


def make_token_batch(tokens_per_example=TOKENS_PER_EXAMPLE, seed=5):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (len(tokens_per_example), TOKENS, WIDTH))
    labels = jax.random.randint(ky, (len(tokens_per_example), TOKENS), 0, VOCAB)
    labelled = np.arange(TOKENS)[None, :] < np.asarray(tokens_per_example)[:, None]
    return {"x": x, "labels": jnp.where(labelled, labels, IGNORE)}


def token_params():
    """Fresh zeros each time: the sharded step donates (deletes) its input state."""
    return {"w": jnp.zeros((WIDTH, VOCAB))}


TOKEN_MASK = {"w": True}
# Plain SGD with learning rate 1 from zero params moves the params to exactly minus the step's gradient.
SGD = optax.sgd(1.0)


def gradient_of_step(step, batch, shard=lambda state: state):
    state = shard(create_train_state(token_params(), SGD, jax.random.PRNGKey(0)))
    state, metrics = step(state, batch)
    return -np.asarray(state.params["w"]), metrics


def full_batch_token_mean(weights, batch):
    total, count = token_sum_and_count(weights, batch)
    return total / count


def test_token_weighted_accumulation_equals_full_batch_token_mean():
    batch = make_token_batch()
    reference = np.asarray(jax.grad(full_batch_token_mean)(token_params()["w"], batch))
    reference_loss = float(full_batch_token_mean(token_params()["w"], batch))
    for accum_steps in (1, 2, 4):
        step = jax.jit(make_train_step(token_loss, SGD, TOKEN_MASK, accum_steps=accum_steps,
                                       summed_metrics=("num_tokens", "loss_sum")))
        gradient, metrics = gradient_of_step(step, batch)
        np.testing.assert_allclose(gradient, reference, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"], reference_loss, rtol=1e-6)
        assert float(metrics["num_tokens"]) == float(metrics["loss_weight"]) == sum(TOKENS_PER_EXAMPLE)
        np.testing.assert_allclose(metrics["loss_sum"], reference_loss * sum(TOKENS_PER_EXAMPLE), rtol=1e-6)
        if accum_steps > 1:
            # The old rule, a mean of the micro-batch means, lets the 1-token micro-batch weigh as much as the
            # 30-token one: far from the token mean.
            micro_mean_grad = jax.grad(lambda w, b: token_loss({"w": w}, b, None)[0])
            micro_grads = [micro_mean_grad(token_params()["w"], jax.tree.map(lambda leaf: leaf[i::accum_steps], batch))
                           for i in range(accum_steps)]
            mean_of_means = np.mean(np.stack(micro_grads), axis=0)
            assert np.abs(mean_of_means - reference).max() > 1e-2


def test_token_weighted_accumulation_sharded_on_eight_devices(eight_devices):
    mesh = sharding.make_mesh((2, 4, 1))
    batch_sharding = sharding.batch_sharding(mesh, 1)
    batch = jax.device_put(make_token_batch(), batch_sharding)
    reference = np.asarray(jax.grad(full_batch_token_mean)(token_params()["w"], make_token_batch()))
    template = create_train_state(token_params(), SGD, jax.random.PRNGKey(0))
    shardings = state_shardings(template, {"w": P(None, None)}, mesh)
    for accum_steps in (2, 4):
        step = jit_train_step(make_train_step(token_loss, SGD, TOKEN_MASK, accum_steps=accum_steps,
                                              summed_metrics=("num_tokens", "loss_sum")),
                              mesh, shardings, batch_sharding)
        gradient, metrics = gradient_of_step(step, batch, shard=lambda state: jax.device_put(state, shardings))
        np.testing.assert_allclose(gradient, reference, rtol=1e-6, atol=1e-6)
        assert float(metrics["num_tokens"]) == sum(TOKENS_PER_EXAMPLE)


def test_batch_without_tokens_gives_zero_loss_and_zero_update():
    batch = make_token_batch(tokens_per_example=[0] * 16)
    for accum_steps in (1, 4):
        step = jax.jit(make_train_step(token_loss, SGD, TOKEN_MASK, accum_steps=accum_steps))
        gradient, metrics = gradient_of_step(step, batch)
        assert np.all(gradient == 0.0)
        assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
        assert float(metrics["loss_weight"]) == 0.0


def test_summed_metrics_must_name_reported_metrics(setup):
    params, optimizer, mask = setup
    step = make_train_step(mlp_loss, optimizer, mask, accum_steps=2, summed_metrics=("num_tokens",))
    with pytest.raises(ValueError, match="num_tokens"):
        step(create_train_state(params, optimizer, jax.random.PRNGKey(3)), make_batch(1, size=16))
