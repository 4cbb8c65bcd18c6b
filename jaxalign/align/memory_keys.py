"""Memory keys and values for TinyAlign, made with the frozen encoders of the model itself.

A retrieval only helps when the query of a sample and the keys of the bank live in the same space, so the same
function makes both: `retrieval_key` is called on a training batch inside the jitted step (the query) and on the
memory source when the bank is built (the keys).

**Default mode** (`default_key`), the fixed recipe:
  key = unit(concat(w_img * unit(mean of the frozen vision features), w_txt * unit(mean of the LM input
  embeddings of the prompt text))), width = vision width + LM width.
Why: the vision tower is frozen in every stage, so the image half of a key never goes stale, and the prompt half
uses the LM's own input embeddings (frozen in stage 1; in stage 2 they move at the small stage-2 learning rate,
so keys built at the start of the stage stay close). The connector is *not* used: it is being trained, and keys
built through it at bank-build time would drift away from the queries. Padding, answer tokens and the
image / retrieval markers are masked out of the text half (`query.prompt_text_mask`), so a query never depends
on the answer it is meant to help produce. The mean is used rather than the softmax pooling of the official
code: with unit rows that softmax is nearly uniform anyway (see `query.py`), and the mean costs O(n) not O(n^2).

**Faithful mode** (`faithful_key`): the official pooling (`query.faithful_query`) over the connector outputs and
the LM embeddings of the whole text from `text_start` on (padding and answer included). Keys are built with the
connector as it is when the bank is built, so they drift from the queries as the connector trains: that is the
official behaviour (its keys come from another model altogether) and is kept on purpose.

**Values.** Default mode: the token ids of the entry's answer (stage 2) or caption (stage 1), i.e. its labelled
tokens, padded with `VALUE_PAD_ID` to `value_length`; the model embeds them with the LM's own embedding table
and maps them with the retrieval connector (see `value_encoders.py` for why). Faithful mode: the 32 x 96 latents
of the seeded random Perceiver over the entry's pixels and caption bytes.

Public API:
  default_key(vision_features [B,N,Ev], text_embeddings [B,L,d], text_mask [B,L], image_weight, text_weight)
      -> [B, Ev + d] (the query and key function of the default mode; the model's `retrieval_key` calls it)
  answer_token_values(labels [B,L], value_length) -> [B, value_length] int32 (host, NumPy)
  memory_batches(batches, tokenizer, value_kind, value_length=0, perceiver_bytes=0) -> host batches for the bank
  memory_fingerprint(params, cfg, source, extra=None) -> str
  build_bank(encode, batches, mesh, metric='cosine', total=None, progress=True) -> MemoryBank (ids: sample_index)
  load_or_build_bank(directory, fingerprint, build, mesh, extra=None) -> (MemoryBank, info)
  RetrievalMemory(bank, permutation, num_rows); RetrievalMemory.create(bank, shuffle_seed=None, shuffle_labels=None)
  control_memory(bank, control, memory_source) -> (RetrievalMemory, info): the memory a retrieval control needs
  resolve_shuffle_group(source, shuffle_group) -> the group kind 'auto' stands for with this memory source
  record_shuffle_labels(source, indexes, shuffle_group) -> [label of each record] ('shuffle_within_group')
  oracle_values(value_length, source='answer') -> pipeline.OracleValues ('oracle': the batches' own values)
  own_rows(bank, sample_ids [B]) -> [B] storage rows of the samples' own entries (-1: absent)
  image_group_key(record, image_root='') -> the key shared by every record of one image (None: no image)
  record_group_keys(source, indexes, image_root='') -> [image_group_key of each record]
  GroupMembers(row_group, members): training-source rows [b] -> [b, G] bank ids of each row's group
  group_members(train_rows, train_keys, num_train_rows, bank_ids, bank_keys, same_source) -> GroupMembers
  source_group_members(train_source, train_rows, memory_source, bank_ids, group_by='image', ...) -> GroupMembers
The key encoder itself is `jaxalign.align.model.make_bank_encoder` (it needs the model's parts).

**Leave-one-out by group.** A training sample that retrieves another entry of its own image (on easy-vqa, a
sibling question about the same picture) sees something no test sample can see: test images are not in the
bank. With `leave_out='group'` each sample excludes every bank entry of its group. The groups are computed once
per run on the host (`source_group_members`: one key per record, read from the records' `image_id` or image file
name, compared across sources, so a bank of captions excludes the caption of a question's image); each training
batch then carries `group_member_ids` [B, G] (`GroupMembers`, G = the largest group in the bank, fixed for the
run), which the search takes as its per-query excluded ids inside the jitted step. Masking costs B x G id
comparisons per scored bank row, no [B, N] mask is ever built.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import posixpath
import time
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh

from jaxalign.align import value_encoders
from jaxalign.align.query import unit_rows
from jaxalign.data.chat_templates import ASSISTANT, HUMAN, IGNORE_LABEL, IMAGE_PLACEHOLDER
from jaxalign.memory import bank as bank_lib
from jaxalign.memory import build as build_lib
from jaxalign.memory import store

PyTree = Any
log = logging.getLogger(__name__)


def default_key(vision_features: jax.Array, text_embeddings: jax.Array, text_mask: jax.Array,
                image_weight: float = 0.4, text_weight: float = 0.6) -> jax.Array:
    """Default-mode key / query of a batch (see the module docstring); float32 unit rows, no gradient.

    Args:
      vision_features: [B, N, Ev] frozen vision-tower features.
      text_embeddings: [B, L, d] LM input embeddings of the text.
      text_mask: [B, L] bool, True on prompt text tokens (no padding, answer or markers). A row without any
        prompt token (caption pretraining) gets a zero text half: its key is its image half.
    Returns:
      [B, Ev + d] float32.
    """
    image = unit_rows(jnp.mean(vision_features.astype(jnp.float32), axis=1))
    mask = text_mask.astype(jnp.float32)[:, :, None]
    text_sum = jnp.sum(text_embeddings.astype(jnp.float32) * mask, axis=1)
    text = unit_rows(text_sum / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    return jax.lax.stop_gradient(unit_rows(jnp.concatenate([image_weight * image, text_weight * text], axis=-1)))


def answer_token_values(labels: np.ndarray, value_length: int, drop_ids: Sequence[int] = ()) -> np.ndarray:
    """Each row's labelled (answer / caption) token ids, in order, without `drop_ids` (the template's
    end-of-turn and end-of-text tokens: a value is text to read, and an end-of-turn token in the middle of a
    prompt tells the LM the turn is over), cut or padded (`VALUE_PAD_ID`) to `value_length`: [B, value_length]
    int32."""
    labels = np.asarray(labels)
    rows = [row[(row != IGNORE_LABEL) & ~np.isin(row, np.asarray(list(drop_ids), labels.dtype))] for row in labels]
    return value_encoders.caption_token_values(rows, value_length)


def memory_batches(batches: Iterable[dict], tokenizer: Any, value_kind: str, value_length: int = 0,
                   perceiver_bytes: int = 0, drop_ids: Sequence[int] = ()) -> Iterator[dict]:
    """Host batches for building a bank from `EvalBatches` (training-style rows, `for_generation=False`).

    Keeps only the valid rows, drops the string fields, and adds what the values need: 'value_tokens'
    [b, value_length] (value_kind 'tokens') or 'value_bytes' / 'value_byte_mask' [b, perceiver_bytes] of the
    decoded answer text (value_kind 'latents', the faithful Perceiver's input).
    """
    for batch in batches:
        valid = np.asarray(batch["valid"], bool)
        if not valid.any():
            continue
        rows = {name: np.asarray(value)[valid] for name, value in batch.items()
                if name not in ("answer", "question_type", "valid")}
        if value_kind == "tokens":
            rows["value_tokens"] = answer_token_values(rows["labels"], value_length, drop_ids)
        else:
            texts = [tokenizer.decode(row[row != IGNORE_LABEL]) for row in rows["labels"]]
            rows["value_bytes"], rows["value_byte_mask"] = value_encoders.caption_bytes(texts, perceiver_bytes)
        yield rows


def memory_fingerprint(params: PyTree, cfg: Any, source: str, extra: dict | None = None) -> str:
    """Fingerprint of everything a bank's keys and values depend on: the frozen vision tower, the LM embedding
    table, (faithful mode) the connector, the mode and sizes, and the data source."""
    # The embedding is hashed in the compute dtype: stage 1 keeps a frozen LM in bfloat16 and stage 2 trains a
    # float32 copy of the same weights, and both must find the same bank.
    embedding = params["lm"]["embed"]["embedding"].astype(cfg.lm.compute_dtype)
    encoders = {"vision": params["vision"], "lm_embedding": embedding}
    if cfg.query.mode == "faithful":
        encoders["connector"] = params["connector"]
    description = {"mode": cfg.query.mode, "value_kind": cfg.value_kind, "value_length": cfg.value_length,
                   "vision_layer": cfg.vision_layer, "drop_first_vision_token": cfg.drop_first_vision_token,
                   "weights": [cfg.query.image_weight, cfg.query.text_weight], "source": source, **(extra or {})}
    if cfg.query.key_encoder != "towers":  # absent for the towers, so banks saved before the option stay valid
        description["key_encoder"] = cfg.query.key_encoder
    return store.encoder_fingerprint("tinyalign-memory", encoders, description)


def load_or_build_bank(directory: str, fingerprint: str, build: Callable[[], bank_lib.MemoryBank], mesh: Mesh,
                       extra: dict | None = None) -> tuple[bank_lib.MemoryBank, dict]:
    """The bank saved in `directory` when its fingerprint matches, else a new one from `build()`, saved there.

    Returns (bank, info) with info {'path', 'reused', 'count', 'key_dim'}.
    """
    if (epath.Path(directory) / store.MANIFEST).is_file():  # also a gs:// directory
        manifest = store.read_manifest(directory)
        if manifest["encoder_fingerprint"] == fingerprint:
            bank = store.load_bank(directory, mesh=mesh, fingerprint=fingerprint)
            log.info("reusing the memory bank in %s (%d rows)", directory, manifest["count"])
            return bank, {"path": directory, "reused": True, "count": int(manifest["count"]),
                          "key_dim": int(manifest["key_dim"])}
        log.info("the memory bank in %s was built with other encoders or data (%s); rebuilding it", directory,
                 manifest["encoder_fingerprint"])
    bank = build()
    store.save_bank(bank, directory, fingerprint=fingerprint, extra=extra)
    return bank, {"path": directory, "reused": False, "count": bank.size, "key_dim": bank.key_dim}


def build_bank(encode: Callable[[dict], tuple[jax.Array, dict]], batches: Iterable[dict], mesh: Mesh,
               metric: str = "cosine", total: int | None = None, progress: bool = True) -> bank_lib.MemoryBank:
    """Encodes host batches (from `memory_batches`, each host its own slice) into a sharded bank; ids are the
    records' `sample_index`. Each host keeps only the rows it encoded (`build.bank_from_process_rows`)."""
    keys, values, ids = build_lib.encode_local(batches, encode, ids_field="sample_index",
                                               split_across_hosts=jax.process_count() == 1,
                                               progress=progress, total=total)
    return build_lib.bank_from_process_rows(keys, values, ids, metric=metric, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class RetrievalMemory:
    """What the model searches: the bank, the fixed row permutation of the 'shuffled' / 'shuffle_within_group'
    control ([N] int32, replicated; None for the other controls), and the number of real rows N (static). A
    pytree, so it is an ordinary argument of the jitted step."""

    bank: bank_lib.MemoryBank
    permutation: jax.Array | None
    num_rows: int

    @classmethod
    def create(cls, bank: bank_lib.MemoryBank, shuffle_seed: int | None = None,
               shuffle_labels: Sequence[Hashable] | None = None) -> "RetrievalMemory":
        """Wraps `bank`; with `shuffle_seed` a permutation of its rows is drawn once: one cycle over all rows
        ('shuffled'), or with `shuffle_labels` ([N] group label of each row in storage order, from
        `record_shuffle_labels`) one cycle within each group ('shuffle_within_group')."""
        from jaxalign.align import controls

        count = bank.size
        permutation = None
        if shuffle_labels is not None and shuffle_seed is None:
            raise ValueError("RetrievalMemory.create: shuffle_labels need a shuffle_seed")
        if shuffle_seed is not None:
            if shuffle_labels is None:
                rows = controls.shuffle_permutation(count, shuffle_seed)
            else:
                if len(shuffle_labels) != count:
                    raise ValueError(f"RetrievalMemory.create: {len(shuffle_labels)} shuffle labels for a bank of "
                                     f"{count} rows; give one label per row, in storage order (bank.host_ids())")
                rows = controls.within_group_permutation(shuffle_labels, shuffle_seed)
            permutation = jax.device_put(rows, jax.sharding.NamedSharding(bank.mesh, jax.sharding.PartitionSpec()))
        return cls(bank=bank, permutation=permutation, num_rows=count)


jax.tree_util.register_dataclass(RetrievalMemory, data_fields=["bank", "permutation"], meta_fields=["num_rows"])


def own_rows(bank: bank_lib.MemoryBank, sample_ids: jax.Array) -> jax.Array:
    """[B] (or any shape) storage row of each sample's own entry (ids are stored in increasing order), -1 when
    absent (an id -1 included)."""
    ids = jnp.where(bank.ids < 0, jnp.iinfo(jnp.int32).max, bank.ids)
    position = jnp.clip(jnp.searchsorted(ids, sample_ids.astype(jnp.int32)), 0, ids.shape[0] - 1)
    return jnp.where(ids[position] == sample_ids, position, -1).astype(jnp.int32)


# ------------------------------------------------------------------------------------- leave-one-out groups
GROUP_BY = ("image",)
_KEY_READ_CHUNK = 4096


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def image_group_key(record: Mapping[str, Any], image_root: str = "") -> Hashable | None:
    """The key every record of one image shares: easy-vqa's `image_id`; a LLaVA record's image file (its
    `image_path` joined to `image_root`, the folder the paths are relative to, so that two JSON files with
    different roots still agree); otherwise the SHA-1 of the image bytes. None for a text-only record."""
    if "image_id" in record:
        return ("image_id", int(record["image_id"]))
    path = _text(record.get("image_path", ""))
    if path:
        return ("path", posixpath.normpath(posixpath.join(image_root, path)))
    image = bytes(record.get("image", b"") or b"")
    return ("sha1", hashlib.sha1(image).hexdigest()) if image else None


def _tfds_group_keys(source: Any, indexes: np.ndarray, image_root: str) -> list | None:
    """`image_group_key` of tfds array_record records, parsing only their `image_id` / `image_path` feature from
    the raw bytes: a full decode copies every image (about 30 times slower). None when `source` is not a tfds
    data source with one of those features (the caller then decodes whole records)."""
    raw, info = getattr(source, "data_source", None), getattr(source, "dataset_info", None)
    if raw is None or info is None or not hasattr(raw, "__getitems__"):
        return None
    names = set(info.features.keys())
    name = "image_id" if "image_id" in names else "image_path" if "image_path" in names else None
    if name is None:
        return None
    try:
        from tensorflow_datasets.core import example_parser
        example_proto = example_parser.tf_example_pb2.Example
    except (ImportError, AttributeError):
        return None
    keys: list = []
    for start in range(0, len(indexes), _KEY_READ_CHUNK):
        for serialized in raw.__getitems__(indexes[start:start + _KEY_READ_CHUNK].tolist()):
            feature = example_proto.FromString(serialized).features.feature[name]
            if name == "image_id":
                keys.append(("image_id", int(feature.int64_list.value[0])))
            else:
                path = feature.bytes_list.value[0].decode("utf-8") if feature.bytes_list.value else ""
                keys.append(("path", posixpath.normpath(posixpath.join(image_root, path))) if path else None)
    return keys


def record_group_keys(source: Any, indexes: Sequence[int], image_root: str = "") -> list:
    """`image_group_key` of `source[index]` for each index (any random-access source of record dicts)."""
    indexes = np.asarray(indexes, np.int64).reshape(-1)
    fast = _tfds_group_keys(source, indexes, image_root)
    if fast is not None:
        return fast
    return [image_group_key(source[int(index)], image_root) for index in indexes]


@dataclasses.dataclass(frozen=True, eq=False)
class GroupMembers:
    """Each training sample's group in the bank: called on a batch's `sample_index` [b] (training-source rows),
    it gives the [b, G] bank ids the samples may not retrieve under `leave_out='group'`, padded with -1.

    Attributes:
      row_group: [training-source rows] int32 group number of each row; -1: its group has no entry in the bank;
        -2: the row was not in the training selection the table was built for (an error when asked for).
      members: [groups + 1, G] int32 bank ids of each group, sorted, -1 padded; the last row is all -1 (the
        group of rows with none). G (`width`) is the largest group in the bank: one static shape per run.
    """

    row_group: np.ndarray
    members: np.ndarray

    @property
    def width(self) -> int:
        return int(self.members.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.members.shape[0]) - 1

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """[b, G] int32 bank ids of the groups of training-source rows [b]; a padding row (-1) gets none."""
        rows = np.asarray(rows, np.int64)
        group = np.where(rows >= 0, self.row_group[np.clip(rows, 0, len(self.row_group) - 1)], -1)
        if (group == -2).any() or (rows >= len(self.row_group)).any():
            missing = rows[(group == -2) | (rows >= len(self.row_group))][:10].tolist()
            raise ValueError(f"training rows {missing} are not in the selection the leave-one-out groups were "
                             "computed for (memory_keys.source_group_members(train_rows=...)); build them with the "
                             "rows the run trains on")
        return self.members[group].astype(np.int32)   # group -1 reads the last, all -1, row


def group_members(train_rows: Sequence[int], train_keys: Sequence[Hashable | None], num_train_rows: int,
                  bank_ids: Sequence[int], bank_keys: Sequence[Hashable | None], same_source: bool) -> GroupMembers:
    """The `GroupMembers` table from group keys (`image_group_key`): the group of training row r is every bank
    id whose key equals r's.

    Args:
      train_rows: [n] training-source rows that batches can hold (the training selection); train_keys: their keys.
      num_train_rows: rows in the training source.
      bank_ids: [N] the bank's ids (memory-source rows); bank_keys: their keys.
      same_source: the bank was built from the training source, so bank id r is training row r: a row without
        a key (a text-only sample) is then a group of its own entry, and every row's group holds its own entry
        (when in the bank). Otherwise a row without a key excludes nothing.
    """
    def keyed(row, key):
        return ("row", int(row)) if key is None and same_source else key

    entries: dict[Hashable, list[int]] = {}
    for bank_id, key in zip(np.asarray(bank_ids).tolist(), bank_keys):
        key = keyed(bank_id, key)
        if key is not None:
            entries.setdefault(key, []).append(int(bank_id))
    width = max((len(ids) for ids in entries.values()), default=1)
    members = np.full((len(entries) + 1, width), -1, np.int32)
    number = {}
    for group, (key, ids) in enumerate(entries.items()):
        members[group, :len(ids)] = sorted(ids)
        number[key] = group
    row_group = np.full(num_train_rows, -2, np.int32)
    for row, key in zip(np.asarray(train_rows).tolist(), train_keys):
        row_group[row] = number.get(keyed(row, key), -1)
    return GroupMembers(row_group=row_group, members=members)


def source_group_members(train_source: Any, train_rows: Sequence[int], memory_source: Any, bank_ids: Sequence[int],
                         group_by: str = "image", train_image_root: str = "", memory_image_root: str = ""
                         ) -> GroupMembers:
    """`group_members` of a run: reads the group key of every training row and bank entry once (one pass over
    the records; the tfds fast path parses only the image id / path field).

    Args:
      train_source, memory_source: the run's sources (the same object when the bank is built from the training
        data; its ids are then training rows).
      train_rows: the training selection (`pipeline.select_fraction`); bank_ids: `bank.host_ids()`.
      group_by: what a group is: 'image' (the records' image, `image_group_key`).
      train_image_root, memory_image_root: LLaVA: the folders the sources' image paths are relative to.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"config.retrieval.group_by={group_by!r}; expected one of {GROUP_BY} (or '' for no groups)")
    same_source = memory_source is train_source
    train_rows = np.asarray(train_rows, np.int64)
    bank_ids = np.asarray(bank_ids, np.int64)
    if same_source:
        rows = np.union1d(train_rows, bank_ids)
        known = dict(zip(rows.tolist(), record_group_keys(train_source, rows, train_image_root)))
        train_keys = [known[row] for row in train_rows.tolist()]
        bank_keys = [known[row] for row in bank_ids.tolist()]
    else:
        train_keys = record_group_keys(train_source, train_rows, train_image_root)
        bank_keys = record_group_keys(memory_source, bank_ids, memory_image_root)
    return group_members(train_rows, train_keys, len(train_source), bank_ids, bank_keys, same_source)


# ------------------------------------------------------------------------------------- control data
def _conversation_turn(conversations: Any, speaker: str, last: bool) -> str:
    """The first (or last) turn of `speaker` in a LLaVA conversation (JSON text or list), '' when none."""
    try:
        turns = json.loads(_text(conversations)) if isinstance(conversations, (str, bytes, np.bytes_)) \
            else conversations
    except json.JSONDecodeError:
        return ""
    texts = [str(turn.get("value", "")) for turn in turns or [] if isinstance(turn, Mapping)
             and turn.get("from") == speaker]
    if not texts:
        return ""
    return (texts[-1] if last else texts[0]).replace(IMAGE_PLACEHOLDER, " ").strip()


def _record_texts(source: Any, indexes: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """The fields `names` of `source[index]` that the records have (text as str), for each index. A tfds array_record
    source has only those features parsed from the raw bytes (as `_tfds_group_keys`: no image decode)."""
    raw, info = getattr(source, "data_source", None), getattr(source, "dataset_info", None)
    if raw is not None and info is not None and hasattr(raw, "__getitems__"):
        try:
            from tensorflow_datasets.core import example_parser
            example_proto = example_parser.tf_example_pb2.Example
        except (ImportError, AttributeError):
            example_proto = None
        if example_proto is not None:
            present = [name for name in names if name in set(info.features.keys())]
            texts: list[dict[str, Any]] = []
            for start in range(0, len(indexes), _KEY_READ_CHUNK):
                for serialized in raw.__getitems__(indexes[start:start + _KEY_READ_CHUNK].tolist()):
                    features = example_proto.FromString(serialized).features.feature
                    texts.append({name: _text(features[name].bytes_list.value[0])
                                  if features[name].bytes_list.value else "" for name in present})
            return texts
    texts = []
    for index in indexes:
        record = source[int(index)]
        texts.append({name: _text(record[name]) for name in names if name in record})
    return texts


def resolve_shuffle_group(source: Any, shuffle_group: str) -> str:
    """`shuffle_group`, with 'auto' resolved: 'question_type' when the source's records have that field (easy-vqa
    questions), else 'answer_type' (captions, whose rows are then one group, and LLaVA records)."""
    if shuffle_group != "auto":
        return shuffle_group
    info = getattr(source, "dataset_info", None)
    names = set(info.features.keys()) if info is not None else set(source[0].keys()) if len(source) else set()
    return "question_type" if "question_type" in names else "answer_type"


def record_shuffle_labels(source: Any, indexes: Sequence[int], shuffle_group: str) -> list[str]:
    """The 'shuffle_within_group' label of each record `source[index]` (the bank rows: `bank.host_ids()`).

    Args:
      source: the memory source (records of easy-vqa, LLaVA JSON or any sequence of dicts).
      indexes: its rows, in the bank's storage order.
      shuffle_group: 'question_type' (the records' `question_type` field: easy-vqa questions), 'answer_type'
        ('yes/no' or 'other', `controls.answer_type` of the `answer` field or the last assistant turn) or
        'wording' (`controls.question_wording` of the `question` field or the first human turn); 'auto': see
        `resolve_shuffle_group`.
    Returns:
      [len(indexes)] labels.
    """
    from jaxalign.align import controls

    if shuffle_group not in controls.SHUFFLE_GROUPS:
        raise ValueError(f"config.retrieval.shuffle_group={shuffle_group!r}; expected one of "
                         f"{controls.SHUFFLE_GROUPS}")
    shuffle_group = resolve_shuffle_group(source, shuffle_group)
    indexes = np.asarray(indexes, np.int64).reshape(-1)
    names = {"question_type": ("question_type",), "answer_type": ("answer", "conversations"),
             "wording": ("question", "conversations")}[shuffle_group]
    records = _record_texts(source, indexes, names)
    labels = []
    for index, texts in zip(indexes.tolist(), records):
        if shuffle_group == "question_type":
            if not texts.get("question_type"):
                raise ValueError(f"config.retrieval.shuffle_group='question_type' needs records with a "
                                 f"question_type (easy-vqa questions), but record {index} of the memory source has "
                                 "none (captions and LLaVA records have none): use shuffle_group='answer_type' or "
                                 "'wording'")
            labels.append(texts["question_type"])
        elif shuffle_group == "answer_type":
            answer = texts.get("answer") or _conversation_turn(texts.get("conversations"), ASSISTANT, last=True)
            labels.append(controls.answer_type(answer))
        else:
            question = texts.get("question") or _conversation_turn(texts.get("conversations"), HUMAN, last=False)
            labels.append(controls.question_wording(question))
    return labels


def oracle_values(value_length: int, source: str = "answer", drop_ids: Sequence[int] = ()):
    """The 'oracle' control's `pipeline.OracleValues`: each sample's own value made as `memory_batches` makes
    the bank's (`answer_token_values` at `value_length`); source 'caption' encodes the record's caption as an
    easy-vqa caption conversation (`easy_vqa.caption_conversation`, the form of a captions bank's records)."""
    from jaxalign.data import pipeline

    caption_conversation = None
    if source == "caption":
        from jaxalign.data import easy_vqa
        caption_conversation = easy_vqa.caption_conversation
    to_values = functools.partial(answer_token_values, value_length=value_length, drop_ids=tuple(drop_ids))
    return pipeline.OracleValues(to_values, source=source, caption_conversation=caption_conversation)


def control_memory(bank: bank_lib.MemoryBank, control: Any, memory_source: Any = None
                   ) -> tuple[RetrievalMemory, dict]:
    """The `RetrievalMemory` a control searches (`control`: `controls.RetrievalControl`) and what it did.

    'shuffled': a permutation of all rows; 'shuffle_within_group': the bank rows' labels are read from
    `memory_source` (`record_shuffle_labels`; ids are its rows) and the permutation stays within each label.
    Returns (memory, info) with info {} or {'shuffle': {'group_by', 'groups', 'rows', 'alone' (rows alone in
    their group, which keep their own value), 'largest', 'sizes', 'seconds'}}.
    """
    from jaxalign.align import controls

    if control.kind == "shuffle_within_group":
        if memory_source is None:
            raise ValueError("the 'shuffle_within_group' control needs the memory source to read each bank row's "
                             "group label from")
        started = time.perf_counter()
        group_by = resolve_shuffle_group(memory_source, control.shuffle_group)
        labels = record_shuffle_labels(memory_source, bank.host_ids(), group_by)
        memory = RetrievalMemory.create(bank, control.seed, labels)
        summary = {"group_by": group_by, **controls.shuffle_group_summary(labels),
                   "seconds": round(time.perf_counter() - started, 2)}
        log.info("shuffle within %s: %d groups over %d rows, %d rows alone in their group keep their own value",
                 group_by, summary["groups"], summary["rows"], summary["alone"])
        return memory, {"shuffle": summary}
    seed = control.seed if control.kind == "shuffled" else None
    return RetrievalMemory.create(bank, seed), {}
