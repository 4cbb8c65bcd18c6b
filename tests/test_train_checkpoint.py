"""Checkpointer: keep-last-N, JSON extras, trainable-only saves, restore onto another mesh layout."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.train import optimizer as opt_lib
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.state import abstract_state, create_train_state, state_shardings

AXES = {"tower": {"kernel": P("embed", None)}, "connector": {"kernel": P("embed", "mlp"), "bias": P("mlp")}}
RULES = [("tower/.*", None), (".*", optax.adam(0.1))]


def make_state(seed, mesh_shape, tower_value=None):
    key = jax.random.PRNGKey(seed)
    params = {"tower": {"kernel": jax.random.normal(key, (8, 4)) if tower_value is None
                        else jnp.full((8, 4), tower_value)},
              "connector": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (8, 16)),
                            "bias": jnp.arange(16.0) * seed}}
    optimizer = opt_lib.build_optimizer(params, RULES)
    state = create_train_state(params, optimizer, jax.random.PRNGKey(seed))
    # A non-trivial optimizer state: one update's worth of Adam moments.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = optimizer.update(grads, state.opt_state, params)
    state = state.replace(opt_state=opt_state, step=jnp.asarray(seed, jnp.int32))
    mesh = sharding.make_mesh(mesh_shape)
    return jax.device_put(state, state_shardings(state, AXES, mesh)), opt_lib.trainable_mask(params, RULES)


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_empty_directory_has_nothing_to_restore(tmp_path, eight_devices):
    state, _ = make_state(1, (2, 4, 1))
    checkpointer = Checkpointer(str(tmp_path))
    assert checkpointer.restore_latest(state) is None
    checkpointer.close()


def test_keep_last_n_and_extras(tmp_path, eight_devices):
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        state, _ = make_state(step, (2, 4, 1))
        checkpointer.save(step, state, extra={"next_batch_index": step, "config": {"lr": 0.1}})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 3]
    target, _ = make_state(9, (2, 4, 1))
    restored, extra = checkpointer.restore_latest(target)
    saved, _ = make_state(3, (2, 4, 1))
    assert_trees_equal(restored, saved)
    assert extra == {"next_batch_index": 3, "config": {"lr": 0.1}}
    checkpointer.close()


def test_restore_onto_a_different_mesh_layout(tmp_path, eight_devices):
    state, _ = make_state(4, (2, 4, 1))
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(4, state)
    checkpointer.wait()
    target, _ = make_state(5, (1, 8, 1))   # fsdp over all 8 devices now
    restored, _ = checkpointer.restore(4, abstract_state(target))
    assert restored.params["connector"]["kernel"].sharding == target.params["connector"]["kernel"].sharding
    assert restored.params["connector"]["kernel"].sharding.spec == P("fsdp", None)
    assert_trees_equal(restored, state)
    checkpointer.close()


def test_trainable_only_checkpoint_takes_frozen_params_from_the_target(tmp_path, eight_devices):
    state, mask = make_state(6, (2, 4, 1), tower_value=1.0)
    checkpointer = Checkpointer(str(tmp_path), trainable_mask=mask)
    checkpointer.save(6, state)
    checkpointer.wait()
    saved_names = (tmp_path / "6" / "state" / "_METADATA").read_text()
    assert "params.connector.kernel" in saved_names and "params.tower" not in saved_names   # tower not re-saved

    target, _ = make_state(7, (2, 4, 1), tower_value=2.0)
    restored, _ = checkpointer.restore(6, target)
    np.testing.assert_array_equal(restored.params["tower"]["kernel"], np.full((8, 4), 2.0))   # from the target
    assert_trees_equal(restored.params["connector"], state.params["connector"])               # from the checkpoint
    assert_trees_equal(restored.opt_state, state.opt_state)
    assert int(restored.step) == 6

    with pytest.raises(ValueError, match="frozen params"):
        checkpointer.restore(6, abstract_state(target))
    checkpointer.close()
