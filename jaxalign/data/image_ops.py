"""Image preprocessing for the vision towers: PNG / JPEG bytes -> normalised float32 [height, width, 3].

What the Hugging Face image processors of the supported towers do, with PIL only:
- decode, convert to RGB (palette, grey and RGBA images included);
- optionally pad to a square with the mean colour first (LLaVA's `image_aspect_ratio='pad'`, `expand2square`
  with `tuple(int(x * 255) for x in image_mean)`), so that a wide image is not squashed;
- resize to the tower's `image_size` x `image_size` with bicubic resampling (SigLIP and CLIP both use bicubic;
  CLIP's processor resizes the short side and centre-crops, which for the square inputs produced by 'pad' is the
  same thing);
- scale to [0, 1] and normalise per channel: `(x - mean) / std`.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as in its preprocessor_config.json
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALISATION = {"siglip": (SIGLIP_MEAN, SIGLIP_STD), "clip": (CLIP_MEAN, CLIP_STD)}


class ImageError(ValueError):
    """An image cannot be decoded. Attributes: sample_id (named in the message), reason ('corrupt_image')."""

    def __init__(self, sample_id: Any, detail: str):
        self.sample_id = sample_id
        self.reason = "corrupt_image"
        self.detail = detail
        super().__init__(f"sample {sample_id!r}: image cannot be decoded: {detail}")


def decode_image(data: bytes, sample_id: Any = None) -> Image.Image:
    """The RGB PIL image of PNG / JPEG / ... bytes.

    Raises:
        ImageError: the bytes are empty, truncated or not an image (the message names `sample_id`).
    """
    if not data:
        raise ImageError(sample_id, "no image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # PIL decodes lazily; force it here so that a truncated file fails now, with the sample id
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(sample_id, f"{type(error).__name__}: {error}") from error
    if image.mode != "RGB":
        # Transparent pixels of RGBA / LA / palette images become white, as when a browser shows them.
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    return image


def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """The image centred on a square canvas of its longer side, filled with the mean colour (LLaVA's 'pad')."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    fill = tuple(int(value * 255) for value in mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., 3] -> float32 `(pixels / 255 - mean) / std`."""
    mean_array = np.asarray(mean, np.float32)
    std_array = np.asarray(std, np.float32)
    return ((pixels.astype(np.float32) / 255.0 - mean_array) / std_array).astype(np.float32)


def preprocess_image(
    data: bytes,
    image_size: int,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
    *,
    pad: bool = False,
    sample_id: Any = None,
) -> np.ndarray:
    """Image bytes -> float32 [image_size, image_size, 3], ready for the vision tower.

    Args:
        data: encoded image (PNG, JPEG, ...).
        image_size: the tower's input resolution.
        mean, std: per-channel normalisation of the tower (`SIGLIP_*` or `CLIP_*`).
        pad: pad to a square with the mean colour before resizing (LLaVA's 'pad' aspect mode).
        sample_id: named in the error of a corrupt image.

    Raises:
        ImageError: the bytes cannot be decoded.
    """
    image = decode_image(data, sample_id)
    if pad:
        image = pad_to_square(image, mean)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return normalise(np.asarray(image), mean, std)


def blank_image(image_size: int) -> np.ndarray:
    """float32 zeros [image_size, image_size, 3]: the pixels of a text-only sample (never attended to)."""
    return np.zeros((image_size, image_size, 3), np.float32)
