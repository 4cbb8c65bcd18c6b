"""The LM of a trained TinyAlign run as a Hugging Face folder: `export_run_lm(workdir, dest) -> summary`
(`jaxalign hf-export --workdir RUN DEST`).

The LM is the run's base LM (its Hugging Face folder, or the tiny random LM of its seed) with the run's latest
checkpoint written over it: the trained LM of a stage-2 run, or for a LoRA run the frozen base with the trained
adapters merged into its kernels (`jaxalign.train.lora.merge`), so the folder computes what the run computed and
needs no adapter code to load. The folder holds `config.json` and `model.safetensors` (float32, `hf_lm.export`)
and the run's tokenizer files. Connectors and the memory bank are not part of an LM folder; they stay in the run.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import jax
from etils import epath

from jaxalign.configs.base import load_resolved_config
from jaxalign.io import hf_lm
from jaxalign.models import decoder
from jaxalign.programs import tinyalign_lora
from jaxalign.programs import tinyalign_setup as setup

# Files of a Hugging Face LM folder that describe its tokenizer and generation; copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json")


def run_lm(workdir: str, overrides: Sequence[str] = ()) -> tuple[decoder.DecoderConfig, dict, dict]:
    """(LM cfg, LM params as the run's latest checkpoint leaves them, info) of a trained run; LoRA adapters merged.

    info: {'restored': names of the LM / adapter params read from the checkpoint, 'lora': targets or None}.

    Raises:
      FileNotFoundError: `workdir` holds no config.json, tokenizer (random towers) or checkpoint.
    """
    config = load_resolved_config(workdir, overrides)
    if config.model.source == "random" and not (epath.Path(workdir) / "tokenizer" / "tokenizer.json").exists():
        raise FileNotFoundError(f"{os.fspath(workdir)}/tokenizer/tokenizer.json does not exist: the run's word-level "
                                "tokenizer is written when it starts training")
    tokenizer = setup.load_tokenizer(config, workdir, sources={})
    lm_cfg, lm_params = setup.load_lm(config, tokenizer)
    params, axes = {"lm": lm_params}, {"lm": decoder.logical_axes(lm_cfg)}
    lora = tinyalign_lora.lora_config(config)
    if lora is not None:
        params, axes = tinyalign_lora.add_adapters(params, axes, lora, jax.random.PRNGKey(0))
    saved = setup.read_checkpoint_params(workdir)
    params, restored = setup.overwrite_params(params, saved, workdir)
    if lora is not None and not any(name.startswith(f"{tinyalign_lora.PART}/") for name in restored):
        raise ValueError(f"{os.fspath(workdir)}: the config names LoRA targets {list(lora.targets)} but the latest "
                         "checkpoint holds no adapters")
    merged = tinyalign_lora.model_params(params, lora)
    return lm_cfg, merged["lm"], {"restored": restored, "lora": None if lora is None else list(lora.targets)}


def export_run_lm(workdir: str, dest: str, overrides: Sequence[str] = ()) -> dict:
    """Writes the run's LM (`run_lm`) to `dest` as a Hugging Face folder with the run's tokenizer; returns a summary
    {'workdir', 'dest', 'model_type', 'lora', 'restored_params'}."""
    config = load_resolved_config(workdir, overrides)
    lm_cfg, lm_params, info = run_lm(workdir, overrides)
    hf_lm.export(dest, lm_cfg, lm_params)
    if config.model.source == "hf":
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(config.model.lm_folder, name)):
                shutil.copyfile(os.path.join(config.model.lm_folder, name), os.path.join(dest, name))
    else:
        from jaxalign.data.tokenizer import Tokenizer

        Tokenizer.from_folder(os.fspath(epath.Path(workdir) / "tokenizer")).save_folder(dest)
    return {"workdir": os.fspath(workdir), "dest": dest, "model_type": hf_lm.config_to_hf(lm_cfg)["model_type"],
            "lora": info["lora"], "restored_params": len(info["restored"])}
