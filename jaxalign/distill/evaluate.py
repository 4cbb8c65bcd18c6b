"""Saved CLUTRR models and their accuracy per test file, noise task and path length k.

A trainer (`jaxalign.programs.clutrr_trainer`) ends by writing its model to `<workdir>/model/`:

  model.json   {"role": "teacher" | "student", "kind": the model kind ('gat', 'bilstm', 'bert', ...),
                "model_config": {...}, "labels": vocabulary, "edge_types": vocabulary (teacher),
                "words": vocabulary (word-level student), "max_length": ..., and for a BERT-family student
                "tokenizer": "tokenizer" (its folder) and "entity_slots"}
  params.npz   the model's parameters, one array per '/'-joined path (teacher and heads are not part of a
               student's file: only the student is used at test time)
  tokenizer/   a BERT-family student's WordPiece tokenizer (tokenizer.json and its special-token files), so the
               folder is complete without the pretrained snapshot it was fine-tuned from

Students are of two families: word-level (`jaxalign.models.text_encoders`: BiLSTM, transformer; featurised by
`clutrr_batches.text_batch` with the saved word vocabulary) and BERT-family (`jaxalign.distill.bert_student`:
kinds 'bert' and 'bert_lstm'; featurised by `bert_student.featurise` with the saved WordPiece tokenizer).

`load_model` reads that folder back (or a run's workdir holding one) and `evaluate_rows` runs it on any rows in
the released CSV format. Rows whose answer is not one of the model's labels cannot be predicted correctly: they
are counted as wrong and reported (`unknown_labels`), never dropped. Stories longer than the evaluation token
budget are truncated and counted (`truncated`).

In a multi-process run (`launch/`) `evaluate_rows` and `evaluate_files` are collective: every process must call
them; each predicts its contiguous block of the batches and the per-row results are summed over processes, so
every process returns the same report.

Public API:
  UNLABELLED_EDGE: the edge type of noise edges a file does not label (the released data labels only the path)
  graph_rows(rows) -> rows whose every story edge has a type (its label, or UNLABELLED_EDGE for unlabelled noise)
  without_noise_labels(rows) -> graph rows whose noise edges are all typed UNLABELLED_EDGE
  SavedModel(role, config, params, labels, edge_types, words, max_length, tokenizer, entity_slots); .kind
  model_kind(config) -> 'gat' | 'bilstm' | 'transformer' | 'bert' | 'bert_lstm' | ...
  save_model(directory, model) / load_model(path) -> SavedModel
  predict(model, rows, batch_size=64, max_length=None, batches=None) -> (predictions [N] int, report dict)
  accuracy_report(rows, predictions, labels) -> {"rows", "correct", "accuracy", "per_task", "per_k", ...}
  evaluate_rows(model, rows, batch_size=64) -> accuracy report with truncation / unknown-label counts
  noise_label_report(teacher, rows) -> {'rows_noise_labelled', 'accuracy_noise_unlabelled' (None: no labelled noise)}
  evaluate_files(model, files: {name: rows}) -> {name: report} (a teacher's with noise_label_report's keys)
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath

from jaxalign import distributed
from jaxalign.clutrr.reader import ClutrrRow
from jaxalign.data.wordpiece import WordPieceTokenizer
from jaxalign.distill import bert_student, clutrr_batches
from jaxalign.models import bert, gnn, text_encoders

UNLABELLED_EDGE = "unlabelled"
MODEL_FILE, PARAMS_FILE, TOKENIZER_FOLDER = "model.json", "params.npz", "tokenizer"
BERT_KINDS = ("bert", "bert_lstm")


def graph_rows(rows: Sequence[ClutrrRow]) -> list[ClutrrRow]:
    """Rows with one edge type per story edge (`edge_types` as long as `story_edges`), for the teacher.

    Path edges keep their labels. Noise edges get their relation's label when the file labels them (files of
    the reference generator: `ClutrrRow.noise_edge_types`) and the dedicated `UNLABELLED_EDGE` type otherwise
    (the released CSVs label only the k path edges), so that noise changes the teacher's graph as it changes
    the students' stories. Rows already passed through `graph_rows` come back unchanged.
    """
    fixed = []
    for row in rows:
        noise_types = tuple(row.noise_edge_types)
        if len(noise_types) != len(row.noise_edges):
            noise_types = (UNLABELLED_EDGE,) * len(row.noise_edges)
        edge_types = tuple(row.edge_types[:row.k]) + noise_types
        fixed.append(row if edge_types == tuple(row.edge_types) else dataclasses.replace(row, edge_types=edge_types))
    return fixed


def without_noise_labels(rows: Sequence[ClutrrRow]) -> list[ClutrrRow]:
    """Graph rows whose noise edges are all typed `UNLABELLED_EDGE`, as if their file did not label them.

    Compares the teacher with and without noise labels on the same rows: `evaluate_rows(model, rows)` against
    `evaluate_rows(model, without_noise_labels(rows))`. Path labels are kept.
    """
    return graph_rows([dataclasses.replace(row, edge_types=tuple(row.edge_types[:row.k]), noise_edge_types=())
                       for row in rows])


def teacher_edge_vocabulary() -> clutrr_batches.Vocabulary:
    """The 22 gendered relations (path edges, and noise edges a file labels) plus `UNLABELLED_EDGE`."""
    return clutrr_batches.edge_type_vocabulary(clutrr_batches.EDGE_TYPE_LABELS + (UNLABELLED_EDGE,))


# ------------------------------------------------------------------------------------------ model files


@dataclasses.dataclass
class SavedModel:
    """A trained teacher or student with what is needed to featurise rows for it.

    Attributes:
      role: 'teacher' (GNN over graphs) or 'student' (text encoder over anonymised stories).
      config: `gnn.GNNConfig`, `text_encoders.TextEncoderConfig` or `bert_student.BertStudentConfig`.
      params: the model's parameter pytree.
      labels: answer classes.
      edge_types: edge vocabulary (teacher only).
      words: word vocabulary (word-level student only).
      max_length: token budget used at evaluation (student only).
      tokenizer: WordPiece tokenizer (BERT-family student only).
      entity_slots: anonymisation slots, each written as a `[unusedK]` token (BERT-family student only).
    """

    role: str
    config: Any
    params: Any
    labels: clutrr_batches.Vocabulary
    edge_types: clutrr_batches.Vocabulary | None = None
    words: clutrr_batches.Vocabulary | None = None
    max_length: int | None = None
    tokenizer: WordPieceTokenizer | None = None
    entity_slots: int | None = None

    @property
    def kind(self) -> str:
        """The model kind: the GNN's or word student's `config.kind`, or 'bert' / 'bert_lstm'."""
        return model_kind(self.config)


def model_kind(config: Any) -> str:
    """'bert' / 'bert_lstm' for a `BertStudentConfig`, else the config's own `kind`."""
    if isinstance(config, bert_student.BertStudentConfig):
        return "bert_lstm" if config.use_lstm else "bert"
    return config.kind


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = np.asarray(jax.device_get(value))
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save_model(directory: str, model: SavedModel) -> str:
    """Writes `model.json` and `params.npz` into `directory` (created; a local folder or a gs:// URI, through
    epath); returns the directory."""
    folder = epath.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    description = {"role": model.role, "kind": model.kind, "model_config": dataclasses.asdict(model.config),
                   "labels": model.labels.to_json(), "max_length": model.max_length,
                   "edge_types": model.edge_types.to_json() if model.edge_types else None,
                   "words": model.words.to_json() if model.words else None}
    if model.kind in BERT_KINDS:
        if model.tokenizer is None or model.entity_slots is None:
            raise ValueError("a BERT-family student is saved with its WordPiece tokenizer and entity_slots; "
                             "SavedModel.tokenizer / entity_slots are missing")
        model.tokenizer.save_folder(folder / TOKENIZER_FOLDER)
        description.update(tokenizer=TOKENIZER_FOLDER, entity_slots=model.entity_slots)
    with (folder / PARAMS_FILE).open("wb") as stream:
        np.savez(stream, **_flatten(model.params))
    (folder / MODEL_FILE).write_text(json.dumps(description, indent=1), encoding="utf-8")
    return directory


def load_model(path: str) -> SavedModel:
    """Reads a model folder written by `save_model`, or a training workdir holding one in `model/`."""
    directory = epath.Path(path)
    if not (directory / MODEL_FILE).exists() and (directory / "model" / MODEL_FILE).exists():
        directory = directory / "model"
    model_file = directory / MODEL_FILE
    if not model_file.exists():
        raise FileNotFoundError(f"{path} holds no {MODEL_FILE} (nor model/{MODEL_FILE}); pass the workdir of a "
                                "finished `jaxalign clutrr train-teacher` / `distill` run or its model/ folder")
    description = json.loads(model_file.read_text(encoding="utf-8"))
    role, kind = description.get("role"), description.get("kind")
    tokenizer = None
    if role == "teacher":
        config = gnn.GNNConfig(**description["model_config"])
    elif role == "student" and kind in BERT_KINDS:
        fields = dict(description["model_config"])
        config = bert_student.BertStudentConfig(bert=bert.BertConfig(**fields.pop("bert")), **fields)
        tokenizer_folder = directory / description.get("tokenizer", TOKENIZER_FOLDER)
        if not (tokenizer_folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{model_file}: a {kind} student needs its WordPiece tokenizer in "
                                    f"{tokenizer_folder}/tokenizer.json, which is missing; copy the model/ folder "
                                    "whole")
        tokenizer = WordPieceTokenizer.from_folder(tokenizer_folder)
    elif role == "student":
        config = text_encoders.TextEncoderConfig(**description["model_config"])
    else:
        raise ValueError(f"{model_file}: role must be 'teacher' or 'student', found {role!r}")
    with (directory / PARAMS_FILE).open("rb") as stream, np.load(stream) as arrays:
        params = _unflatten({name: arrays[name] for name in arrays.files})
    vocabulary = lambda key, kind: (clutrr_batches.Vocabulary.from_json(description[key], kind)  # noqa: E731
                                    if description.get(key) else None)
    return SavedModel(role, config, params, vocabulary("labels", "labels"), vocabulary("edge_types", "edge_types"),
                      vocabulary("words", "words"), description.get("max_length"), tokenizer,
                      description.get("entity_slots"))


# ---------------------------------------------------------------------------------------------- predict


def _known_label_rows(rows: Sequence[ClutrrRow], labels: clutrr_batches.Vocabulary) -> tuple[list, np.ndarray]:
    """Rows whose target is a known label; an unknown target is replaced by labels[0] and flagged."""
    known = np.array([row.target in labels for row in rows], bool)
    fixed = [row if ok else dataclasses.replace(row, target=labels.tokens[0]) for row, ok in zip(rows, known)]
    return fixed, known


def make_predict_fn(model: SavedModel):
    """Jitted `(params, batch) -> predicted class ids [B]` for the model's role."""
    if model.role == "teacher":
        return jax.jit(lambda params, batch: gnn.apply(params, batch, model.config).logits.argmax(-1))
    if model.kind in BERT_KINDS:
        return jax.jit(lambda params, batch: bert_student.apply(params, batch, model.config).logits.argmax(-1))
    return jax.jit(lambda params, batch: text_encoders.apply(params, batch, model.config).logits.argmax(-1))


def featurise(model: SavedModel, rows: Sequence[ClutrrRow], batch_size: int, max_length: int,
              report: clutrr_batches.TextReport, seed: int = 0) -> dict[str, np.ndarray]:
    """One padded model input batch of `rows` (at most batch_size of them)."""
    if model.role == "teacher":
        return clutrr_batches.graph_batch(graph_rows(rows), model.labels, model.edge_types, model.config.max_nodes,
                                          model.config.max_edges, batch_size=batch_size)
    if model.kind in BERT_KINDS:
        return bert_student.featurise(rows, model.tokenizer, max_length, seed, labels=model.labels,
                                      num_slots=model.entity_slots, report=report, batch_size=batch_size)
    return clutrr_batches.text_batch(rows, model.words, model.labels, max_length, seed, report=report,
                                     batch_size=batch_size)


def predict(model: SavedModel, rows: Sequence[ClutrrRow], batch_size: int = 64, max_length: int | None = None,
            predict_fn=None, params=None, batches: range | None = None) -> tuple[np.ndarray, dict]:
    """Predicted class ids [N] for `rows`, and a report {'truncated', 'query_mentions_lost', 'unknown_labels'}.

    Students read stories anonymised with a fixed seed per batch (deterministic) and truncated to `max_length`
    tokens (default: the model's evaluation budget; a transformer or BERT never beyond its position table). `batches`
    (default all) predicts only those batches of `batch_size` rows; the other rows get -1 and are not counted in
    the report's truncation counts.
    """
    rows, known = _known_label_rows(rows, model.labels)
    if max_length is None:
        max_length = model.max_length or getattr(model.config, "max_length", 256)
    if model.role == "student" and model.kind == "transformer":
        max_length = min(max_length, model.config.max_length)
    elif model.role == "student" and model.kind in BERT_KINDS:
        max_length = min(max_length, model.config.bert.max_positions)
    predict_fn = predict_fn or make_predict_fn(model)
    params = model.params if params is None else params
    text_report = clutrr_batches.TextReport()
    predictions = np.full((len(rows),), -1, np.int64)
    for index in batches if batches is not None else range(-(-len(rows) // batch_size)):
        start = index * batch_size
        chunk = rows[start:start + batch_size]
        batch = featurise(model, chunk, batch_size, max_length, text_report, seed=start)
        predictions[start:start + len(chunk)] = np.asarray(predict_fn(params, batch))[:len(chunk)]
    return predictions, {"truncated": text_report.truncated, "query_mentions_lost": text_report.query_mentions_lost,
                         "unknown_labels": int((~known).sum()), "known": known}


# --------------------------------------------------------------------------------------------- accuracy


def accuracy_report(rows: Sequence[ClutrrRow], correct: np.ndarray) -> dict:
    """Accuracy overall, per noise task ('task_1'...), per k ('2'...), and per task and k ('1.2'...)."""
    groups: dict[str, dict[str, list[bool]]] = {"per_task": collections.defaultdict(list),
                                                 "per_k": collections.defaultdict(list),
                                                 "per_task_k": collections.defaultdict(list)}
    for row, ok in zip(rows, correct):
        groups["per_task"][f"task_{row.noise_task}"].append(bool(ok))
        groups["per_k"][str(row.k)].append(bool(ok))
        groups["per_task_k"][f"{row.noise_task}.{row.k}"].append(bool(ok))
    report = {"rows": len(rows), "correct": int(np.sum(correct)),
              "accuracy": float(np.mean(correct)) if len(rows) else float("nan")}
    for name, group in groups.items():
        report[name] = {key: {"rows": len(values), "accuracy": float(np.mean(values))}
                        for key, values in sorted(group.items(), key=lambda item: _sort_key(item[0]))}
    return report


def _sort_key(key: str) -> tuple:
    parts = key.replace("task_", "").split(".")
    return tuple(int(part) if part.isdigit() else 0 for part in parts)


def evaluate_rows(model: SavedModel, rows: Sequence[ClutrrRow], batch_size: int = 64, predict_fn=None,
                  params=None) -> dict:
    """Accuracy report of `model` on `rows` plus truncation and unknown-label counts.

    Collective over processes: each predicts its block of the batches (`distributed.host_slice`) and the
    per-row results and counts are summed, so every process returns the report of a one-process run.
    """
    batches = distributed.host_slice(-(-len(rows) // batch_size)) if jax.process_count() > 1 else None
    predictions, details = predict(model, rows, batch_size, predict_fn=predict_fn, params=params, batches=batches)
    labels = np.array([model.labels.id(row.target) if row.target in model.labels else -1 for row in rows])
    correct = (predictions == labels) & details["known"]    # rows another process predicts: False here
    counts = np.array([details["truncated"], details["query_mentions_lost"]], np.int64)
    if batches is not None:
        correct, counts = _sum_over_processes(correct.astype(np.int32)) > 0, _sum_over_processes(counts)
    report = accuracy_report(rows, correct)
    report.update(truncated=int(counts[0]), query_mentions_lost=int(counts[1]),
                  unknown_labels=details["unknown_labels"])
    return report


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
    """The sum over processes of an array of the same shape on each (every process must call it)."""
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values)).sum(0)


def noise_label_report(model: SavedModel, rows: Sequence[ClutrrRow], batch_size: int = 64, predict_fn=None,
                       params=None) -> dict:
    """How much a teacher owes to the noise labels of the reference generator's files.

    Returns {'rows_noise_labelled': the rows whose file labels their noise edges, 'accuracy_noise_unlabelled':
    the teacher's accuracy on all `rows` with those labels replaced by `UNLABELLED_EDGE` (as the released files
    would give them; rows without labelled noise are unchanged), comparable with `evaluate_rows(...)['accuracy']`
    on the same rows, or None when no row labels its noise (nothing to compare)}. Collective as `evaluate_rows`.
    """
    if model.role != "teacher":
        raise ValueError(f"noise labels are edge types of the teacher's graphs; this model is a {model.role}, whose "
                         "stories carry no edge types")
    labelled = sum(row.noise_labelled for row in rows)
    accuracy = (evaluate_rows(model, without_noise_labels(rows), batch_size, predict_fn, params)["accuracy"]
                if labelled else None)
    return {"rows_noise_labelled": int(labelled), "accuracy_noise_unlabelled": accuracy}


def evaluate_files(model: SavedModel, files: dict[str, Sequence[ClutrrRow]], batch_size: int = 64,
                   params=None) -> dict[str, dict]:
    """{file name: evaluate_rows report}, compiling the model's prediction function once.

    A teacher's reports also carry `noise_label_report`'s 'rows_noise_labelled' and 'accuracy_noise_unlabelled'
    (None for a file that labels no noise edge, such as the released ones).
    """
    predict_fn = make_predict_fn(model)
    reports = {}
    for name, rows in files.items():
        reports[name] = evaluate_rows(model, rows, batch_size, predict_fn, params)
        if model.role == "teacher":
            reports[name].update(noise_label_report(model, rows, batch_size, predict_fn, params))
    return reports
