"""The training loop: exact resume after a crash, NaN stop keeping the last good checkpoint, metrics on disk."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.train import loop, optimizer as opt_lib
from jaxalign.train.loop import NonFiniteLossError, train
from jaxalign.train.metrics import read_metrics
from jaxalign.train.state import create_train_state, state_shardings
from jaxalign.train.step import jit_train_step, make_train_step

AXES = {"frozen": {"kernel": P(None, "embed")}, "dense": {"kernel": P("embed", "mlp"), "bias": P("mlp")},
        "out": {"kernel": P("mlp", None)}}
SCHEDULE = opt_lib.warmup_cosine_schedule(0.05, total_steps=10, warmup_steps=2)
RULES = [("frozen/.*", None), (".*", opt_lib.adamw(SCHEDULE, weight_decay=0.01))]


def init_params():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"frozen": {"kernel": jax.random.normal(k1, (4, 8))},
            "dense": {"kernel": 0.3 * jax.random.normal(k2, (8, 8)), "bias": jnp.zeros(8)},
            "out": {"kernel": 0.3 * jax.random.normal(k3, (8, 1))}}


def dropout_loss(params, batch, rng):
    """Regression with dropout, so the result depends on the random key as well as the data order."""
    h = jnp.tanh(batch["x"] @ params["frozen"]["kernel"])
    h = jnp.tanh(h @ params["dense"]["kernel"] + params["dense"]["bias"])
    h = h * jax.random.bernoulli(rng, 0.8, h.shape) / 0.8
    loss = jnp.mean((h @ params["out"]["kernel"] - batch["y"]) ** 2)
    return loss, {"mse": loss}


def batch_at(index):
    kx, ky = jax.random.split(jax.random.PRNGKey(100 + index))
    return {"x": np.asarray(jax.random.normal(kx, (8, 4))), "y": np.asarray(jax.random.normal(ky, (8, 1)))}


def batches_from(start, crash_at=None, poison_at=None):
    for index in itertools.count(start):
        if crash_at is not None and index == crash_at:
            raise KeyboardInterrupt(f"simulated crash before batch {index}")
        batch = batch_at(index)
        if poison_at is not None and index == poison_at:
            batch["x"] = np.full_like(batch["x"], np.nan)
        yield batch


@pytest.fixture(scope="module")
def engine(eight_devices):
    mesh = sharding.make_mesh((2, 4, 1))
    params = init_params()
    optimizer = opt_lib.build_optimizer(params, RULES)
    mask = opt_lib.trainable_mask(params, RULES)
    shardings = state_shardings(create_train_state(params, optimizer, jax.random.PRNGKey(7)), AXES, mesh)
    step = jit_train_step(make_train_step(dropout_loss, optimizer, mask, learning_rate_fn=SCHEDULE), mesh, shardings,
                          sharding.batch_sharding(mesh, 1))

    def fresh_state():
        return jax.device_put(create_train_state(init_params(), optimizer, jax.random.PRNGKey(7)), shardings)

    return {"step": step, "fresh_state": fresh_state, "mask": mask}


def run(engine, workdir, total_steps=10, **kwargs):
    factory = kwargs.pop("factory", batches_from)
    return train(state=engine["fresh_state"](), train_step=engine["step"], batch_iterator_factory=factory,
                 total_steps=total_steps, workdir=str(workdir), log_every=2, checkpoint_every=5, keep=2,
                 examples_per_step=8, **kwargs)


@pytest.fixture(scope="module")
def straight_run(engine, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    config = ml_collections.ConfigDict({"lr": 0.05, "model": {"width": 8}})
    return workdir, run(engine, workdir, config=config)


def test_resume_after_crash_is_exact(engine, straight_run, tmp_path):
    _, straight = straight_run
    with pytest.raises(KeyboardInterrupt):
        run(engine, tmp_path, factory=lambda start: batches_from(start, crash_at=7))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]
    resumed = run(engine, tmp_path, checkpoint_trainable_mask=None)
    assert int(resumed.state.step) == 10
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 straight.state.params, resumed.state.params)
    np.testing.assert_array_equal(np.asarray(straight.state.rng), np.asarray(resumed.state.rng))
    # The resumed run logged steps 6..10 only, with the same values as the straight run.
    assert [r["step"] for r in resumed.history] == [6, 8, 10]
    assert resumed.history[-1]["loss"] == straight.history[-1]["loss"]


def test_metrics_config_and_checkpoints_are_written(straight_run):
    workdir, result = straight_run
    records = read_metrics(str(workdir))
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    assert records == result.history
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    np.testing.assert_allclose(records[0]["learning_rate"], float(SCHEDULE(1)), rtol=1e-6)
    assert all(r["loss"] == r["mse"] for r in records)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
    with open(workdir / "config.json") as file:
        assert json.load(file) == {"lr": 0.05, "model": {"width": 8}}
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(engine, tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 8") as error:
        run(engine, tmp_path, factory=lambda start: batches_from(start, poison_at=7))
    assert error.value.step == 8 and error.value.last_good_checkpoint == 5
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]
    # Steps 6 and 7 were fine, 8 was not: the log stops at 6 and never records the NaN.
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [2, 4, 6]


def test_eval_fn_is_logged(engine, tmp_path):
    calls = []

    def eval_fn(state):
        calls.append(int(state.step))
        return {"weight_norm": jnp.linalg.norm(state.params["out"]["kernel"])}

    result = run(engine, tmp_path, total_steps=4, eval_fn=eval_fn, eval_every=2,
                 checkpoint_trainable_mask=engine["mask"], progress=True)
    assert calls == [2, 4]
    evals = [r for r in result.history if "eval/weight_norm" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["eval/weight_norm"] == pytest.approx(float(jnp.linalg.norm(result.state.params["out"]["kernel"])))


def test_exhausted_batch_iterator_is_a_clear_error(engine, tmp_path):
    with pytest.raises(RuntimeError, match="ran out before step 4 of 10"):
        run(engine, tmp_path, factory=lambda start: itertools.islice(batches_from(start), 3))


class ResumableBatches:
    """`batch_at(0), batch_at(1), ...` with a `state` (the next index); counts the batches it builds."""

    def __init__(self, start_step, start_state=None, crash_at=None):
        # Replaying is what a stateless pipeline must do to reach `start_step`: building every earlier batch.
        self.next_index, self.built, self.crash_at = 0, 0, crash_at
        if start_state is not None:
            self.next_index = start_state["next_index"]
        while self.next_index < start_step:
            next(self)
        self.built_before_first_batch = self.built

    @property
    def state(self):
        return {"next_index": self.next_index}

    def __iter__(self):
        return self

    def __next__(self):
        if self.crash_at is not None and self.next_index == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash before batch {self.next_index}")
        self.built += 1
        self.next_index += 1
        return batch_at(self.next_index - 1)


def read_extra(workdir, step):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "extra"))
    extra = manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
    manager.close()
    return extra


def test_resume_restores_the_saved_iterator_state_without_replay(engine, straight_run, tmp_path):
    _, straight = straight_run
    made = []

    def factory(start_step, start_state=None, crash_at=None):
        made.append((start_step, start_state, ResumableBatches(start_step, start_state, crash_at)))
        return made[-1][2]

    with pytest.raises(KeyboardInterrupt):
        run(engine, tmp_path, factory=lambda start, **kw: factory(start, crash_at=7, **kw), prefetch=2)
    # The prefetcher had read batches 5 and 6 ahead when step 5 was saved: the state saved is after batch 4.
    assert read_extra(tmp_path, 5)["data_iterator_state"] == {"process_count": 1, "processes": [{"next_index": 5}]}
    resumed = run(engine, tmp_path, factory=factory, prefetch=2)
    start_step, start_state, iterator = made[-1]
    assert (start_step, start_state) == (5, {"next_index": 5})
    assert iterator.built_before_first_batch == 0    # replaying would have built 5 batches
    assert [r["step"] for r in resumed.history] == [6, 8, 10]
    assert resumed.history == [r for r in straight.history if r["step"] > 5]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 straight.state.params, resumed.state.params)


def test_old_checkpoints_without_iterator_state_resume_by_replay(engine, straight_run, tmp_path):
    _, straight = straight_run
    with pytest.raises(KeyboardInterrupt):
        run(engine, tmp_path, factory=lambda start: batches_from(start, crash_at=7))   # no state saved
    assert "data_iterator_state" not in read_extra(tmp_path, 5)
    made = []
    resumed = run(engine, tmp_path, factory=lambda start: made.append(ResumableBatches(start)) or made[-1])
    assert made[0].built_before_first_batch == 5
    assert resumed.history == [r for r in straight.history if r["step"] > 5]


def test_prefetching_does_not_change_the_run(engine, straight_run, tmp_path):
    _, straight = straight_run
    prefetched = run(engine, tmp_path, prefetch=2)
    assert prefetched.history == straight.history
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 straight.state.params, prefetched.state.params)


def counting_pulls(monkeypatch):
    pulls = []
    original = loop._pull_metrics

    def pull(metrics):
        pulls.append(len(metrics))
        return original(metrics)

    monkeypatch.setattr(loop, "_pull_metrics", pull)
    return pulls


def counting_steps(engine):
    steps = []

    def step(state, batch):
        steps.append(len(steps))
        return engine["step"](state, batch)
    return step, steps


def test_metrics_are_pulled_only_at_log_steps(engine, tmp_path, monkeypatch):
    pulls = counting_pulls(monkeypatch)
    result = train(state=engine["fresh_state"](), train_step=engine["step"], batch_iterator_factory=batches_from,
                   total_steps=10, workdir=str(tmp_path), log_every=5, checkpoint_every=5, progress=False)
    assert pulls == [5, 5]              # two transfers of five steps' metrics each, not ten of one
    assert [r["step"] for r in result.history] == [5, 10]


def test_non_finite_loss_between_log_steps_stops_at_the_next_log_step(engine, tmp_path, monkeypatch):
    pulls = counting_pulls(monkeypatch)
    step, steps = counting_steps(engine)
    with pytest.raises(NonFiniteLossError, match="at step 7") as error:
        train(state=engine["fresh_state"](), train_step=step,
              batch_iterator_factory=lambda start: batches_from(start, poison_at=6), total_steps=20,
              workdir=str(tmp_path), log_every=5, checkpoint_every=5, progress=False, prefetch=2)
    assert error.value.step == 7 and error.value.last_good_checkpoint == 5
    assert len(steps) == 10 and pulls == [5, 5]     # found at the pull of step 10, naming the step it came from
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [5]


def test_shard_keyed_iterator_states_merge_over_processes_and_per_process_ones_need_the_same_count():
    from jaxalign.train.loop import _own_iterator_state

    saved = {"process_count": 2, "processes": [{"shards": {"0": {"i": 3}, "1": {"i": 4}}},
                                               {"shards": {"2": {"i": 5}, "3": {"i": 6}}}]}
    # One process now (the test session): it gets every shard's state, whoever saved it.
    assert _own_iterator_state(saved) == {"shards": {"0": {"i": 3}, "1": {"i": 4}, "2": {"i": 5}, "3": {"i": 6}}}
    # Per-process states only make sense for the process count that saved them.
    assert _own_iterator_state({"process_count": 2, "processes": [{"next_index": 5}, {"next_index": 7}]}) is None
    assert _own_iterator_state({"process_count": 1, "processes": [{"next_index": 5}]}) == {"next_index": 5}
    assert _own_iterator_state(None) is None
