"""Projection heads that map student and teacher latents into one shared space for contrastive alignment.

A head is a 2-layer MLP (dense -> ReLU -> dense), the SimCLR / CRD form: the contrastive loss acts on the
head's output, so the encoder's own latent keeps the information the loss would otherwise discard. Heads are
trained with the student and dropped at test time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models import layers


def projection_head_spec(in_dim: int, hidden_dim: int, out_dim: int) -> dict:
    """ParamSpecs of one head: {'hidden': dense in -> hidden, 'output': dense hidden -> out}."""
    return {
        "hidden": layers.dense_spec(in_dim, hidden_dim, layers.EMBED, layers.MLP, scale=1.0 / max(in_dim, 1) ** 0.5),
        "output": layers.dense_spec(hidden_dim, out_dim, layers.MLP, layers.EMBED,
                                    scale=1.0 / max(hidden_dim, 1) ** 0.5),
    }


def projection_head(params: dict, x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Projects x [..., in_dim] to [..., out_dim] (dense -> ReLU -> dense), computed in `dtype`."""
    return layers.dense(params["output"], jax.nn.relu(layers.dense(params["hidden"], x, dtype)), dtype)


def alignment_heads_spec(student_dim: int, teacher_dim: int, shared_dim: int = 128,
                         hidden_dim: int | None = None) -> dict:
    """Specs of a student head and a teacher head into one `shared_dim` space: {'student': ..., 'teacher': ...}.

    `hidden_dim` defaults to the larger input width.
    """
    hidden_dim = hidden_dim or max(student_dim, teacher_dim)
    return {"student": projection_head_spec(student_dim, hidden_dim, shared_dim),
            "teacher": projection_head_spec(teacher_dim, hidden_dim, shared_dim)}
