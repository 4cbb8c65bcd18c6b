"""Knowledge-distillation losses as pure functions over arrays.

Every loss takes student and teacher arrays (logits or features) and returns a float32 scalar. Nothing here
knows about CLUTRR, graphs or text: the same functions distil a GNN teacher into a BiLSTM, or a large VLM's
logits into a small one. Each docstring names the paper the loss comes from.

Conventions:
  * Features are [batch, width] (or [..., width] where noted); logits are [..., classes].
  * `mask` marks real examples (True / 1) against padding (False / 0) so that padded batch slots never count.
    It has the shape of the leading (non-feature) dimensions.
  * The teacher side is wrapped in `jax.lax.stop_gradient` where the teacher is by definition fixed (KD
    targets, relational targets). Where the teacher side may pass through a trained projection (InfoNCE,
    FitNets, relation graphs) no gradient is stopped: stop the frozen teacher encoder's gradient in the caller.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models import layers

_EPS = 1e-12


def _float_mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """A float32 mask of `shape` (all ones when `mask` is None)."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    return jnp.broadcast_to(jnp.asarray(mask), shape).astype(jnp.float32)


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Sum(values * weights) / sum(weights); 0 when every weight is 0 (an all-padding batch)."""
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||, safe at x = 0 (no NaN value or gradient)."""
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, _EPS))


def _huber(x: jax.Array, delta: float = 1.0) -> jax.Array:
    """Huber / smooth-L1 penalty of x (quadratic below `delta`, linear above)."""
    absolute = jnp.abs(x)
    return jnp.where(absolute < delta, 0.5 * jnp.square(x) / delta, absolute - 0.5 * delta)


# --------------------------------------------------------------------------------------- prediction (KD)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
            mask: jax.Array | None = None) -> jax.Array:
    """Soft-target distillation: tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)).

    Source: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015). The tau^2 factor
    keeps the gradient scale independent of the temperature, so the term mixes with cross-entropy unchanged.

    Args:
      student_logits: [..., classes].
      teacher_logits: [..., classes] (gradient stopped).
      temperature: tau > 0; higher softens both distributions.
      mask: [...] (leading dimensions), True for real examples.
    Returns:
      Scalar: the mean over real examples of tau^2 * KL.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    teacher_log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return temperature ** 2 * _masked_mean(kl, _float_mask(mask, kl.shape))


# ------------------------------------------------------------------------------------ contrastive (CRD)


def info_nce(student_z: jax.Array, teacher_z: jax.Array, temperature: float = 0.1, symmetric: bool = True,
             mask: jax.Array | None = None) -> jax.Array:
    """Contrastive alignment of two latent spaces: each student vector must pick out its own teacher vector.

    Sources: van den Oord, Li and Vinyals, "Representation Learning with Contrastive Predictive Coding" (2018),
    the InfoNCE bound; Tian, Krishnan and Isola, "Contrastive Representation Distillation" (ICLR 2020), its use
    for distillation. As in the structured-distillation setting, the negatives are the other examples of the
    batch (no memory bank). Both sides are L2-normalised, so the logits are cosine similarities / tau.

    Args:
      student_z: [batch, width] student latents (already projected to the shared space).
      teacher_z: [batch, width] teacher latents, same width.
      temperature: tau > 0 (about 0.1 is usual).
      symmetric: also score teacher -> student (the CLIP form) and average the two directions.
      mask: [batch], True for real examples; padding is neither an anchor nor a negative.
    Returns:
      Scalar: mean cross-entropy of picking the matching partner among the real examples.
    """
    batch = student_z.shape[0]
    weights = _float_mask(mask, (batch,))
    student = _l2_normalize(student_z.astype(jnp.float32))
    teacher = _l2_normalize(teacher_z.astype(jnp.float32))
    logits = student @ teacher.T / temperature                      # [batch (student), batch (teacher)]
    is_real = weights > 0
    neg_inf = jnp.finfo(jnp.float32).min

    def matching_cross_entropy(scores: jax.Array) -> jax.Array:
        scores = jnp.where(is_real[None, :], scores, neg_inf)       # padded columns are never candidates
        log_probs = jax.nn.log_softmax(scores, axis=-1)
        return _masked_mean(-jnp.diagonal(log_probs), weights)

    loss = matching_cross_entropy(logits)
    if symmetric:
        loss = 0.5 * (loss + matching_cross_entropy(logits.T))
    return loss


# ------------------------------------------------------------------------------------- feature (FitNets)


def fitnets_spec(student_dim: int, teacher_dim: int) -> dict[str, layers.ParamSpec]:
    """ParamSpecs of the FitNets regressor: a dense map student width -> teacher width."""
    return layers.dense_spec(student_dim, teacher_dim, layers.EMBED, None, bias=True,
                             scale=1.0 / max(student_dim, 1) ** 0.5)


def fitnets_loss(params: dict, student_feat: jax.Array, teacher_feat: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
    """Feature matching through a learned regressor: mean squared error of W s + b against t.

    Source: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015). The regressor (`fitnets_spec`) lets
    a narrow student match a wide teacher; it is trained with the student and dropped afterwards.

    Args:
      params: the regressor, {'kernel': [student_width, teacher_width], 'bias': [teacher_width]}.
      student_feat: [..., student_width].
      teacher_feat: [..., teacher_width] (same leading dimensions).
      mask: leading dimensions, True for real positions.
    Returns:
      Scalar: squared error averaged over features and real positions.
    """
    predicted = layers.dense(params, student_feat.astype(jnp.float32))
    per_position = jnp.mean(jnp.square(predicted - teacher_feat.astype(jnp.float32)), axis=-1)
    return _masked_mean(per_position, _float_mask(mask, per_position.shape))


# ------------------------------------------------------------------------------------- relational (RKD)


def _pairwise_distances(x: jax.Array) -> jax.Array:
    """Euclidean distances [batch, batch] between rows of x [batch, width], NaN-free gradient on the diagonal."""
    squared = jnp.sum(jnp.square(x[:, None, :] - x[None, :, :]), axis=-1)
    return jnp.sqrt(jnp.maximum(squared, _EPS))


def rkd_distance_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None,
                      delta: float = 1.0) -> jax.Array:
    """Distance-wise relational KD: match the normalised pairwise distances of the batch (Huber penalty).

    Source: Park, Kim, Lu and Cho, "Relational Knowledge Distillation" (CVPR 2019), eq. 4-5. Each side's
    distances are divided by their mean over distinct real pairs, so the widths and scales of the two spaces
    need not agree.

    Args:
      student: [batch, student_width]; teacher: [batch, teacher_width] (gradient stopped).
      mask: [batch], True for real examples.
      delta: Huber threshold (1 in the paper).
    Returns:
      Scalar: mean Huber error over ordered pairs (i, j), i != j, of real examples.
    """
    batch = student.shape[0]
    weights = _float_mask(mask, (batch,))
    pair_weights = weights[:, None] * weights[None, :] * (1.0 - jnp.eye(batch, dtype=jnp.float32))

    def normalised(x: jax.Array) -> jax.Array:
        distances = _pairwise_distances(x.astype(jnp.float32))
        return distances / jnp.maximum(_masked_mean(distances, pair_weights), _EPS)

    teacher_distances = jax.lax.stop_gradient(normalised(teacher))
    return _masked_mean(_huber(normalised(student) - teacher_distances, delta), pair_weights)


def _angles(x: jax.Array) -> jax.Array:
    """cos of the angle at j between i and k: [batch (i), batch (j), batch (k)] for x [batch, width]."""
    directions = _l2_normalize(x[:, None, :] - x[None, :, :])       # [i, j, width]: unit vector x_i - x_j
    return jnp.einsum("ijd,kjd->ijk", directions, directions)


def rkd_angle_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None,
                   delta: float = 1.0) -> jax.Array:
    """Angle-wise relational KD: match the angles formed by every triplet of examples (Huber penalty).

    Source: Park, Kim, Lu and Cho, "Relational Knowledge Distillation" (CVPR 2019), eq. 6-7:
    cos angle(t_i, t_j, t_k) = <unit(t_i - t_j), unit(t_k - t_j)>. Unlike the reference code, degenerate
    triplets (i = j or k = j, whose angle is undefined) are left out of the mean.

    Args:
      student: [batch, student_width]; teacher: [batch, teacher_width] (gradient stopped).
      mask: [batch], True for real examples.
      delta: Huber threshold.
    Returns:
      Scalar: mean Huber error over real triplets with i != j and k != j.
    """
    batch = student.shape[0]
    weights = _float_mask(mask, (batch,))
    not_same = 1.0 - jnp.eye(batch, dtype=jnp.float32)
    triplet_weights = (weights[:, None, None] * weights[None, :, None] * weights[None, None, :]
                       * not_same[:, :, None] * not_same.T[None, :, :])
    teacher_angles = jax.lax.stop_gradient(_angles(teacher.astype(jnp.float32)))
    student_angles = _angles(student.astype(jnp.float32))
    return _masked_mean(_huber(student_angles - teacher_angles, delta), triplet_weights)


# ------------------------------------------------------------------------------ token-level relations


def _cosine_similarities(tokens: jax.Array) -> jax.Array:
    """[batch, tokens, tokens] cosine similarity between the token vectors of each example."""
    unit = _l2_normalize(tokens.astype(jnp.float32))
    return jnp.einsum("btd,bsd->bts", unit, unit)


def relation_graph_loss(student_tokens: jax.Array, teacher_tokens: jax.Array, mask: jax.Array | None = None,
                        kind: str = "kl", temperature: float = 1.0) -> jax.Array:
    """Token-level relation graphs: match each example's token-to-token similarity matrix.

    Sources: Wang et al., "MiniLM: Deep Self-Attention Distillation" (NeurIPS 2020), KL between row-softmaxed
    relation matrices; Zhang et al., "Knowledge Distillation with Token-level Relation Graph" (2023). The
    tokens of the two sides must correspond one to one (for CLUTRR: student entity vectors against the GNN's
    node vectors); the widths may differ since only cosine similarities are compared.

    Args:
      student_tokens: [batch, tokens, student_width].
      teacher_tokens: [batch, tokens, teacher_width] (gradient stopped).
      mask: [batch, tokens], True for real tokens; rows and columns of padding are ignored.
      kind: 'kl' (KL(teacher row || student row) of softmax(similarity / temperature) over real columns,
        averaged over real rows) or 'mse' (squared difference of similarities over real pairs).
      temperature: softmax temperature for kind='kl'.
    Returns:
      Scalar loss.
    """
    batch, num_tokens = student_tokens.shape[:2]
    token_weights = _float_mask(mask, (batch, num_tokens))
    pair_weights = token_weights[:, :, None] * token_weights[:, None, :]
    student_similarity = _cosine_similarities(student_tokens)
    teacher_similarity = jax.lax.stop_gradient(_cosine_similarities(teacher_tokens))
    if kind == "mse":
        return _masked_mean(jnp.square(student_similarity - teacher_similarity), pair_weights)
    if kind != "kl":
        raise ValueError(f"relation_graph_loss kind must be 'kl' or 'mse', got {kind!r}")
    column_is_real = token_weights[:, None, :] > 0
    neg_inf = jnp.finfo(jnp.float32).min

    def row_log_softmax(similarity: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(jnp.where(column_is_real, similarity / temperature, neg_inf), axis=-1)

    teacher_log_probs = row_log_softmax(teacher_similarity)
    student_log_probs = row_log_softmax(student_similarity)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs) * column_is_real, axis=-1)
    return _masked_mean(kl, token_weights)


# ------------------------------------------------------------------------ feature norm and direction


def feature_direction_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """1 - cos(student, teacher), averaged over real positions: aligns directions, ignores lengths.

    Source: Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction" (2023),
    which aligns student features with teacher directions; here against the paired teacher feature.

    Args:
      student, teacher: [..., width] with equal widths (project first, e.g. with a head or FitNets regressor).
      mask: leading dimensions, True for real positions.
    """
    cosine = jnp.sum(_l2_normalize(student.astype(jnp.float32))
                     * jax.lax.stop_gradient(_l2_normalize(teacher.astype(jnp.float32))), axis=-1)
    return _masked_mean(1.0 - cosine, _float_mask(mask, cosine.shape))


def feature_norm_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """(||student|| / ||teacher|| - 1)^2, averaged over real positions: matches feature lengths.

    Source: Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction" (2023),
    which shows the feature norm matters for distillation; this is the paired-teacher form of its norm term.
    Widths may differ (only norms are compared).

    Args:
      student: [..., student_width]; teacher: [..., teacher_width] (gradient stopped).
      mask: leading dimensions, True for real positions.
    """
    student_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(student.astype(jnp.float32)), axis=-1), _EPS))
    teacher_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(teacher.astype(jnp.float32)), axis=-1), _EPS))
    ratio = student_norm / jax.lax.stop_gradient(teacher_norm)
    return _masked_mean(jnp.square(ratio - 1.0), _float_mask(mask, ratio.shape))


def norm_direction_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None,
                        norm_weight: float = 1.0, direction_weight: float = 1.0) -> jax.Array:
    """norm_weight * feature_norm_loss + direction_weight * feature_direction_loss (same arguments)."""
    return (norm_weight * feature_norm_loss(student, teacher, mask)
            + direction_weight * feature_direction_loss(student, teacher, mask))
