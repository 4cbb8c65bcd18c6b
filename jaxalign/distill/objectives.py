"""The training objectives of CLUTRR structured distillation: the GNN teacher's and the text students' losses.

Student loss (Dong, Rondeau and Hamilton, "Distilling Structured Knowledge for Text-Based Relational
Reasoning", EMNLP 2020, as reconstructed in CLUTRR_DISTILL.md):

    CE(label) + alpha * tau^2 * KL(teacher_tau || student_tau) + beta * InfoNCE(head_s(student latent),
                                                                               head_t(teacher latent); temperature)
      [+ entity_weight * FitNets(W @ student entity states, GNN node states)   (entity-level alignment, optional)
       + rkd_weight * (RKD distance + RKD angle)(student latent, teacher latent)]   (relational KD, optional)

Public API:
  teacher_loss_fn(teacher_config) -> loss_fn(params, batch, rng)
  student_loss_fn(student_config, teacher_config, distill, apply_student=text_encoders.apply)
      -> loss_fn(params, batch, rng)
  distill_weights(distill) -> {'alpha', 'beta', 'entity', 'relational'};  needs_teacher(distill) -> bool
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxalign.distill import heads, losses
from jaxalign.models import gnn, text_encoders
from jaxalign.train.losses import softmax_cross_entropy


def teacher_loss_fn(teacher_config: gnn.GNNConfig) -> Callable:
    """`loss_fn(params, batch, rng)` of the GNN: cross-entropy on graph batches, with accuracy."""
    def loss_fn(params, batch, rng):
        out = gnn.apply(params, batch, teacher_config, rng=rng if teacher_config.random_features else None)
        mask = batch["example_mask"]
        loss = softmax_cross_entropy(out.logits, batch["label"], mask)
        accuracy = _masked_accuracy(out.logits, batch["label"], mask)
        return loss, {"cross_entropy": loss, "accuracy": accuracy}
    return loss_fn


def _masked_accuracy(logits, labels, mask):
    weights = mask.astype(jnp.float32)
    return jnp.sum((logits.argmax(-1) == labels) * weights) / jnp.maximum(weights.sum(), 1.0)


def distill_weights(distill: ml_collections.ConfigDict) -> dict[str, float]:
    """The weight of each teacher-dependent loss term: alpha (KD), beta (InfoNCE), entity, relational.

    Configs written before the entity and relational terms existed have no such fields: they count as 0.
    """
    return {"alpha": float(distill.alpha), "beta": float(distill.beta),
            "entity": float(distill.get("entity_weight", 0.0)), "relational": float(distill.get("rkd_weight", 0.0))}


def needs_teacher(distill: ml_collections.ConfigDict) -> bool:
    """Whether any distillation term is on (then a teacher must be loaded)."""
    return any(weight > 0 for weight in distill_weights(distill).values())


def student_loss_fn(student_config: text_encoders.TextEncoderConfig, teacher_config: gnn.GNNConfig | None,
                    distill: ml_collections.ConfigDict, apply_student: Callable = text_encoders.apply) -> Callable:
    """`loss_fn(params, batch, rng)` of a student: CE + alpha * KD + beta * InfoNCE (+ entity + relational terms).

    params: {'student': ..., and when distilling 'teacher': frozen GNN params, 'heads': {'student', 'teacher'
      (InfoNCE projection heads), and 'entity' (FitNets regressor) when entity_weight > 0}}.
    batch: {'text': text_batch arrays, 'graph': graph_batch arrays (when distilling)}.
    distill: alpha (KD weight), beta (contrastive weight), tau (KD temperature), temperature (InfoNCE), and
      optionally entity_weight (FitNets on entity states) and rkd_weight (RKD distance + angle on the latents).
    apply_student: `(params, text batch, student_config, rng) -> TextEncoderOutput`; `bert_student.apply` for a
      BERT-family student (its output is the same NamedTuple, so every term applies unchanged).
    Metrics: cross_entropy, kd, contrastive (0 when the term is off), accuracy; entity and relational when on.
    """
    weights = distill_weights(distill)
    alpha, beta = weights["alpha"], weights["beta"]
    if needs_teacher(distill) and teacher_config is None:
        raise ValueError("distill.alpha, beta, entity_weight or rkd_weight > 0 needs a teacher "
                         "(set distill.teacher_workdir)")

    def loss_fn(params, batch, rng):
        text = batch["text"]
        mask = text["example_mask"]
        out = apply_student(params["student"], text, student_config, rng=rng)
        cross_entropy = softmax_cross_entropy(out.logits, text["label"], mask)
        metrics = {"cross_entropy": cross_entropy, "accuracy": _masked_accuracy(out.logits, text["label"], mask),
                   "kd": jnp.zeros(()), "contrastive": jnp.zeros(())}
        loss = cross_entropy
        if needs_teacher(distill):
            # The teacher is frozen: its output is a constant of the student's loss.
            teacher = jax.lax.stop_gradient(gnn.apply(params["teacher"], batch["graph"], teacher_config))
            if alpha > 0:
                metrics["kd"] = losses.kd_loss(out.logits, teacher.logits, float(distill.tau), mask)
                loss = loss + alpha * metrics["kd"]
            if beta > 0:
                student_z = heads.projection_head(params["heads"]["student"], out.latent)
                teacher_z = heads.projection_head(params["heads"]["teacher"], teacher.latent)
                metrics["contrastive"] = losses.info_nce(student_z, teacher_z, float(distill.temperature),
                                                         mask=mask)
                loss = loss + beta * metrics["contrastive"]
            if weights["entity"] > 0:
                metrics["entity"] = losses.fitnets_loss(params["heads"]["entity"], out.entity_states,
                                                        teacher.node_states, _mentioned_nodes(text, batch["graph"]))
                loss = loss + weights["entity"] * metrics["entity"]
            if weights["relational"] > 0:
                metrics["relational"] = (losses.rkd_distance_loss(out.latent, teacher.latent, mask)
                                         + losses.rkd_angle_loss(out.latent, teacher.latent, mask))
                loss = loss + weights["relational"] * metrics["relational"]
        return loss, metrics
    return loss_fn


def _mentioned_nodes(text: dict, graph: dict) -> jax.Array:
    """[B, N] True for the graph nodes of real examples that the token batch mentions at least once."""
    num_nodes = graph["node_mask"].shape[1]
    mentions = jax.nn.one_hot(text["token_node"], num_nodes, dtype=jnp.int32).sum(1)    # token_node -1: none
    return (mentions > 0) & graph["node_mask"].astype(bool) & text["example_mask"].astype(bool)[:, None]
