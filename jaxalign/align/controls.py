"""Retrieval controls: runs that separate a real retrieval benefit from the effect of "more tokens".

A TinyAlign model sees more input tokens than its baseline; a gain could come from the extra tokens (extra
compute, a longer context) rather than from the retrieved information. The controls keep everything the same
except the information carried by the values (the search runs as usual, so `retrieved_ids` and the scores are
those of 'real'):

- `'real'`: the values of the retrieved entries (the method itself).
- `'shuffled'`: the values of a fixed random permutation of the bank rows: entry i's value is replaced by the
  value of entry `permutation[i]`, the same for the whole run (seeded). Same number of tokens, unrelated to the
  query. The permutation has no fixed point (a random cyclic shift), so no entry keeps its own value. A weak
  null on easy-vqa: most rows are yes / no answers, so a global shuffle also changes the answer type.
- `'shuffle_within_group'`: the same, but the permutation only moves values among bank rows of one group
  (`shuffle_group`: 'question_type', 'answer_type' yes/no vs other, or 'wording', the question with its colour
  and shape words blanked; 'auto': 'question_type' when the memory source's records have one, else
  'answer_type'; labels from the memory source's records, `memory_keys.record_shuffle_labels`). The
  value a slot gets has the answer type / form of the retrieved row's but not its content: the null that
  separates "the neighbour's answer" from "an answer of the right kind". One random cycle per group (seeded); a
  row alone in its group keeps its own value (`shuffle_group_summary` counts them).
- `'constant'`: every retrieved entry gets the value of one fixed row (`constant_row`): same number of tokens,
  no information at all.
- `'oracle'`: every one of the k slots gets the sample's own value (its answer, or its caption for a caption
  bank), taken from the batch (`oracle_value_ids` [B, value_length], added by the input pipeline in training,
  evaluation and generation alike): the upper bound. If even it does not lower the loss, the LM is not reading
  the retrieved tokens. All k slots rather than slot 0 next to k - 1 real neighbours: like the other controls it
  then changes only the information in the values (same slots, same token count), and its result does not mix
  in the quality of the real search or depend on k through it. It is the only control that hands a training
  sample its own value, on purpose.
- `'off'`: no retrieval: the TinyLLaVA baseline. Check `retrieval_enabled(control)` and splice without retrieved
  tokens; the mapping functions refuse 'off' so that it cannot be applied by mistake.

The row controls act on the ids the memory search returns, before the values are gathered, so they work for any
value kind (token ids, pooled features, faithful latents); 'oracle' needs token values. With `exclude_ids`
(leave-one-out: the query's own row [B], or the rows of its whole group [B, G]), a remapped row that would land
on an excluded row is moved on (to `permutation[row]`, or the next row for 'constant') until it is off them: a
control must not leak the sample's own value (its answer, for token values), or a value of its group, when the
real retrieval does not. (For 'shuffle_within_group' this fails only when the sample's group holds every row of
that value group, which then keeps its value.)

Shapes: B batch, k neighbours, N bank rows, G excluded rows per query.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CONTROL_KINDS = ("real", "shuffled", "shuffle_within_group", "constant", "oracle", "off")
PERMUTED_KINDS = ("shuffled", "shuffle_within_group")   # controls whose values follow a fixed row permutation
SHUFFLE_GROUPS = ("auto", "question_type", "answer_type", "wording")
_UNROLLED_MOVES = 16   # excluded rows per query up to which `_move_off_excluded` is unrolled


@dataclasses.dataclass(frozen=True)
class RetrievalControl:
    """Which control a run uses; hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      kind: one of `CONTROL_KINDS` (module docstring).
      seed: 'shuffled' / 'shuffle_within_group': seed of the bank-row permutation.
      constant_row: 'constant': the bank row whose value every query gets.
      shuffle_group: 'shuffle_within_group': what a group of bank rows is (one of `SHUFFLE_GROUPS`; 'auto' is
        resolved from the memory source by `memory_keys.resolve_shuffle_group`).
    """

    kind: str = "real"
    seed: int = 0
    constant_row: int = 0
    shuffle_group: str = "auto"

    def __post_init__(self):
        if self.kind not in CONTROL_KINDS:
            raise ValueError(f"RetrievalControl.kind={self.kind!r}; expected one of {CONTROL_KINDS}")
        if self.constant_row < 0:
            raise ValueError(f"RetrievalControl.constant_row={self.constant_row} must be >= 0")
        if self.shuffle_group not in SHUFFLE_GROUPS:
            raise ValueError(f"RetrievalControl.shuffle_group={self.shuffle_group!r} (config.retrieval."
                             f"shuffle_group); expected one of {SHUFFLE_GROUPS}")


def retrieval_enabled(control: RetrievalControl) -> bool:
    """False for the 'off' control (the baseline: no search, no retrieved tokens)."""
    return control.kind != "off"


def shuffle_permutation(num_rows: int, seed: int) -> np.ndarray:
    """A fixed random permutation of `num_rows` bank rows without fixed points (for num_rows >= 2).

    It is one random cycle: rows are put in a random order and each row maps to the next one in that order.
    NumPy's generator makes it identical on every host and backend.

    Returns:
      [num_rows] int32; row i's value is replaced by row `permutation[i]`'s.
    """
    if num_rows < 1:
        raise ValueError(f"the bank must have at least one row to shuffle, got {num_rows}")
    order = np.random.default_rng(seed).permutation(num_rows)
    permutation = np.empty(num_rows, np.int32)
    permutation[order] = np.roll(order, -1)
    return permutation


def within_group_permutation(labels: Sequence[Hashable], seed: int) -> np.ndarray:
    """A fixed random permutation of bank rows that maps every row to another row of its own group.

    One random cycle per group, so no row of a group of two or more keeps its own value; a row alone in its
    group maps to itself. Drawn from one seeded order of all rows (stably sorted by group), so it is identical
    on every host, and with a single group it is exactly `shuffle_permutation(len(labels), seed)`.

    Args:
      labels: [N] the group label of each bank row, in storage order (`memory_keys.record_shuffle_labels`).
    Returns:
      [N] int32; row i's value is replaced by row `permutation[i]`'s, a row with `labels[i]`'s label.
    """
    num_rows = len(labels)
    if num_rows < 1:
        raise ValueError(f"the bank must have at least one row to shuffle, got {num_rows}")
    _, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    order = np.random.default_rng(seed).permutation(num_rows)
    order = order[np.argsort(codes[order], kind="stable")]              # grouped, random order inside a group
    grouped = codes[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])   # first position of each group
    ends = np.r_[starts[1:], num_rows]
    following = np.arange(1, num_rows + 1)
    following[ends - 1] = starts                                         # the last of a group wraps to its first
    permutation = np.empty(num_rows, np.int32)
    permutation[order] = order[following]
    return permutation


def answer_type(answer: str) -> str:
    """'yes/no' for a yes / no answer (any case, a final full stop allowed), else 'other': the
    'answer_type' shuffle group (on easy-vqa about 74% of the question rows are yes / no)."""
    return "yes/no" if answer.strip().lower().rstrip(".") in ("yes", "no") else "other"


def question_wording(question: str) -> str:
    """The 'wording' shuffle group of a question: lower case, single spaces, every easy-vqa colour word replaced
    by '<color>' and shape word by '<shape>' ("is there a red circle?" -> "is there a <color> <shape>?")."""
    from jaxalign.data import easy_vqa

    words = re.sub(r"\s+", " ", question.strip().lower())
    words = re.sub(r"\b(" + "|".join(easy_vqa.COLORS) + r")\b", "<color>", words)
    return re.sub(r"\b(" + "|".join(easy_vqa.SHAPES) + r")\b", "<shape>", words)


def shuffle_group_summary(labels: Sequence[Hashable]) -> dict:
    """What a within-group shuffle over these row labels can do: {'groups', 'rows', 'alone' (rows alone in their
    group, which keep their own value), 'largest', 'sizes' (label -> rows; only up to 32 groups)}."""
    names, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    summary = {"groups": int(names.size), "rows": int(counts.sum()), "alone": int((counts == 1).sum()),
               "largest": int(counts.max(initial=0))}
    if names.size <= 32:
        summary["sizes"] = {str(name): int(count) for name, count in zip(names, counts)}
    return summary


def _move_off_excluded(rows: jax.Array, excluded: jax.Array, step) -> jax.Array:
    """rows [B, k] moved on with `step` while they hit one of the query's excluded rows [B, G] (-1: none).

    G steps suffice: every step visits a new row of the same cycle, and at most G of them are excluded."""
    def move(_, current):
        hit = jnp.any(current[:, :, None] == excluded[:, None, :], axis=-1)
        return jnp.where(hit, step(current), current)
    if excluded.shape[1] <= _UNROLLED_MOVES:   # 'self' (G = 1) and small groups: no loop in the program
        for _ in range(excluded.shape[1]):
            rows = move(None, rows)
        return rows
    return jax.lax.fori_loop(0, excluded.shape[1], move, rows)


def controlled_value_ids(control: RetrievalControl, ids: jax.Array, num_rows: int,
                         permutation: jax.Array | np.ndarray | None = None,
                         exclude_ids: jax.Array | None = None) -> jax.Array:
    """The bank rows whose values the model gets, for retrieved ids [B, k] (jit-able).

    Args:
      control: the control ('off' and 'oracle' are refused: there are no bank rows to map).
      ids: [B, k] int bank rows returned by the search.
      num_rows: N, rows in the bank.
      permutation: 'shuffled': [N] from `shuffle_permutation(N, control.seed)`, computed once per run (passing
        it in keeps the per-step cost at one gather), computed here when None; 'shuffle_within_group': [N] from
        `within_group_permutation` (required: it needs the rows' group labels).
      exclude_ids: optional [B] each query's own row, or [B, G] the rows of its group (-1 padded); remapped ids
        never land on them (unless a value group lies wholly inside them, see the module docstring).
    Returns:
      [B, k] int32 rows to gather values from.
    """
    if control.kind == "off":
        raise ValueError("the 'off' control uses no retrieval: check retrieval_enabled(control) and splice without "
                         "retrieved tokens instead of mapping value ids")
    if control.kind == "oracle":
        raise ValueError("the 'oracle' control reads no bank row: its values are the batch's oracle_value_ids "
                         "(see jaxalign.align.model._retrieve)")
    ids = jnp.asarray(ids).astype(jnp.int32)
    if control.kind == "real":
        return ids
    exclude = None
    if exclude_ids is not None:
        exclude = jnp.asarray(exclude_ids, jnp.int32)
        exclude = exclude[:, None] if exclude.ndim == 1 else exclude
    if control.kind == "constant":
        if control.constant_row >= num_rows:
            raise ValueError(f"RetrievalControl.constant_row={control.constant_row} is outside the bank's "
                             f"{num_rows} rows")
        mapped = jnp.full(ids.shape, control.constant_row, jnp.int32)
        if exclude is not None:
            mapped = _move_off_excluded(mapped, exclude, lambda rows: (rows + 1) % num_rows)
        return mapped
    if permutation is None:
        if control.kind == "shuffle_within_group":
            raise ValueError("the 'shuffle_within_group' control needs the permutation of its groups: "
                             "controls.within_group_permutation(labels, seed), as memory_keys.RetrievalMemory.create "
                             "draws it from the bank rows' labels")
        permutation = shuffle_permutation(num_rows, control.seed)
    permutation = jnp.asarray(permutation, jnp.int32)
    if permutation.shape != (num_rows,):
        raise ValueError(f"permutation must have shape ({num_rows},) for a bank of {num_rows} rows, got "
                         f"{permutation.shape}")
    mapped = permutation[ids]
    if exclude is not None:
        # One cycle (per group): permutation[permutation[i]] != own row whenever permutation[i] == own row.
        mapped = _move_off_excluded(mapped, exclude, lambda rows: permutation[rows])
    return mapped


def controlled_values(control: RetrievalControl, ids: jax.Array, value_table: jax.Array,
                      permutation: jax.Array | np.ndarray | None = None,
                      exclude_ids: jax.Array | None = None) -> jax.Array | None:
    """Gathers the values a control gives for retrieved ids [B, k] from the bank's value table [N, ...].

    Returns:
      [B, k, ...] values (value_table's trailing shape and dtype), or None for 'off'.
    """
    if not retrieval_enabled(control):
        return None
    rows = controlled_value_ids(control, ids, value_table.shape[0], permutation, exclude_ids)
    return jnp.take(value_table, rows, axis=0)
