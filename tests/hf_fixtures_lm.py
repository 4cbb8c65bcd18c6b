"""Tiny random Hugging Face causal LMs (Llama, Qwen2, Phi) saved as snapshot folders, built once per process.

Weights are redrawn with a larger spread than Hugging Face's initialiser (and biases and norm scales made
non-trivial) so that the parity tests exercise every parameter and greedy decoding has clear winners.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import numpy as np

VOCAB = 128
BATCH, PROMPT = 2, 8
PAD_SLOTS = 2  # padding tokens in the second row of the test batch

FAMILY_CONFIGS = {
    # Llama with GQA, llama3 rope scaling (wavelength cut-offs inside the tiny head's range), a non-default
    # base and tied embeddings.
    "llama": dict(rope_theta=5000.0, tie_word_embeddings=True,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Qwen2 with q/k/v biases, linear rope scaling and an untied head.
    "qwen2": dict(rope_theta=10000.0, tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # Phi-2 block: partial rotary over half of each head, biases everywhere.
    "phi": dict(partial_rotary_factor=0.5, tie_word_embeddings=False),
}

_ROOT = tempfile.mkdtemp(prefix="jaxalign_hf_lm_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def hf_config(family: str):
    import transformers

    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "phi": transformers.PhiConfig}[family]
    return config_class(**sizes, **FAMILY_CONFIGS[family])


def randomise_parameters(model) -> None:
    """Non-trivial values everywhere (Hugging Face initialises biases to zero and norms to one)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.15)


@functools.lru_cache(maxsize=None)
def hf_model(family: str):
    """(snapshot folder, torch model in eval mode) of a tiny random `family` LM."""
    import torch
    import transformers

    torch.manual_seed({"llama": 0, "qwen2": 1, "phi": 2}[family])
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
    randomise_parameters(model)
    model.eval()
    folder = f"{_ROOT}/{family}"
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def prompt_batch(padding: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask [BATCH, PROMPT]: row 0 is all real tokens, row 1 has PAD_SLOTS pads on `padding`'s side."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(BATCH, PROMPT)).astype(np.int32)
    mask = np.ones((BATCH, PROMPT), np.int32)
    if padding == "left":
        mask[1, :PAD_SLOTS] = 0
    else:
        mask[1, PROMPT - PAD_SLOTS:] = 0
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def default_positions(mask: np.ndarray) -> np.ndarray:
    """The positions jaxalign's decoder uses by default: running count of real tokens minus one."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(default_positions(mask), dtype=torch.long))
    return out.logits.float().numpy()
