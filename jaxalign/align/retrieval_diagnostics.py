"""Retrieval diagnostics: do the retrieved memory rows carry the answer?

TinyAlign feeds the values of k retrieved bank rows to the LM. Whether they can help depends on whether those rows
share the query's answer (or the image's colour and shape): a bank whose neighbours agree with the query no more
often than random rows adds tokens, not information. These functions measure that, on the host, from arrays a
trainer already has: the retrieved ids (the model's `value_ids`, which are what the LM sees, or `retrieved_ids`)
and per-sample attributes such as `easy_vqa_attributes` returns.

Precision of a field = agreeing retrieved slots / compared slots. A slot is compared when its id is not -1 (no
row found; counted as `empty`) and both the query's and the row's value are known (text '' / b'' / None is
unknown; counted as `unknown`). The chance level is the precision a bank searched at random would reach:
sum over values v of p_query(v) * p_bank(v), from the queries' and the bank rows' known values.

`key_knn_precision` searches the bank's keys with themselves (each row's k nearest other rows, optionally never
one of its own group, e.g. the same image): no query built from the same encoder can do better on average than
the bank's own keys, so it is the ceiling of any bank keyed on that encoder.

Results are JSON-able dicts (ints, floats, None, lists, dicts of str keys), stored as `retrieval_precision` in a
run's results.json.

Public API:
  retrieval_precision(retrieved_ids [N, k], query {field: [N]}, bank {field: [M]}, fields=None, *, bank_ids=None,
                      by='question_type') -> result (structure below)
  nearest_rows(keys [N, d], k, metric='cosine', groups=None, chunk_size=None) -> (rows [N, k], scores [N, k])
  key_knn_precision(keys [N, d], attributes {field: [N]}, k, metric='cosine', groups=None, *, fields=None,
                    by='question_type', chunk_size=None) -> result, plus 'search'
  easy_vqa_attributes(records) -> {'answer', 'color', 'shape', 'question_type', 'image_id'} arrays [N]
  summary_line(result) -> "answer 0.62 (chance 0.21), color 0.99 (0.13), shape 0.48 (0.33)"
  format_table({name: result}) -> a text table: p@1, p@k, chance and counts per field (and per question type)

Result structure::

    {"queries": N, "k": k, "slots": N * k, "retrieved": slots with an id, "empty": slots with id -1,
     "by": "question_type" or None,
     "fields": {field: {"precision": p@k or None, "agree": int, "compared": int, "unknown": int,
                        "chance": float or None,
                        "precision_at": [p@1, ..., p@k],            # over ranks 1..r together
                        "by_rank": {"agree": [k ints], "compared": [k ints], "precision": [k]},  # rank r alone
                        "by_type": {value of `by`: {"queries", "precision", "agree", "compared", "unknown",
                                                    "chance", "precision_at"}}}}}    # only when `by` is given
"""
from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data import easy_vqa
from jaxalign.memory import knn

EASY_VQA_FIELDS = ("answer", "color", "shape")
# Bytes of one float32 [query chunk, N] score block in `nearest_rows`: 40k rows -> chunks of about 400 queries.
SCORE_BLOCK_BYTES = 64 * 2**20
_CAPTION = re.compile(r"a (?P<color>\S+) (?P<shape>\S+)")


# ------------------------------------------------------------------------------------------ precision
def retrieval_precision(retrieved_ids: Any, query: Mapping[str, Any], bank: Mapping[str, Any],
                        fields: Sequence[str] | None = None, *, bank_ids: Any = None,
                        by: str | None = "question_type") -> dict:
    """How often the retrieved rows agree with their query, per field, rank and query type.

    Args:
      retrieved_ids: [N, k] int ids of the bank rows retrieved for each query, best first; -1 = none.
      query: field -> [N] values of the queries (e.g. the gold answer).
      bank: field -> [M] values of the bank rows.
      fields: the fields to compare (each in both `query` and `bank`); default every shared field but `by`.
      bank_ids: [M] the id of each bank row; default the row position (ids = `sample_index` = row of the data).
      by: a query field to break the numbers down by (skipped when `query` lacks it; unknown values skipped).
    Returns:
      The result dict of the module docstring.
    """
    ids = np.asarray(retrieved_ids)
    if ids.ndim == 1:
        ids = ids[:, None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"retrieved_ids must be integer ids [queries, k]; got {ids.dtype} {ids.shape}")
    queries, k = ids.shape
    by = by if by is not None and by in query else None
    if fields is None:
        fields = [name for name in query if name in bank and name != by]
    found = ids >= 0
    rows = _bank_rows(ids, found, bank, bank_ids)
    groups = None
    if by is not None:
        kinds = _values(query[by], f"query[{by!r}]", queries)
        groups = {str(kind): kinds == kind for kind in np.unique(kinds[_known(kinds)])}
    result = {"queries": queries, "k": k, "slots": int(ids.size), "retrieved": int(found.sum()),
              "empty": int((~found).sum()), "by": by, "fields": {}}
    for name in fields:
        if name not in query or name not in bank:
            raise KeyError(f"field {name!r} is missing from the {'query' if name not in query else 'bank'} "
                           f"arrays (query has {sorted(query)}, bank has {sorted(bank)})")
        query_values = _values(query[name], f"query[{name!r}]", queries)
        bank_values = _values(bank[name], f"bank[{name!r}]", None)
        if (query_values.dtype.kind == "U") != (bank_values.dtype.kind == "U"):
            raise ValueError(f"field {name!r}: the query values are {query_values.dtype} but the bank values are "
                             f"{bank_values.dtype}; give both as text or both as numbers")
        compared = found & _known(query_values)[:, None] & _known(bank_values)[rows]
        agree = compared & (query_values[:, None] == bank_values[rows])
        unknown = found & ~compared
        entry = _counts(agree, compared, unknown)
        bank_known = bank_values[_known(bank_values)]
        entry["chance"] = _chance(query_values[_known(query_values)], bank_known)
        entry["by_rank"] = {"agree": agree.sum(0).tolist(), "compared": compared.sum(0).tolist(),
                            "precision": [_ratio(a, c) for a, c in zip(agree.sum(0), compared.sum(0))]}
        if groups is not None:
            entry["by_type"] = {}
            for kind, members in groups.items():
                part = _counts(agree[members], compared[members], unknown[members])
                known_members = query_values[members & _known(query_values)]
                entry["by_type"][kind] = {"queries": int(members.sum()), **part,
                                          "chance": _chance(known_members, bank_known)}
        result["fields"][name] = entry
    return result


def _bank_rows(ids: np.ndarray, found: np.ndarray, bank: Mapping[str, Any], bank_ids: Any) -> np.ndarray:
    """[N, k] positions of the retrieved ids in the bank arrays (0 where the id is -1)."""
    sizes = {name: len(values) for name, values in bank.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the bank arrays differ in length: {sizes}; give one value per bank row in each")
    size = next(iter(sizes.values()), 0)
    if bank_ids is None:
        rows = np.where(found, ids, 0)
        bad = found & (ids >= size)
    else:
        bank_ids = np.asarray(bank_ids)
        if bank_ids.shape != (size,):
            raise ValueError(f"bank_ids has shape {bank_ids.shape} but the bank arrays have {size} rows")
        order = np.argsort(bank_ids, kind="stable")
        where = np.clip(np.searchsorted(bank_ids[order], ids), 0, max(size - 1, 0))
        rows = np.where(found, order[where] if size else 0, 0)
        bad = found & ((bank_ids[rows] != ids) if size else True)
    if bad.any():
        query, rank = np.argwhere(bad)[0]
        raise ValueError(f"retrieved id {ids[query, rank]} (query {query}, rank {rank + 1}) is not a bank row "
                         f"({size} rows{'' if bank_ids is None else ', looked up in bank_ids'}); pass the "
                         "attributes of every bank row, or bank_ids when the rows are not ids 0..M-1")
    return rows


def _values(values: Any, what: str, length: int | None) -> np.ndarray:
    """Values as a comparable array: text decoded to str ('' = unknown), numbers as they are."""
    array = np.asarray(values)
    if array.ndim != 1 or (length is not None and len(array) != length):
        expected = f"[{length}]" if length is not None else "one value per row"
        raise ValueError(f"{what} has shape {array.shape}; expected {expected}")
    if array.dtype.kind == "S":
        return np.char.decode(array, "utf-8")
    if array.dtype.kind == "O":
        items = [item.decode("utf-8") if isinstance(item, bytes) else "" if item is None else item
                 for item in array]
        array = np.asarray(items)
        if array.dtype.kind == "O":
            raise ValueError(f"{what} mixes text and numbers; give one kind of value per field")
    return array


def _known(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "U":
        return values != ""
    if values.dtype.kind == "f":
        return ~np.isnan(values)
    return np.ones(values.shape, bool)


def _counts(agree: np.ndarray, compared: np.ndarray, unknown: np.ndarray) -> dict:
    agree_at, compared_at = np.cumsum(agree.sum(0)), np.cumsum(compared.sum(0))
    return {"precision": _ratio(agree.sum(), compared.sum()), "agree": int(agree.sum()),
            "compared": int(compared.sum()), "unknown": int(unknown.sum()),
            "precision_at": [_ratio(a, c) for a, c in zip(agree_at, compared_at)]}


def _ratio(numerator: Any, denominator: Any) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def _chance(query_values: np.ndarray, bank_values: np.ndarray) -> float | None:
    """sum_v p_query(v) * p_bank(v): the agreement rate of a bank row drawn at random."""
    if not len(query_values) or not len(bank_values):
        return None
    query_kinds, query_counts = np.unique(query_values, return_counts=True)
    bank_kinds, bank_counts = np.unique(bank_values, return_counts=True)
    _, query_at, bank_at = np.intersect1d(query_kinds, bank_kinds, return_indices=True)
    return float(np.sum(query_counts[query_at] * bank_counts[bank_at]) / (len(query_values) * len(bank_values)))


# -------------------------------------------------------------------------------------- key search
def nearest_rows(keys: Any, k: int, metric: str = "cosine", groups: Any = None,
                 chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other rows of every row of `keys`, searched in query chunks.

    Args:
      keys: [N, d] the bank's keys.
      k: neighbours per row (1 <= k < N).
      metric: 'cosine', 'dot' or 'l2' (scores as in `jaxalign.memory.knn`, higher is nearer).
      groups: optional [N] group of each row (ints or text); a row never retrieves a row of its own group
        (e.g. another question on the same image). A row never retrieves itself either way.
      chunk_size: queries scored per step against all N keys; default keeps a float32 [chunk, N] score block
        within `SCORE_BLOCK_BYTES`.
    Returns:
      rows [N, k] int32 (best first, ties to the lower row; -1 where fewer than k rows qualify) and their
      scores [N, k] float32 (-inf there).
    """
    knn.check_metric(metric)
    keys = np.asarray(keys, np.float32)
    if keys.ndim != 2:
        raise ValueError(f"keys must be [rows, dim]; got shape {keys.shape}")
    count = len(keys)
    if not 1 <= k < count:
        raise ValueError(f"k = {k} neighbours asked of {count} rows; each row has at most {count - 1} others")
    if groups is None:
        codes = np.arange(count, dtype=np.int32)
    else:
        groups = np.asarray(groups)
        if groups.shape != (count,):
            raise ValueError(f"groups has shape {groups.shape}; expected one group per key row, [{count}]")
        codes = np.unique(groups, return_inverse=True)[1].reshape(-1).astype(np.int32)
    chunk_size = chunk_size or max(1, SCORE_BLOCK_BYTES // (4 * count))
    chunk_size = min(chunk_size, count)
    device_keys = knn.normalise(jnp.asarray(keys)) if metric == "cosine" else jnp.asarray(keys)
    device_codes = jnp.asarray(codes)
    found_rows, found_scores = [], []
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        # The last chunk is padded to the full size (rows -1, group -1: it blocks nothing) so it reuses the
        # compiled search; its padding rows are dropped.
        query_rows = np.full(chunk_size, -1, np.int32)
        query_rows[:stop - start] = np.arange(start, stop)
        query_codes = np.where(query_rows >= 0, codes[np.clip(query_rows, 0, None)], -1).astype(np.int32)
        scores, rows = _search_chunk(device_keys, device_codes, jnp.asarray(query_rows), jnp.asarray(query_codes),
                                     k=k, metric="dot" if metric == "cosine" else metric)
        found_rows.append(np.asarray(rows)[:stop - start])
        found_scores.append(np.asarray(scores)[:stop - start])
    return np.concatenate(found_rows), np.concatenate(found_scores)


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _search_chunk(keys: jax.Array, codes: jax.Array, query_rows: jax.Array, query_codes: jax.Array, *, k: int,
                  metric: str) -> tuple[jax.Array, jax.Array]:
    """Top-k rows of `keys` for the queries keys[query_rows], never their own row or group. [chunk, k] each."""
    queries = keys[jnp.clip(query_rows, 0)]
    scores = knn.score_chunk(queries, keys, metric)                             # [chunk, N]
    own = jnp.arange(keys.shape[0])[None, :] == query_rows[:, None]
    same_group = codes[None, :] == query_codes[:, None]
    top, rows = jax.lax.top_k(jnp.where(own | same_group, -jnp.inf, scores), k)
    return top, jnp.where(top > -jnp.inf, rows, -1).astype(jnp.int32)


def key_knn_precision(keys: Any, attributes: Mapping[str, Any], k: int, metric: str = "cosine",
                      groups: Any = None, *, fields: Sequence[str] | None = None, by: str | None = "question_type",
                      chunk_size: int | None = None) -> dict:
    """Precision of the bank keyed on `keys` searched with its own keys: the ceiling of any query on that encoder.

    Args:
      keys: [N, d] one key per bank row.
      attributes: field -> [N] values of each row (the query and the bank are the same rows).
      k, metric, chunk_size: as `nearest_rows`.
      groups: [N] group of each row, or the name of a field of `attributes` (e.g. 'image_id'); rows of the same
        group are never neighbours (that field is then left out of the default fields).
      fields, by: as `retrieval_precision`.
    Returns:
      `retrieval_precision`'s result, plus 'search': {'rows', 'k', 'metric', 'groups'} ('groups' is the field
      name, 'array' or None).
    """
    group_name = groups if isinstance(groups, str) else None
    if group_name is not None:
        if group_name not in attributes:
            raise KeyError(f"groups={group_name!r} is not a field of the attributes ({sorted(attributes)})")
        groups = attributes[group_name]
    if fields is None:
        fields = [name for name in attributes if name not in (by, group_name)]
    rows, _ = nearest_rows(keys, k, metric, groups, chunk_size)
    result = retrieval_precision(rows, attributes, attributes, fields, by=by)
    result["search"] = {"rows": len(rows), "k": k, "metric": metric,
                        "groups": group_name or (None if groups is None else "array")}
    return result


# --------------------------------------------------------------------------------------- easy-vqa
def easy_vqa_attributes(records: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The attributes of easy-vqa records that retrieval precision compares.

    Args:
      records: `easy_vqa.question_records` / `caption_records` dicts, or records of the tfds sources (text as
        bytes). The colour and shape come from the caption "a {color} {shape}" (or the records' own 'color' /
        'shape'); an empty caption (an image its questions do not determine) gives unknown ('').
    Returns:
      {'answer', 'color', 'shape', 'question_type': [N] str ('' where the record has none),
       'image_id': [N] int64}.
    """
    columns: dict[str, list] = {"answer": [], "color": [], "shape": [], "question_type": [], "image_id": []}
    for position, record in enumerate(records):
        text = {name: _text(record.get(name, "")) for name in ("answer", "question_type", "caption", "color",
                                                                "shape")}
        color, shape = text["color"], text["shape"]
        if not (color or shape) and text["caption"]:
            match = _CAPTION.fullmatch(text["caption"].strip())
            if match is None:
                raise ValueError(f"easy-vqa record {_text(record.get('id', position))!r}: caption "
                                 f"{text['caption']!r} is not 'a {{color}} {{shape}}'")
            color, shape = match["color"], match["shape"]
        if (color and color not in easy_vqa.COLORS) or (shape and shape not in easy_vqa.SHAPES):
            source = f"caption {text['caption']!r}" if not (text["color"] or text["shape"]) else "fields"
            raise ValueError(f"easy-vqa record {_text(record.get('id', position))!r}: {source} gives colour "
                             f"{color!r} / shape {shape!r}, not one of {easy_vqa.COLORS} / {easy_vqa.SHAPES}")
        if "image_id" not in record:
            raise KeyError(f"easy-vqa record {_text(record.get('id', position))!r} has no 'image_id'")
        for name, value in (("answer", text["answer"]), ("color", color), ("shape", shape),
                            ("question_type", text["question_type"]), ("image_id", int(record["image_id"]))):
            columns[name].append(value)
    return {name: np.asarray(values, np.int64 if name == "image_id" else str) for name, values in columns.items()}


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------------- printing
def summary_line(result: dict, fields: Sequence[str] | None = None) -> str:
    """One log line: 'answer 0.62 (chance 0.21), color 0.99 (0.13), shape 0.48 (0.33)' (precision over all k)."""
    parts = []
    for position, name in enumerate(fields or result["fields"]):
        entry = result["fields"][name]
        chance = _number(entry["chance"])
        parts.append(f"{name} {_number(entry['precision'])} ({'chance ' if position == 0 else ''}{chance})")
    line = ", ".join(parts)
    if result["empty"]:
        line += f"; {result['empty']} of {result['slots']} slots empty"
    return line


def format_table(results: Mapping[str, dict], by_type: bool = True) -> str:
    """A text table of several results (e.g. {'key knn ceiling': ..., 'train step 1000': ...}).

    One line per (result, field) with p@1, p@k, chance, compared slots and unknown slots; with `by_type`, one
    more line per query type under each field.
    """
    header = ("result", "field", "p@1", "p@k", "chance", "compared", "unknown")
    lines = [header]
    for result_name, result in results.items():
        for field, entry in result["fields"].items():
            rows = [(field, entry)]
            if by_type:
                rows += [(f"  {result['by']}={kind}", part) for kind, part in entry.get("by_type", {}).items()]
            for label, part in rows:
                at = part["precision_at"]
                lines.append((result_name, label, _number(at[0] if at else None), _number(part["precision"]),
                              _number(part["chance"]), str(part["compared"]), str(part["unknown"])))
                result_name = ""
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
