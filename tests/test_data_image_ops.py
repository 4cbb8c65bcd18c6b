"""Specification of jaxalign.data.image_ops: decoding, padding to a square, resizing and normalisation."""
import io

import numpy as np
import pytest
from PIL import Image

from jaxalign.data.image_ops import (
    CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ImageError, decode_image, pad_to_square, preprocess_image)


def encoded(array, mode=None, image_format="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8), mode).save(buffer, format=image_format)
    return buffer.getvalue()


def test_constant_image_normalises_to_known_values_for_siglip_and_clip():
    data = encoded(np.full((5, 7, 3), (255, 0, 51)))
    siglip = preprocess_image(data, 4, SIGLIP_MEAN, SIGLIP_STD)
    assert siglip.shape == (4, 4, 3) and siglip.dtype == np.float32
    np.testing.assert_allclose(siglip, np.broadcast_to([1.0, -1.0, 0.2 / 0.5 - 1.0], (4, 4, 3)), atol=1e-6)
    clip = preprocess_image(data, 4, CLIP_MEAN, CLIP_STD)
    expected = [(1.0 - 0.48145466) / 0.26862954, (0.0 - 0.4578275) / 0.26130258, (0.2 - 0.40821073) / 0.27577711]
    np.testing.assert_allclose(clip[2, 3], expected, rtol=1e-5)


def test_resize_is_bicubic():
    array = np.random.default_rng(0).integers(0, 256, (9, 13, 3))
    got = preprocess_image(encoded(array), 6, SIGLIP_MEAN, SIGLIP_STD)
    reference = np.asarray(Image.fromarray(array.astype(np.uint8)).resize((6, 6), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(got, reference / 127.5 - 1.0, atol=1e-6)


def test_pad_to_square_centres_the_image_on_the_mean_colour():
    wide = Image.fromarray(np.full((2, 6, 3), 200, np.uint8))
    square = np.asarray(pad_to_square(wide, CLIP_MEAN))
    assert square.shape == (6, 6, 3)
    np.testing.assert_array_equal(square[0, 0], [int(v * 255) for v in CLIP_MEAN])  # (122, 116, 104)
    assert (square[2:4] == 200).all() and (square[:2] != 200).all() and (square[4:] != 200).all()
    padded = preprocess_image(encoded(np.full((2, 6, 3), 255)), 6, SIGLIP_MEAN, SIGLIP_STD, pad=True)
    np.testing.assert_allclose(padded[3, 3], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(padded[0, 0], [127 / 127.5 - 1.0] * 3, atol=1e-6)  # int(0.5 * 255) = 127


def test_grey_and_transparent_images_become_rgb():
    grey = decode_image(encoded(np.full((3, 3), 90), mode="L"))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [90, 90, 90]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest transparent -> white
    image = np.asarray(decode_image(encoded(rgba, mode="RGBA")))
    assert image[0, 0].tolist() == [255, 0, 0] and image[1, 1].tolist() == [255, 255, 255]


def test_jpeg_decodes():
    image = preprocess_image(encoded(np.full((8, 8, 3), 128), image_format="JPEG"), 8, SIGLIP_MEAN, SIGLIP_STD)
    np.testing.assert_allclose(image, 128 / 127.5 - 1.0, atol=0.02)


NOISE = np.random.default_rng(1).integers(0, 256, (32, 32, 3))


@pytest.mark.parametrize("data", [b"", b"definitely not an image", encoded(NOISE)[:1000],
                                  encoded(NOISE, image_format="JPEG")[:500]], ids=["empty", "text", "png", "jpeg"])
def test_corrupt_image_is_a_clear_error_naming_the_sample(data):
    with pytest.raises(ImageError, match="sample 'coco/123.jpg': image cannot be decoded") as error:
        preprocess_image(data, 4, SIGLIP_MEAN, SIGLIP_STD, sample_id="coco/123.jpg")
    assert error.value.reason == "corrupt_image"
