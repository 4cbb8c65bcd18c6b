"""CLUTRR distillation trainers: teacher and student steps on 8 fake devices, distillation terms, frozen teacher,
exact resume of the student trainer through the engine."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import sharding as sharding_lib
from jaxalign.clutrr import generator
from jaxalign.configs.base import load_config
from jaxalign.distill import clutrr_batches, evaluate, losses, objectives
from jaxalign.programs import clutrr_trainer as trainer, training
from jaxalign.models import gnn, layers, text_encoders
from jaxalign.train import step as step_lib

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "jaxalign", "configs")
TINY_DATA = ["data.test=()", "data.train_max_length=40", "data.eval_max_length=64", "batch_size=16",
             "train.log_every=1", "train.async_checkpoints=false", "mesh=(2, 4, 1)"]


def teacher_config(steps: int, extra=()):
    return load_config(os.path.join(CONFIGS, "clutrr_teacher.py:quick"),
                       TINY_DATA + [f"steps={steps}", "model.hidden=16", "model.num_layers=2", "lr=0.01",
                                    "train.checkpoint_every=1000", *extra])


def student_config(variant: str, steps: int, teacher_dir: str, extra=()):
    return load_config(os.path.join(CONFIGS, f"clutrr_distill.py:quick,variant={variant}"),
                       TINY_DATA + [f"steps={steps}", "model.embed=16", "model.hidden=16", "model.dropout=0.0",
                                    "lr=0.01", "distill.shared_dim=16", f"distill.teacher_workdir={teacher_dir}",
                                    *extra])


@pytest.fixture(scope="module")
def rows():
    return generator.generate(96, [2, 3], 1, seed=3)


@pytest.fixture(scope="module")
def teacher_run(rows, eight_devices, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    summary = trainer.train_teacher(teacher_config(steps=12), workdir, rows=rows)
    return workdir, summary


@pytest.fixture(scope="module")
def student_run(rows, teacher_run, tmp_path_factory):
    """Student + KD + contrastive + entity-level FitNets + relational KD, 8 steps with checkpoints at 4 and 8."""
    workdir = str(tmp_path_factory.mktemp("student"))
    config = student_config("kd_contrastive", 8, teacher_run[0], ["train.checkpoint_every=4",
                                                                  "distill.entity_weight=1.0",
                                                                  "distill.rkd_weight=0.5"])
    return workdir, trainer.train_student(config, workdir, rows=rows), config


def _losses(workdir: str, key: str = "loss") -> list[float]:
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as stream:
        return [json.loads(line)[key] for line in stream if key in json.loads(line)]


def test_teacher_trains_on_eight_devices_and_loss_decreases(teacher_run):
    workdir, summary = teacher_run
    losses = _losses(workdir)
    assert summary["steps"] == 12 and len(losses) == 12
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])
    for name in ("config.json", "model/model.json", "model/params.npz", "eval.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    model = evaluate.load_model(workdir)
    assert model.role == "teacher" and model.edge_types.tokens[-1] == evaluate.UNLABELLED_EDGE


def test_student_with_every_distillation_term_trains_and_loss_decreases(student_run):
    workdir, summary, _ = student_run
    cross_entropy = _losses(workdir, "cross_entropy")
    assert summary["steps"] == 8 and len(cross_entropy) == 8
    assert np.mean(cross_entropy[-2:]) < np.mean(cross_entropy[:2])
    assert np.mean(_losses(workdir)[-2:]) < np.mean(_losses(workdir)[:2])
    for term in ("kd", "contrastive", "entity", "relational"):
        assert len(_losses(workdir, term)) == 8 and min(_losses(workdir, term)) > 0, term
    model = evaluate.load_model(workdir)
    assert model.role == "student" and set(model.params) == set(text_encoders.param_specs(model.config))


def test_student_resume_is_exact(rows, student_run, tmp_path):
    workdir, _, config = student_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))          # interrupted after the step-4 checkpoint
    shutil.rmtree(os.path.join(resumed, "model"))
    summary = trainer.train_student(config, resumed, rows=rows)
    assert summary["steps"] == 8
    with np.load(os.path.join(workdir, "model", "params.npz")) as full, \
            np.load(os.path.join(resumed, "model", "params.npz")) as again:
        assert sorted(full.files) == sorted(again.files)
        for name in full.files:
            np.testing.assert_array_equal(full[name], again[name], err_msg=name)


# ------------------------------------------------------------------------ loss terms and the frozen teacher


@pytest.fixture(scope="module")
def distill_setup(rows, teacher_run):
    """Student, heads and loaded teacher params plus one batch with text and graph parts."""
    teacher = evaluate.load_model(teacher_run[0])
    words = clutrr_batches.build_word_vocabulary(row.story for row in rows)
    labels = clutrr_batches.label_vocabulary()
    config = student_config("kd_contrastive", 4, teacher_run[0])
    student_config_ = trainer.student_model_config(config, len(words), teacher.config.max_nodes)
    from jaxalign.distill import heads
    specs = {"student": text_encoders.param_specs(student_config_),
             "heads": heads.alignment_heads_spec(student_config_.latent_dim, teacher.config.latent_dim, 16),
             "teacher": gnn.param_specs(teacher.config)}
    params = {"student": layers.init_params(specs["student"], jax.random.PRNGKey(0)),
              "heads": layers.init_params(specs["heads"], jax.random.PRNGKey(1)),
              "teacher": jax.tree.map(jnp.asarray, teacher.params)}
    chunk = rows[:16]
    batch = {"text": clutrr_batches.text_batch(chunk, words, labels, 40, 0),
             "graph": clutrr_batches.graph_batch(evaluate.graph_rows(chunk), labels, teacher.edge_types,
                                                 teacher.config.max_nodes, teacher.config.max_edges)}
    return config, student_config_, teacher, specs, params, batch


def _loss(setup, alpha, beta):
    config, student_config_, teacher, _, params, batch = setup
    distill = config.distill.copy_and_resolve_references()
    distill.alpha, distill.beta = alpha, beta
    loss_fn = objectives.student_loss_fn(student_config_, teacher.config, distill)
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)


def test_kd_and_contrastive_terms_change_the_loss_and_reach_the_heads(distill_setup):
    (alone, alone_metrics), alone_grads = _loss(distill_setup, 0.0, 0.0)
    (with_kd, kd_metrics), _ = _loss(distill_setup, 1.0, 0.0)
    (with_both, both_metrics), both_grads = _loss(distill_setup, 1.0, 0.5)
    assert float(kd_metrics["kd"]) > 0 and float(both_metrics["contrastive"]) > 0
    np.testing.assert_allclose(with_kd, alone + kd_metrics["kd"], rtol=1e-5)
    np.testing.assert_allclose(with_both, alone + both_metrics["kd"] + 0.5 * both_metrics["contrastive"], rtol=1e-5)
    head_norm = lambda grads: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads["heads"])))  # noqa: E731
    assert head_norm(alone_grads) == 0.0
    assert head_norm(both_grads) > 0.0
    # Both heads learn: the student's and the teacher's.
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(both_grads["heads"]["teacher"]))) > 0.0
    # No gradient flows into the teacher through KD or the contrastive term.
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(both_grads["teacher"]))) == 0.0


def test_entity_and_relational_terms_against_a_reference(distill_setup):
    """entity = mean over mentioned (example, node) pairs of the mean squared error of W s + b against the node
    state; relational = RKD distance + angle of the latents; both add to the loss with their weights."""
    config, student_config_, teacher, _, params, batch = distill_setup
    params = dict(params, heads=dict(params["heads"], entity=layers.init_params(
        losses.fitnets_spec(student_config_.state_dim, teacher.config.hidden), jax.random.PRNGKey(2))))
    distill = config.distill.copy_and_resolve_references()
    distill.alpha, distill.beta, distill.entity_weight, distill.rkd_weight = 0.0, 0.0, 2.0, 0.5
    loss_fn = objectives.student_loss_fn(student_config_, teacher.config, distill)
    (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)

    student = text_encoders.apply(params["student"], batch["text"], student_config_)
    graph = gnn.apply(params["teacher"], batch["graph"], teacher.config)
    token_node, node_mask = np.asarray(batch["text"]["token_node"]), np.asarray(batch["graph"]["node_mask"])
    kernel, bias = (np.asarray(params["heads"]["entity"][name], np.float64) for name in ("kernel", "bias"))
    errors = []
    for b in range(token_node.shape[0]):
        for node in sorted(set(token_node[b][token_node[b] >= 0].tolist())):
            assert node_mask[b, node]
            mentions = token_node[b] == node
            pooled = np.asarray(student.token_states[b], np.float64)[mentions].mean(0)
            errors.append(np.mean((pooled @ kernel + bias - np.asarray(graph.node_states[b, node])) ** 2))
    assert len(errors) > 2 * token_node.shape[0]          # most stories mention 3 or more people
    np.testing.assert_allclose(float(metrics["entity"]), np.mean(errors), rtol=1e-4)
    relational = (losses.rkd_distance_loss(student.latent, graph.latent, batch["text"]["example_mask"])
                  + losses.rkd_angle_loss(student.latent, graph.latent, batch["text"]["example_mask"]))
    np.testing.assert_allclose(float(metrics["relational"]), float(relational), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(metrics["cross_entropy"]) + 2.0 * np.mean(errors)
                               + 0.5 * float(relational), rtol=1e-4)
    assert float(jnp.abs(grads["heads"]["entity"]["kernel"]).sum()) > 0            # the regressor learns
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads["teacher"]))) == 0.0


def test_teacher_params_stay_bitwise_unchanged_during_distillation(distill_setup, eight_devices):
    config, student_config_, teacher, specs, params, batch = distill_setup
    mesh = sharding_lib.make_mesh((2, 4, 1))
    rules, _ = trainer.freeze_rules(config, frozen_prefixes=("teacher",))
    setup = training.setup_training(params, layers.logical_axes(specs), rules, mesh, 0)
    state, shardings, optimizer, mask = setup.state, setup.shardings, setup.optimizer, setup.mask
    before = jax.tree.map(np.asarray, jax.device_get(state.params))
    loss_fn = objectives.student_loss_fn(student_config_, teacher.config, config.distill)
    train_step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, optimizer, mask), mesh, shardings,
                                         sharding_lib.batch_sharding(mesh, 1))
    for _ in range(2):
        state, metrics = train_step(state, sharding_lib.global_batch(batch, mesh))
    after = jax.device_get(state.params)
    for old, new in zip(jax.tree.leaves(before["teacher"]), jax.tree.leaves(after["teacher"])):
        np.testing.assert_array_equal(old, np.asarray(new))
    changed = [not np.array_equal(old, np.asarray(new))
               for old, new in zip(jax.tree.leaves(before["student"]), jax.tree.leaves(after["student"]))]
    assert all(changed)
    assert np.isfinite(float(metrics["loss"]))


def test_distillation_without_a_teacher_is_a_clear_error(distill_setup):
    config, student_config_, _, _, _, _ = distill_setup
    with pytest.raises(ValueError, match="teacher"):
        objectives.student_loss_fn(student_config_, None, config.distill)
