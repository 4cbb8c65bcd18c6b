"""Each distillation loss against a plain NumPy reference, plus one property it must have."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.distill import heads, losses
from jaxalign.models import layers

RTOL, ATOL = 1e-5, 1e-5

# Each loss compiled once: one XLA program per loss is cheaper than compiling its every operation eagerly.
kd_loss = jax.jit(losses.kd_loss)
info_nce = jax.jit(losses.info_nce, static_argnames="symmetric")
fitnets_loss = jax.jit(losses.fitnets_loss)
rkd_distance_loss = jax.jit(losses.rkd_distance_loss)
rkd_angle_loss = jax.jit(losses.rkd_angle_loss)
relation_graph_loss = jax.jit(losses.relation_graph_loss, static_argnames="kind")
feature_direction_loss = jax.jit(losses.feature_direction_loss)
feature_norm_loss = jax.jit(losses.feature_norm_loss)
norm_direction_loss = jax.jit(losses.norm_direction_loss)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _np_log_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _np_huber(x, delta=1.0):
    a = np.abs(x)
    return np.where(a < delta, 0.5 * x ** 2 / delta, a - 0.5 * delta)


def _np_unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


# ------------------------------------------------------------------------------------------- KD


def _np_kd(student, teacher, tau, mask):
    values = []
    for s, t, m in zip(student, teacher, mask):
        if not m:
            continue
        p_t = np.exp(_np_log_softmax(t / tau))
        values.append(tau ** 2 * np.sum(p_t * (_np_log_softmax(t / tau) - _np_log_softmax(s / tau))))
    return np.mean(values)


def test_kd_loss_matches_numpy_with_mask():
    rng = _rng(1)
    student, teacher = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    for tau in (1.0, 4.0):
        got = kd_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), tau, mask)
        np.testing.assert_allclose(got, _np_kd(student, teacher, tau, mask), rtol=RTOL, atol=ATOL)


def test_kd_loss_is_zero_for_equal_logits_and_ignores_padding_values():
    logits = jnp.asarray(_rng(2).normal(size=(4, 7)), jnp.float32)
    assert abs(float(kd_loss(logits, logits, 2.0))) < 1e-6
    garbage = logits.at[3, 0].set(100.0)
    mask = np.array([1, 1, 1, 0], bool)
    assert abs(float(kd_loss(garbage, logits, 2.0, mask))) < 1e-6
    assert float(kd_loss(garbage, logits, 2.0)) > 1.0


# -------------------------------------------------------------------------------------- InfoNCE


def _np_info_nce(s, t, tau, symmetric, mask):
    s, t = _np_unit(s)[mask], _np_unit(t)[mask]
    logits = s @ t.T / tau
    forward = -np.mean(np.diag(_np_log_softmax(logits, 1)))
    if not symmetric:
        return forward
    return 0.5 * (forward - np.mean(np.diag(_np_log_softmax(logits.T, 1))))


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_numpy(symmetric):
    rng = _rng(3)
    s, t = rng.normal(size=(8, 6)), rng.normal(size=(8, 6))
    mask = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
    got = info_nce(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), 0.2, symmetric, mask)
    np.testing.assert_allclose(got, _np_info_nce(s, t, 0.2, symmetric, mask), rtol=RTOL, atol=ATOL)
    unmasked = info_nce(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), 0.2, symmetric)
    np.testing.assert_allclose(unmasked, _np_info_nce(s, t, 0.2, symmetric, np.ones(8, bool)), rtol=RTOL,
                               atol=ATOL)


def test_info_nce_is_lower_for_aligned_pairs_than_shuffled():
    rng = _rng(4)
    teacher = rng.normal(size=(16, 8)).astype(np.float32)
    aligned = teacher + 0.05 * rng.normal(size=teacher.shape).astype(np.float32)
    shuffled = aligned[rng.permutation(16)]
    assert float(info_nce(aligned, teacher, 0.1)) < 0.1
    assert float(info_nce(shuffled, teacher, 0.1)) > float(info_nce(aligned, teacher, 0.1)) + 1.0


# -------------------------------------------------------------------------------------- FitNets


def test_fitnets_loss_matches_numpy_and_learns_the_projection():
    rng = _rng(5)
    params = layers.init_params(losses.fitnets_spec(4, 3), jax.random.key(0))
    student = rng.normal(size=(5, 2, 4)).astype(np.float32)
    teacher = rng.normal(size=(5, 2, 3)).astype(np.float32)
    mask = np.ones((5, 2), bool)
    mask[4] = False
    predicted = student @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    expected = np.mean(((predicted - teacher) ** 2).mean(-1)[mask])
    np.testing.assert_allclose(fitnets_loss(params, student, teacher, mask), expected, rtol=RTOL, atol=ATOL)
    # A teacher that is an exact linear map of the student gives zero loss at the right projection.
    exact = {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.ones(3)}
    target = student @ np.asarray(exact["kernel"]) + 1.0
    assert float(fitnets_loss(exact, student, target)) < 1e-10


# ------------------------------------------------------------------------------------------ RKD


def _np_rkd_distance(s, t, mask):
    s, t = s[mask], t[mask]
    n = len(s)
    off = ~np.eye(n, dtype=bool)

    def norm_dist(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return d / d[off].mean()

    return _np_huber(norm_dist(s) - norm_dist(t))[off].mean()


def _np_rkd_angle(s, t, mask):
    s, t = s[mask], t[mask]
    n = len(s)

    def angles(x):
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i != j and k != j:
                        out[i, j, k] = _np_unit(x[i] - x[j]) @ _np_unit(x[k] - x[j])
        return out

    valid = np.array([[[i != j and k != j for k in range(n)] for j in range(n)] for i in range(n)])
    return _np_huber(angles(s) - angles(t))[valid].mean()


def test_rkd_distance_and_angle_match_numpy():
    rng = _rng(6)
    s, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 3)) * 4
    mask = np.array([1, 0, 1, 1, 1, 1], bool)
    s32, t32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    np.testing.assert_allclose(rkd_distance_loss(s32, t32, mask), _np_rkd_distance(s, t, mask),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rkd_angle_loss(s32, t32, mask), _np_rkd_angle(s, t, mask),
                               rtol=RTOL, atol=ATOL)


def test_rkd_is_zero_for_a_scaled_rotated_copy_and_gradients_are_finite():
    rng = _rng(7)
    teacher = rng.normal(size=(5, 4)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    student = (3.0 * teacher @ rotation).astype(np.float32)
    assert float(rkd_distance_loss(student, teacher)) < 1e-8
    assert float(rkd_angle_loss(student, teacher)) < 1e-8
    grads = jax.jit(jax.grad(lambda x: losses.rkd_distance_loss(x, teacher) + losses.rkd_angle_loss(x, teacher)))(
        jnp.asarray(student))
    assert np.all(np.isfinite(np.asarray(grads)))


# ------------------------------------------------------------------------- token relation graphs


def _np_relation_graph(s, t, mask, kind, tau):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        keep = mask[b]
        ss, tt = _np_unit(s[b][keep]), _np_unit(t[b][keep])
        sim_s, sim_t = ss @ ss.T, tt @ tt.T
        if kind == "mse":
            total += np.sum((sim_s - sim_t) ** 2)
            count += sim_s.size
        else:
            lt, ls = _np_log_softmax(sim_t / tau, 1), _np_log_softmax(sim_s / tau, 1)
            total += np.sum(np.exp(lt) * (lt - ls))
            count += len(ss)
    return total / count


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_relation_graph_loss_matches_numpy(kind):
    rng = _rng(8)
    s, t = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 6))
    mask = np.ones((3, 5), bool)
    mask[0, 3:] = False
    mask[2, 4] = False
    got = relation_graph_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), mask, kind, 0.5)
    np.testing.assert_allclose(got, _np_relation_graph(s, t, mask, kind, 0.5), rtol=RTOL, atol=ATOL)


def test_relation_graph_loss_is_zero_when_similarities_agree():
    tokens = _rng(9).normal(size=(2, 4, 3)).astype(np.float32)
    assert float(relation_graph_loss(tokens, 2.0 * tokens)) < 1e-7
    assert float(relation_graph_loss(tokens, tokens[:, ::-1] * np.array([1, -1, 1], np.float32))) > 1e-3


# ------------------------------------------------------------------------------ norm and direction


def test_norm_and_direction_losses_match_numpy():
    rng = _rng(10)
    s, t = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    mask = np.array([1, 1, 0, 1, 1, 0], bool)
    s32, t32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    cos = np.sum(_np_unit(s) * _np_unit(t), -1)
    ratio = np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
    np.testing.assert_allclose(feature_direction_loss(s32, t32, mask), np.mean((1 - cos)[mask]),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(feature_norm_loss(s32, t32, mask), np.mean(((ratio - 1) ** 2)[mask]),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(norm_direction_loss(s32, t32, mask, 0.5, 2.0),
                               0.5 * np.mean(((ratio - 1) ** 2)[mask]) + 2.0 * np.mean((1 - cos)[mask]),
                               rtol=RTOL, atol=ATOL)
    # Same direction, other length: no direction penalty; equal vectors: no penalty at all.
    assert float(feature_direction_loss(3 * s32, s32)) < 1e-6
    assert float(norm_direction_loss(s32, s32)) < 1e-6
    assert float(feature_norm_loss(3 * s32, s32)) == pytest.approx(4.0, rel=1e-5)


# ----------------------------------------------------------------------------------------- heads


def test_projection_head_is_dense_relu_dense():
    specs = heads.alignment_heads_spec(student_dim=6, teacher_dim=9, shared_dim=4)
    params = layers.init_params(specs, jax.random.key(1))
    x = _rng(11).normal(size=(3, 9)).astype(np.float32)
    p = jax.tree.map(np.asarray, params["teacher"])
    expected = np.maximum(x @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0) @ p["output"]["kernel"] + \
        p["output"]["bias"]
    got = jax.jit(heads.projection_head)(params["teacher"], x)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert params["student"]["hidden"]["kernel"].shape == (6, 9)
