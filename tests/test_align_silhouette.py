"""The silhouette key (`jaxalign.align.silhouette`) against a by-hand NumPy reference, its invariances, and its
use as the model's retrieval key (queries and bank keys alike)."""
import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

from jaxalign.align import memory_keys, model as model_lib, silhouette
from jaxalign.align.query import QueryConfig
from jaxalign.models.connector import ConnectorConfig
from jaxalign.models.decoder import DecoderConfig
from jaxalign.models.vit import VisionConfig


def reference_features(image: np.ndarray, size: int = 8, threshold: float = 0.2) -> np.ndarray:
    """Loops over pixels and cells: the area of pixel [r, r + 1) inside cell [i h / s, (i + 1) h / s)."""
    height, width, _ = image.shape
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(image - background).max(-1) > threshold
    if not mask.any():
        return np.zeros(size * size + 3, np.float32)
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()

    def weights(first, last):
        span = last - first + 1
        table = np.zeros((size, span))
        for cell in range(size):
            lo, hi = cell * span / size, (cell + 1) * span / size
            for pixel in range(span):
                table[cell, pixel] = max(0.0, min(pixel + 1, hi) - max(pixel, lo))
        return table / table.sum(1, keepdims=True)

    crop = mask[top:bottom + 1, left:right + 1].astype(np.float64)
    outline = weights(top, bottom) @ crop @ weights(left, right).T
    return np.concatenate([outline.ravel() / size, image[mask].mean(0)]).astype(np.float32)


def drawn(shape: str, colour=(0.9, 0.1, 0.1), at=(4, 4), scale=12, size=32, background=(0.95, 0.93, 0.9)):
    image = np.empty((size, size, 3), np.float32)
    image[:] = background
    yy, xx = np.mgrid[:scale, :scale]
    if shape == "rectangle":
        inside = np.ones((scale, scale), bool)
    elif shape == "circle":
        inside = (yy - (scale - 1) / 2) ** 2 + (xx - (scale - 1) / 2) ** 2 <= (scale / 2) ** 2
    else:  # triangle, apex up
        inside = np.abs(xx - (scale - 1) / 2) <= yy / 2 + 0.5
    patch = image[at[0]:at[0] + scale, at[1]:at[1] + scale]
    patch[inside] = colour
    return image


@pytest.fixture(scope="module")
def easy_vqa_images():
    easy_vqa = pytest.importorskip("easy_vqa")
    paths = easy_vqa.get_train_image_paths()
    return np.stack([np.asarray(Image.open(paths[i]).convert("RGB"), np.float32) / 255 for i in sorted(paths)[:12]])


def test_matches_the_numpy_reference_on_easy_vqa_and_drawn_images(easy_vqa_images):
    drawings = np.stack([drawn("circle"), drawn("triangle", at=(10, 3), scale=15), drawn("rectangle", scale=7)])
    drawings = np.concatenate([drawings, np.pad(drawings, ((0, 0), (16, 16), (16, 16), (0, 0)), mode="edge")[:, ::2,
                                                                                                          ::2]])
    for images in (easy_vqa_images, drawings):
        got = np.asarray(jax.jit(silhouette.silhouette_features)(images))
        want = np.stack([reference_features(image) for image in images])
        assert got.shape == (len(images), silhouette.feature_dim())
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_place_and_scale_do_not_count_but_shape_and_colour_do():
    key = lambda image: np.asarray(silhouette.silhouette_features(image[None]))[0]  # noqa: E731
    circle = key(drawn("circle", at=(2, 2), scale=16))
    np.testing.assert_allclose(key(drawn("circle", at=(12, 9), scale=16)), circle, atol=1e-6)   # moved
    # Scaled: the mean colour is a float32 mean over 64 against 400 pixels, whose rounding depends on the CPU's
    # vector width (4e-6 apart on one 2-core machine): equal to float32 summation error, not bit for bit.
    np.testing.assert_allclose(key(drawn("rectangle", at=(3, 3), scale=8)),
                               key(drawn("rectangle", at=(5, 11), scale=20)), atol=2e-5)
    cosine = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    same_shape_other_place = cosine(circle, key(drawn("circle", at=(10, 6), scale=14)))
    other_shape = cosine(circle, key(drawn("triangle", at=(2, 2), scale=16)))
    other_colour = cosine(circle, key(drawn("circle", colour=(0.1, 0.2, 0.9), at=(2, 2), scale=16)))
    assert same_shape_other_place > max(other_shape, other_colour)
    # The mean foreground colour, to float32 summation error (as above).
    np.testing.assert_allclose(key(drawn("circle", at=(2, 2), scale=16))[-3:], (0.9, 0.1, 0.1), atol=2e-5)
    blank = np.full((1, 32, 32, 3), 0.5, np.float32)
    assert not np.asarray(silhouette.silhouette_features(blank)).any()  # nothing drawn: a zero key


def test_shapes_must_be_batched_images():
    with pytest.raises(ValueError, match="expected \\[batch, height, width, channels\\]"):
        silhouette.silhouette_features(np.zeros((32, 32, 3)))


def test_model_keys_and_queries_are_the_unit_silhouette_of_the_denormalised_pixels():
    cfg = model_lib.TinyAlignConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2, use_head=False),
        lm=DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2),
        connector=ConnectorConfig("mlp2x_gelu", 16, 32), retrieval_connector=ConnectorConfig("linear", 32, 32),
        query=QueryConfig(key_encoder="silhouette"), k=2, value_length=2, max_length=40)
    assert cfg.key_dim == silhouette.feature_dim()
    params = model_lib.init(cfg, jax.random.PRNGKey(0))
    images = np.stack([drawn("circle"), drawn("triangle", colour=(0.2, 0.6, 0.1))])
    ids = np.full((2, 12), 5, np.int32)
    batch = dict(pixels=(images - 0.5) / 0.5, input_ids=ids, labels=np.full((2, 12), -100, np.int32),
                 attention_mask=np.ones((2, 12), np.int32), value_tokens=np.zeros((2, 2), np.int32))
    keys, _ = jax.jit(model_lib.make_bank_encoder(cfg))(params, None, batch)
    want = np.stack([reference_features(image) for image in images])
    np.testing.assert_allclose(np.asarray(keys), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    # The bank's fingerprint tells a silhouette bank from a towers bank of the same model.
    towers = dataclasses.replace(cfg, query=QueryConfig())
    assert (memory_keys.memory_fingerprint(params, cfg, "captions")
            != memory_keys.memory_fingerprint(params, towers, "captions"))


def test_faithful_mode_refuses_the_silhouette_key():
    with pytest.raises(ValueError, match="faithful mode pools the towers"):
        QueryConfig(mode="faithful", key_encoder="silhouette")
    with pytest.raises(ValueError, match="key_encoder='pixels'"):
        QueryConfig(key_encoder="pixels")
