"""Retrieval diagnostics of a TinyAlign run: do the values its queries retrieve carry the answer?

Measured on the run's own model, bank and data (the functions are `jaxalign.align.retrieval_diagnostics`):

  * `test`: test queries searching the bank as at evaluation (nothing excluded), the values the LM is given
    (after the run's control: `value_ids`);
  * `train`: training queries searching with the run's leave-one-out (`retrieval.leave_out`: their own entry, or
    every entry of their group), as in a training step;
  * `key_ceiling`: the bank's keys searched with themselves, excluding each row's own image: no query built by the
    same encoder can do better on average, so it is the ceiling of a bank keyed on it.

Each is a `retrieval_precision` result: the share of retrieved values agreeing with the query's answer (and, for
easy-vqa, with the image's colour and shape), per question type and rank, beside the chance level.

Several processes: each process measures its own rows; the retrieved ids and sample indices are gathered, so
every process returns the same numbers.

Public API:
  RetrievalProbe(run) -> probe;  probe(params, max_batches, train_batches) -> {'test', 'train', 'key_ceiling'}
  source_attributes(source, indexes, kind) -> {field: [n]} (easy-vqa: answer, color, shape, question_type,
    image_id; LLaVA-format: answer)
  headline(results) -> {'retrieval/test/answer': p@k, ...} floats for metrics logs
"""
from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import jax
import numpy as np

from jaxalign import sharding
from jaxalign.align import memory_keys
from jaxalign.align import model as model_lib
from jaxalign.align import retrieval_diagnostics as diagnostics
from jaxalign.data import pipeline
from jaxalign.programs import training

log = logging.getLogger(__name__)
# Bank rows the key ceiling searches (a seeded sample beyond that): exact kNN over all of them, on the host.
KEY_CEILING_ROWS = 20_000


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _last_answer(conversations: Any) -> str:
    turns = json.loads(_text(conversations)) if conversations else []
    answers = [turn.get("value", "") for turn in turns if turn.get("from") == "gpt"]
    return answers[-1].strip() if answers else ""


def source_attributes(source: Any, indexes: Sequence[int], kind: str) -> dict[str, np.ndarray]:
    """Attributes of `source[i]` for each index: easy-vqa's answer, colour, shape and question type, or the last
    assistant answer of a LLaVA-format conversation; and for both `image`, the image's group key (easy-vqa image
    id, LLaVA image path: `memory_keys.image_group_key`), so 'image' precision is the share of retrieved rows of
    the query's own image."""
    records = [source[int(index)] for index in indexes]
    if kind == "easy_vqa":
        attributes = dict(diagnostics.easy_vqa_attributes(records))
        attributes.pop("image_id")
    else:
        attributes = {"answer": np.array([_last_answer(record.get("conversations")) for record in records],
                                         dtype=object)}
    images = [memory_keys.image_group_key(record) for record in records]
    attributes["image"] = np.array(["" if key is None else str(key) for key in images], dtype=object)
    return attributes


def _fields(attributes: dict) -> tuple[str, ...]:
    return tuple(name for name in ("answer", "color", "shape", "image") if name in attributes)


def _gathered(rows: np.ndarray) -> np.ndarray:
    """[n_i, ...] rows of every process, concatenated in process order (each process may hold a different n_i)."""
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.asarray([rows.shape[0]], np.int64))).reshape(-1)
    padded = np.zeros((int(counts.max()),) + rows.shape[1:], rows.dtype)
    padded[:rows.shape[0]] = rows
    every = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([every[process, :count] for process, count in enumerate(counts)])


def headline(results: dict) -> dict[str, float]:
    """p@k of every field of every measurement, flat, for metrics.jsonl ('retrieval/test/answer': 0.62)."""
    return {f"retrieval/{name}/{field}": row["precision"] for name, result in results.items() if result
            for field, row in result.get("fields", {}).items() if row.get("precision") is not None}


class RetrievalProbe:
    """Measures the retrieval of a run's model; the jitted search and the bank's attributes are made once."""

    def __init__(self, run: Any):
        self.run = run
        cfg, mesh = run.cfg, run.mesh
        self.kind = run.config.data.kind

        def values(params, batch, memory, train):
            aux = model_lib.build_lm_inputs(params, cfg, batch, memory, train, "right")[1]
            return aux["value_ids"]

        self._values = {train: jax.jit(sharding.trace_in_mesh(
            lambda p, b, m, train=train: values(p, b, m, train), mesh)) for train in (False, True)}
        bank = run.memory.bank
        self.bank_ids = np.asarray(bank.host_ids())  # diagnostics run after training, on every process
        self.bank_attributes = source_attributes(run.sources["memory"], self.bank_ids, self.kind)
        self._ceiling: dict | None = None

    def _measure(self, params: dict, source: Any, train: bool, max_batches: int | None) -> dict:
        run, config = self.run, self.run.config
        shard_count, own_shards = training.data_shards(run.mesh, config.eval.batch_size)
        options = dict(run.data_options, verbose=False, fraction=config.data.fraction if train else
                       config.eval.fraction, fraction_seed=config.data.fraction_seed)
        group_members = options.get("group_members")
        parts = [pipeline.make_eval_dataset(source, batch_size=config.eval.batch_size // shard_count,
                                            process_index=shard, process_count=shard_count, **options)
                 for shard in own_shards]
        ids, samples = [], []
        for number, batches in enumerate(zip(*parts)):
            if max_batches and number >= max_batches:
                break
            batch = {name: np.concatenate([part[name] for part in batches]) for name in batches[0]}
            if train and isinstance(group_members, memory_keys.GroupMembers):
                batch[model_lib.GROUP_FIELD] = group_members(batch["sample_index"])
            device_batch = sharding.global_batch(model_lib.numpy_batch(batch), run.mesh)
            value_ids = self._values[train](params, device_batch, run.memory)
            ids.append(training.host_rows(value_ids, run.mesh))
            samples.append(batch["sample_index"])
        ids_all, samples_all = _gathered(np.concatenate(ids)), _gathered(np.concatenate(samples))
        real = samples_all >= 0  # padding rows of the last batch
        query = source_attributes(source, samples_all[real], self.kind)
        return diagnostics.retrieval_precision(ids_all[real], query, self.bank_attributes, _fields(query),
                                               bank_ids=self.bank_ids,
                                               by="question_type" if "question_type" in query else None)

    def key_ceiling(self) -> dict:
        """The bank's own kNN precision (rows of the same image excluded), computed once per run."""
        if self._ceiling is None:
            bank = self.run.memory.bank
            stored_ids = _host_array(bank.ids)                       # [capacity] ints, -1 for padding rows
            positions = np.flatnonzero(stored_ids >= 0)              # storage rows of the real entries
            rows = np.arange(positions.size)                         # their order = self.bank_ids' order
            if rows.size > KEY_CEILING_ROWS:
                rows = np.sort(np.random.default_rng(0).choice(rows.size, KEY_CEILING_ROWS, replace=False))
            # Only the sampled keys come to the host: a real bank does not fit in host memory whole.
            keys = _host_array(_take_rows(bank.keys, jax.numpy.asarray(positions[rows], jax.numpy.int32)))
            attributes = {name: values[rows] for name, values in self.bank_attributes.items()}
            groups = np.array([image or f"row-{row}" for image, row in zip(attributes["image"], rows)], dtype=object)
            self._ceiling = diagnostics.key_knn_precision(
                keys.astype(np.float32), attributes, k=min(self.run.cfg.k, max(1, rows.size - 1)), metric=bank.metric,
                groups=groups, fields=_fields(attributes),
                by="question_type" if "question_type" in attributes else None)
            self._ceiling["search"]["sampled"] = bool(rows.size < positions.size)
        return self._ceiling

    def __call__(self, params: dict, max_batches: int | None = None, train_batches: int | None = None) -> dict:
        """Test queries over `max_batches` evaluation batches, training queries over `train_batches` (default
        `max_batches`; None: all)."""
        train_batches = max_batches if train_batches is None else train_batches
        results = {"test": self._measure(params, self.run.sources["eval"], False, max_batches),
                   "train": self._measure(params, self.run.sources["train"], True, train_batches),
                   "key_ceiling": self.key_ceiling()}
        log.info("retrieval precision (values the LM reads):\n%s", diagnostics.format_table(results, by_type=False))
        return results


@jax.jit
def _take_rows(keys: jax.Array, positions: jax.Array) -> jax.Array:
    return keys[positions]


def _host_array(array: jax.Array) -> np.ndarray:
    """All of `array` on this host (gathered from the other processes when it is sharded over them)."""
    if getattr(array, "is_fully_addressable", True) or array.is_fully_replicated:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
