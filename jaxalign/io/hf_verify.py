"""Checks that jaxalign reads a Hugging Face snapshot folder exactly as `transformers` does.

Loads the folder both ways, runs both on the same deterministic input and reports the largest absolute
difference of the outputs (hidden states for vision towers, logits for LMs) and, for LMs, whether greedy
generation of 16 tokens agrees. transformers and torch are optional dependencies of jaxalign, but a check is only
a check when both sides ran: without them the jaxalign side still runs (so a broken folder is still reported), the
report has `max_abs_diff` None, `ok` False and a `problem` saying what to install, and `jaxalign hf-verify` exits
with status 3 (`NOT_COMPARED_EXIT_STATUS`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import numpy as np

from jaxalign.io import hf_folder, hf_lm, hf_vision

DEFAULT_TOLERANCE = 1e-4
GENERATED_TOKENS = 16
# `jaxalign hf-verify` exit status when nothing was compared because torch / transformers are missing
# (1 is a difference beyond tolerance, 2 an unreadable folder).
NOT_COMPARED_EXIT_STATUS = 3
# The CPU build of torch first: asked for later (through transformers) pip would pull a multi-GB CUDA build.
INSTALL_HINT = "pip install torch==2.13.0 (the CPU build, first), then pip install transformers"


@dataclasses.dataclass
class VerifyReport:
    """One line of `jaxalign hf-verify` output."""

    path: str
    model_type: str
    kind: str                       # 'vision' or 'lm'
    max_abs_diff: float | None      # None when torch / transformers are not installed (nothing was compared)
    tolerance: float
    generation_agrees: bool | None  # LMs only
    reference: str                  # 'transformers <version>' or 'unavailable'
    ok: bool                        # False whenever nothing was compared
    problem: str | None = None      # why nothing was compared, and what to install

    @property
    def compared(self) -> bool:
        """Whether transformers ran, so that `max_abs_diff` measures something."""
        return self.max_abs_diff is not None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _transformers_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def _missing_reference() -> str:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    return (f"{' and '.join(missing) or 'torch / transformers'} not installed, so only jaxalign loaded the folder "
            f"and nothing was compared; install them ({INSTALL_HINT}) and run again")


def _not_compared(path: str, model_type: str, kind: str, tolerance: float) -> VerifyReport:
    return VerifyReport(path, model_type, kind, None, tolerance, None, "unavailable", False, _missing_reference())


def _deterministic_pixels(batch: int, size: int, channels: int) -> np.ndarray:
    """[B, H, W, C] float32 in [-1, 1]: smooth patterns, the same on every machine."""
    grid = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images = [np.stack([np.sin(3 * (b + 1) * xx + c) * np.cos(2 * yy - c) for c in range(channels)], -1)
              for b in range(batch)]
    return np.stack(images).astype(np.float32)


def _deterministic_ids(batch: int, length: int, vocab_size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(3, max(vocab_size, 4), size=(batch, length)).astype(np.int32)


def verify_vision(path: str, tolerance: float) -> VerifyReport:
    from jaxalign.models import vit

    hf_config = hf_folder.read_config(path)
    cfg, params = hf_vision.load(path)
    pixels = _deterministic_pixels(2, cfg.image_size, cfg.num_channels)
    ours = np.asarray(vit.encode(params, cfg, pixels).hidden_states, np.float32)
    if not _transformers_available():
        return _not_compared(path, hf_config["model_type"], "vision", tolerance)
    import torch
    import transformers

    model_class = (transformers.SiglipVisionModel if cfg.variant == "siglip" else transformers.CLIPVisionModel)
    model = model_class.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    diff = float(np.max(np.abs(ours - theirs)))
    return VerifyReport(path, hf_config["model_type"], "vision", diff, tolerance, None,
                        f"transformers {transformers.__version__}", diff <= tolerance)


def verify_lm(path: str, tolerance: float) -> VerifyReport:
    from jaxalign.models import decoder, generate

    hf_config = hf_folder.read_config(path)
    cfg, params = hf_lm.load(path)
    ids = _deterministic_ids(2, 12, cfg.vocab_size)
    mask = np.ones_like(ids)
    ours = np.asarray(decoder.forward(params, cfg, input_ids=ids, attention_mask=mask).logits, np.float32)
    our_tokens = np.asarray(generate.generate(params, cfg, input_ids=ids, attention_mask=mask,
                                              max_new_tokens=GENERATED_TOKENS, eos_id=None).tokens)
    if not _transformers_available():
        return _not_compared(path, hf_config["model_type"], "lm", tolerance)
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch_ids = torch.from_numpy(ids.astype(np.int64))
        theirs = model(input_ids=torch_ids, attention_mask=torch.from_numpy(mask)).logits.numpy()
        # No EOS stop on either side: both generate exactly 16 tokens.
        generated = model.generate(torch_ids, attention_mask=torch.from_numpy(mask), do_sample=False,
                                   max_new_tokens=GENERATED_TOKENS, min_new_tokens=GENERATED_TOKENS,
                                   eos_token_id=None, pad_token_id=0)
    their_tokens = generated[:, ids.shape[1]:].numpy()
    diff = float(np.max(np.abs(ours - theirs)))
    agrees = bool(np.array_equal(our_tokens, their_tokens))
    return VerifyReport(path, hf_config["model_type"], "lm", diff, tolerance, agrees,
                        f"transformers {transformers.__version__}", diff <= tolerance and agrees)


def verify(path: str, tolerance: float = DEFAULT_TOLERANCE) -> VerifyReport:
    """Loads `path` with jaxalign and with transformers and compares the two.

    Without torch / transformers only jaxalign loads and runs the folder; the report then has `max_abs_diff`
    None, `ok` False and `problem` set (`compared` is False).
    """
    model_type = hf_folder.read_config(path).get("model_type")
    if model_type in hf_vision.MODEL_TYPES:
        return verify_vision(path, tolerance)
    if model_type in hf_lm.MODEL_TYPES:
        return verify_lm(path, tolerance)
    raise hf_folder.CheckpointFormatError(
        f"{path}/config.json: model_type {model_type!r} is not supported; supported vision towers: "
        f"{list(hf_vision.MODEL_TYPES)}, language models: {list(hf_lm.MODEL_TYPES)}")
