"""The sections shared by the CLUTRR teacher and distillation configs (no get_config: not a run config).

A training spec is 'file.csv' or 'archive.zip:member.csv'; test specs are CSV files, zips or folders (every
`*_test.csv` in them).
"""
from __future__ import annotations

import os
import zipfile

from jaxalign.configs.base import ConfigDict


def _train_member(zip_path: str) -> str:
    """The `*_train.csv` member of a released zip ('1.2,1.3_train.csv'), or '' when the zip is absent."""
    if not os.path.exists(zip_path):
        return ""
    with zipfile.ZipFile(zip_path) as archive:
        names = [os.path.basename(info.filename) for info in archive.infolist()
                 if info.filename.endswith("_train.csv")]
    return names[0] if names else ""


def data_config(arg: ConfigDict) -> ConfigDict:
    """Data files and static shape budgets; released `arg.dataset` under `arg.data_root` unless quick."""
    data = ConfigDict()
    zip_path = os.path.join(arg.data_root, f"{arg.dataset}.zip")
    member = _train_member(zip_path)
    data.train = f"{zip_path}:{member}" if member else zip_path
    data.test = (zip_path,)
    data.max_nodes = 16          # released graphs reach 11 nodes at k = 10 (plus noise people)
    data.max_edges = 16
    data.entity_slots = 20
    data.train_max_length = 64 if arg.quick else 96      # 99th percentile of k = 2, 3 stories: 79 tokens
    data.eval_max_length = 128 if arg.quick else 256     # longest released test story (k = 10): 229 tokens
    return data


def optimisation_and_loop(config: ConfigDict, quick: bool) -> None:
    """Sets the optimiser and training-loop fields that both CLUTRR trainers share (steps are set per config)."""
    config.batch_size = 32 if quick else 64
    config.lr = 3e-3
    config.warmup_ratio = 0.05
    config.weight_decay = 1e-4
    config.clip_norm = 1.0
    config.eval_batch_size = 128

    config.train = ConfigDict()
    config.train.accum_steps = 1
    config.train.log_every = 25
    config.train.checkpoint_every = 1000
    config.train.keep = 2
    config.train.async_checkpoints = True
    config.train.progress = False
