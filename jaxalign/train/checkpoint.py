"""Training checkpoints: orbax CheckpointManager with async saves, keep-last-N and atomic commits.

Each checkpoint directory `<workdir>/checkpoints/<step>/` holds two items:
  state: the TrainState, flattened to a dict {'params.lm.head.kernel': array, 'opt_state.<path>': array,
         'step': ..., 'rng': ...}. A flat dict of named arrays is readable with orbax alone and does not depend
         on how optax's state classes serialise (multi_transform's empty `MaskedNode`s have no arrays to save).
  extra: a JSON dict (data-iterator position, config, anything json-serialisable).
orbax writes into a temporary directory and renames it when complete (atomic commit), so a crash mid-save
leaves the previous checkpoint as the latest.

Frozen pretrained towers are loaded from their source, not re-saved: with `trainable_mask` given, only the
trainable params are written (plus the whole optimizer state, which has no entries for frozen params), and
`restore*` takes the frozen params from the target state supplied by the caller (which must therefore hold
real arrays there, e.g. a freshly initialised state with the towers loaded).

Restores land directly on the current mesh: the target's leaves (arrays or `jax.ShapeDtypeStruct`s carrying
shardings, see `jaxalign.train.state.abstract_state`) say where each array goes.

Public API:
  Checkpointer(directory, keep=3, trainable_mask=None, async_saves=True)
    .save(step, state, extra=None, force=False) -> bool
    .restore_latest(target_state) -> (state, extra) | None
    .restore(step, target_state) -> (state, extra)
    .latest_step() -> int | None;  .all_steps() -> list[int];  .wait();  .close()
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxalign.train.state import TrainState

PyTree = Any


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _flat_named(prefix: str, tree: PyTree) -> dict[str, Any]:
    """{'prefix.a.b': leaf} for every leaf of `tree` ('.'-joined path)."""
    return {".".join([prefix] + [_key_name(key) for key in path]): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _as_abstract(leaf) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))


class Checkpointer:
    """Saves and restores `TrainState`s (and a JSON `extra` dict) under one directory.

    Args:
      directory: where step sub-directories are written (created if missing).
      keep: how many most recent checkpoints to keep.
      trainable_mask: if given (pytree of bools over params), frozen params are not saved and are taken from
        the restore target instead.
      async_saves: write in a background thread; call `wait()` before reading the files or exiting.
    """

    def __init__(self, directory: str, keep: int = 3, trainable_mask: PyTree | None = None,
                 async_saves: bool = True):
        self.directory = os.path.abspath(directory)
        self.trainable_mask = trainable_mask
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_saves)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

    # -- flattening --------------------------------------------------------------------------------------------
    def _saved_params(self, params: PyTree) -> dict[str, Any]:
        if self.trainable_mask is None:
            return _flat_named("params", params)
        kept = jax.tree.map(lambda keep, leaf: leaf if keep else None, self.trainable_mask, params)
        return _flat_named("params", kept)

    def _flatten(self, state: TrainState) -> dict[str, Any]:
        flat = {"step": state.step, "rng": state.rng}
        flat.update(self._saved_params(state.params))
        flat.update(_flat_named("opt_state", state.opt_state))
        return flat

    def _unflatten(self, flat: dict[str, Any], target: TrainState) -> TrainState:
        def rebuild(prefix: str, tree: PyTree, from_target: PyTree | None = None) -> PyTree:
            leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
            out = []
            for path, leaf in leaves_with_path:
                name = ".".join([prefix] + [_key_name(key) for key in path])
                out.append(flat[name] if name in flat else leaf)
            return jax.tree.unflatten(treedef, out)
        return TrainState(step=flat["step"], rng=flat["rng"], params=rebuild("params", target.params),
                          opt_state=rebuild("opt_state", target.opt_state))

    # -- public ------------------------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, extra: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` as checkpoint `step` (asynchronously by default); returns whether it saves."""
        return self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._flatten(state)), extra=ocp.args.JsonSave(dict(extra or {}))),
            force=force)

    def restore(self, step: int, target_state: TrainState) -> tuple[TrainState, dict]:
        """Restores checkpoint `step` with the structure, dtypes and shardings of `target_state`.

        Frozen params (when `trainable_mask` is set) are taken from `target_state`, which must hold arrays there.
        """
        target_flat = self._flatten(target_state)
        if self.trainable_mask is not None:
            _, frozen_leaves = self._frozen_leaves(target_state.params)
            abstract_frozen = [leaf for leaf in frozen_leaves if not isinstance(leaf, jax.Array)]
            if abstract_frozen:
                raise ValueError(
                    f"checkpoint {self.directory}/{step} holds only trainable params; the restore target must "
                    f"hold real arrays for the {len(abstract_frozen)} frozen params (load the pretrained towers "
                    "into the target state before restoring)")
        abstract = {name: _as_abstract(leaf) for name, leaf in target_flat.items()}
        restored = self._manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        return self._unflatten(dict(restored["state"]), target_state), dict(restored["extra"] or {})

    def _frozen_leaves(self, params: PyTree) -> tuple[list[str], list[Any]]:
        mask_leaves = jax.tree.leaves(self.trainable_mask)
        named = list(_flat_named("params", params).items())
        frozen = [(name, leaf) for (name, leaf), keep in zip(named, mask_leaves) if not keep]
        return [name for name, _ in frozen], [leaf for _, leaf in frozen]

    def restore_latest(self, target_state: TrainState) -> tuple[TrainState, dict] | None:
        """The latest checkpoint restored like `restore`, or None if there is none yet."""
        step = self.latest_step()
        return None if step is None else self.restore(step, target_state)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
