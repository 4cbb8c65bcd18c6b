"""Retrieval controls: runs that separate a real retrieval benefit from the effect of "more tokens".

A TinyAlign model sees more input tokens than its baseline; a gain could come from the extra tokens (extra
compute, a longer context) rather than from the retrieved information. The controls keep everything the same
except the information carried by the values:

- `'real'`: the values of the retrieved entries (the method itself).
- `'shuffled'`: the values of a fixed random permutation of the bank rows: entry i's value is replaced by the
  value of entry `permutation[i]`, the same for the whole run (seeded). Same value distribution, same number of
  tokens, but unrelated to the query. The permutation has no fixed point (a random cyclic shift), so no entry
  keeps its own value.
- `'constant'`: every retrieved entry gets the value of one fixed row (`constant_row`): same number of tokens,
  no information at all.
- `'off'`: no retrieval: the TinyLLaVA baseline. Check `retrieval_enabled(control)` and splice without retrieved
  tokens; the mapping functions refuse 'off' so that it cannot be applied by mistake.

The controls act on the ids the memory search returns, before the values are gathered, so they work for any value
kind (token ids, pooled features, faithful latents). With `exclude_ids` (leave-one-out), a remapped id that would
land on the query's own entry is moved on once more (to `permutation[id]` or the next row): a control must not
leak the sample's own value (its answer, for token values) when the real retrieval does not.

Shapes: B batch, k neighbours, N bank rows.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

CONTROL_KINDS = ("real", "shuffled", "constant", "off")


@dataclasses.dataclass(frozen=True)
class RetrievalControl:
    """Which control a run uses; hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      kind: 'real', 'shuffled', 'constant' or 'off'.
      seed: 'shuffled': seed of the bank-row permutation.
      constant_row: 'constant': the bank row whose value every query gets.
    """

    kind: str = "real"
    seed: int = 0
    constant_row: int = 0

    def __post_init__(self):
        if self.kind not in CONTROL_KINDS:
            raise ValueError(f"RetrievalControl.kind={self.kind!r}; expected one of {CONTROL_KINDS}")
        if self.constant_row < 0:
            raise ValueError(f"RetrievalControl.constant_row={self.constant_row} must be >= 0")


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


def controlled_value_ids(control: RetrievalControl, ids: jax.Array, num_rows: int,
                         permutation: jax.Array | np.ndarray | None = None,
                         exclude_ids: jax.Array | None = None) -> jax.Array:
    """The bank rows whose values the model gets, for retrieved ids [B, k] (jit-able).

    Args:
      control: the control ('off' is refused: there are no values to map).
      ids: [B, k] int bank rows returned by the search.
      num_rows: N, rows in the bank.
      permutation: 'shuffled': [N] from `shuffle_permutation(N, control.seed)`, computed once per run (passing
        it in keeps the per-step cost at one gather); computed here when None.
      exclude_ids: optional [B] each query's own row (leave-one-out); remapped ids never land on it.
    Returns:
      [B, k] int32 rows to gather values from.
    """
    if control.kind == "off":
        raise ValueError("the 'off' control uses no retrieval: check retrieval_enabled(control) and splice without "
                         "retrieved tokens instead of mapping value ids")
    ids = jnp.asarray(ids).astype(jnp.int32)
    if control.kind == "real":
        return ids
    exclude = None if exclude_ids is None else jnp.asarray(exclude_ids, jnp.int32)[:, None]
    if control.kind == "constant":
        if control.constant_row >= num_rows:
            raise ValueError(f"RetrievalControl.constant_row={control.constant_row} is outside the bank's "
                             f"{num_rows} rows")
        mapped = jnp.full(ids.shape, control.constant_row, jnp.int32)
        if exclude is not None:
            mapped = jnp.where(mapped == exclude, (mapped + 1) % num_rows, mapped)
        return mapped
    if permutation is None:
        permutation = shuffle_permutation(num_rows, control.seed)
    permutation = jnp.asarray(permutation, jnp.int32)
    if permutation.shape != (num_rows,):
        raise ValueError(f"permutation must have shape ({num_rows},) for a bank of {num_rows} rows, got "
                         f"{permutation.shape}")
    mapped = permutation[ids]
    if exclude is not None:
        # With one cycle, permutation[permutation[i]] != own row whenever permutation[i] == own row (N >= 2).
        mapped = jnp.where(mapped == exclude, permutation[mapped], mapped)
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
