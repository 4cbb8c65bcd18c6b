"""The sections shared by the CLUTRR teacher and distillation configs (no get_config: not a run config).

A training spec is 'file.csv' or 'archive.zip:member.csv'; test specs are CSV files, zips or folders (every
`*_test.csv` in them). The released zip is looked for at config time (`data_root` relative to the working
directory, stored resolved to an absolute path). A missing one is not an error here, since `--config.data.train`
/ `.test` overrides may name other files; reading a missing file is (`missing_data_message`: the path and the
ways to point at data). An empty `data_root` (`:data_root=`) means no released data at all.

`data.prepared_dir` (default empty) names a data set written beforehand by `jaxalign prepare-data clutrr` (the
version folder it prints, OUT/jaxalign_clutrr/<name>/<version>, with the override to pass): the run then reads its
rows from there (tfds array_record, no TensorFlow, no download) instead of parsing CSVs, its 'train' split for
training and its test splits for testing, and `data.train` / `data.test` are not read. The rows and their order
are those of the CSV files, so a run gives the same numbers either way.
"""
from __future__ import annotations

import os
import zipfile

from jaxalign.configs.base import ConfigDict


def _train_member(zip_path: str) -> str:
    """The `*_train.csv` member of a released zip ('1.2,1.3_train.csv'), or '' when it has none."""
    with zipfile.ZipFile(zip_path) as archive:
        names = [os.path.basename(info.filename) for info in archive.infolist()
                 if info.filename.endswith("_train.csv")]
    return names[0] if names else ""


def missing_data_message(path: str) -> str:
    """The error for a CLUTRR data file or zip that does not exist: what is missing and how to point at data."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        missing = f"{path} does not exist, nor does its folder"
    else:
        found = sorted(name for name in os.listdir(folder) if name.endswith((".zip", ".csv")))
        missing = f"{path} does not exist (its folder holds {found[:12] or 'no zip or csv files'})"
    return (f"CLUTRR data not found: {missing}. The configs default to the released zips under "
            f"../shared/data/clutrr, relative to the working directory ({os.getcwd()}). "
            "Point at the released zips with the config arguments, e.g. "
            "--config <config file>:data_root=/path/to/clutrr,dataset=data_089907f8; or generate data with "
            "`jaxalign clutrr generate --out-dir DIR` and name its files instead of a released set: "
            "--config <config file>:data_root= --config.data.train=DIR/1.2,1.3_train.csv "
            "--config.data.test=\"('DIR',)\".")


def _released_files(arg: ConfigDict) -> tuple[str, tuple[str, ...]]:
    """(train spec, test specs) of the released `arg.dataset` under `arg.data_root`; ('', ()) without a root."""
    if not arg.data_root:          # the run names its files with --config.data.train / --config.data.test
        return "", ()
    zip_path = os.path.abspath(os.path.join(arg.data_root, f"{arg.dataset}.zip"))
    if not os.path.exists(zip_path):   # overrides may name other files; reading this one says what is missing
        return zip_path, (zip_path,)
    member = _train_member(zip_path)
    if not member:
        raise ValueError(f"{zip_path} holds no *_train.csv file, so it is not a released CLUTRR training set; "
                         "name the training file with --config.data.train=FILE.csv")
    return f"{zip_path}:{member}", (zip_path,)


def data_config(arg: ConfigDict) -> ConfigDict:
    """Data files and static shape budgets: the released `arg.dataset` under `arg.data_root` (see above)."""
    data = ConfigDict()
    data.train, data.test = _released_files(arg)
    data.prepared_dir = ""       # a `prepare-data clutrr` data set to read instead of data.train / data.test
    data.max_nodes = 16          # released graphs reach 11 nodes at k = 10 (plus noise people)
    data.max_edges = 16
    data.entity_slots = 20
    data.train_max_length = 64 if arg.quick else 96      # 99th percentile of k = 2, 3 stories: 79 tokens
    data.eval_max_length = 128 if arg.quick else 256     # longest released test story (k = 10): 229 tokens
    # Validation (model selection and early stopping, see train.eval_every / train.patience): `valid` names a
    # file of validation rows, or `valid_fraction` of the training rows is held out by a permutation seeded
    # with `valid_seed` (not the run's seed: every seed of a study, and a teacher and its students, hold out
    # the same rows). Both off: no validation, the final model is the last step's.
    data.valid = ""
    data.valid_fraction = 0.0
    data.valid_seed = 0
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
