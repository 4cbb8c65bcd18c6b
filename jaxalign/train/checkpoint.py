"""Training checkpoints: orbax CheckpointManager with async saves, keep-last-N and atomic commits.

Each checkpoint directory `<workdir>/checkpoints/<step>/` holds two items:
  state: the TrainState, flattened to a dict {'params.lm.head.kernel': array, 'opt_state.<path>': array,
         'step': ..., 'rng': ...}. A flat dict of named arrays is readable with orbax alone and does not depend
         on how optax's state classes serialise (multi_transform's empty `MaskedNode`s have no arrays to save).
  extra: a JSON dict (data-iterator position, config, anything json-serialisable).
orbax writes into a temporary directory and renames it when complete (atomic commit), so a crash mid-save
leaves the previous checkpoint as the latest.

Integrity: orbax keeps no checksum of array data (measured with orbax 0.12.8: bytes flipped in an array file under
`<step>/state/ocdbt.process_0/d/` restore silently as wrong numbers; a truncated or emptied array file, or a
truncated `_METADATA`, `manifest.ocdbt` or `extra/metadata`, raises from tensorstore / json). So `save` also
writes two 32-bit checksums per saved array into `extra['array_checksums']` (sums of the array's bits, computed on
device, independent of sharding and reduction order) and `restore` recomputes and compares them; checkpoints
without them (older ones) are restored unverified. `restore_latest` falls back to the newest readable checkpoint:
each newer unreadable one is moved, not deleted, to `<directory>-unreadable/<step>` with a warning naming it (it
must leave the directory: orbax will not save a step at or below its latest step); if none is readable it raises
`UnreadableCheckpointError`, one line naming the directory and how to start over.

The directory may be local (made absolute, as orbax requires) or a `gs://` / `s3://` URI, passed to orbax as given;
the moves aside go through `etils.epath`, so they work there too.

Frozen pretrained towers are loaded from their source, not re-saved: with `trainable_mask` given, only the
trainable params are written (plus the whole optimizer state, which has no entries for frozen params), and
`restore*` takes the frozen params from the target state supplied by the caller (which must therefore hold
real arrays there, e.g. a freshly initialised state with the towers loaded).

Restores land directly on the current mesh: the target's leaves (arrays or `jax.ShapeDtypeStruct`s carrying
shardings, see `jaxalign.train.state.abstract_state`) say where each array goes.

Public API:
  UnreadableCheckpointError
  Checkpointer(directory, keep=3, trainable_mask=None, async_saves=True)
    .save(step, state, extra=None, force=False) -> bool
    .restore_latest(target_state) -> (state, extra) | None
    .restore(step, target_state) -> (state, extra)
    .latest_step() -> int | None;  .all_steps() -> list[int];  .wait();  .close()
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign import paths
from jaxalign.train.state import TrainState

PyTree = Any
log = logging.getLogger(__name__)
_CHECKSUMS = "array_checksums"


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint could not be restored: files missing, truncated, undecodable, or failing their checksums."""


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


def _bits_as_uint32(leaf: jax.Array) -> jax.Array:
    """The array's raw bits as uint32 (one element per element), so that sums are exact and order-independent."""
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
        return leaf.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(leaf.dtype).itemsize]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)


def _checksum_pair(leaf: jax.Array) -> jax.Array:
    """[2] uint32: the sum of the bits and a position-weighted sum (catches moved as well as changed values)."""
    bits = _bits_as_uint32(leaf)
    weights = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * 2 + 1
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=8)
def _checksum_program(mesh: jax.sharding.Mesh | None):
    """One jitted program per mesh (compiled once per state structure), its results replicated on the mesh."""
    return jax.jit(lambda arrays: {name: _checksum_pair(leaf) for name, leaf in arrays.items()},
                   out_shardings=NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)


def array_checksums(flat: dict[str, jax.Array]) -> dict[str, list[int]]:
    """{name: [two uint32 checksums]} of every array, computed on device in one jitted pass (no host copy)."""
    mesh = next((leaf.sharding.mesh for leaf in flat.values() if isinstance(getattr(leaf, "sharding", None),
                                                                            NamedSharding)), None)
    sums = _checksum_program(mesh)(flat)
    # Replicated results: each process reads its own copy, which works across processes too.
    return {name: [int(v) for v in np.asarray(value.addressable_data(0))] for name, value in sums.items()}


def _one_line(error: BaseException, limit: int = 240) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + "..."


def _all_processes(ok: bool) -> bool:
    """True only if `ok` on every process (a restore that failed on one host failed for all)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
    """Saves and restores `TrainState`s (and a JSON `extra` dict) under one directory.

    Args:
      directory: where step sub-directories are written (created if missing): a local folder or a gs:// URI.
      keep: how many most recent checkpoints to keep.
      trainable_mask: if given (pytree of bools over params), frozen params are not saved and are taken from
        the restore target instead.
      async_saves: write in a background thread; call `wait()` before reading the files or exiting.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, trainable_mask: PyTree | None = None,
                 async_saves: bool = True):
        self.directory = paths.orbax_directory(directory)
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
        flat = self._flatten(state)
        extra = {**(extra or {}), _CHECKSUMS: array_checksums(flat)}
        return self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), extra=ocp.args.JsonSave(extra)), force=force)

    def restore(self, step: int, target_state: TrainState) -> tuple[TrainState, dict]:
        """Restores checkpoint `step` with the structure, dtypes and shardings of `target_state`.

        Frozen params (when `trainable_mask` is set) are taken from `target_state`, which must hold arrays there.

        Raises:
          UnreadableCheckpointError: an array does not match the checksum written with it.
          Exception: whatever orbax / tensorstore raise for missing, truncated or undecodable files.
        """
        self._check_target(target_state)
        target_flat = self._flatten(target_state)
        abstract = {name: _as_abstract(leaf) for name, leaf in target_flat.items()}
        restored = self._manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        flat, extra = dict(restored["state"]), dict(restored["extra"] or {})
        expected = extra.pop(_CHECKSUMS, None)
        if expected is not None:
            actual = array_checksums(flat)
            bad = sorted(name for name in actual if expected.get(name) != actual[name])
            if bad:
                raise UnreadableCheckpointError(
                    f"checkpoint {self.directory}/{step}: {len(bad)} array(s) do not match the checksums saved "
                    f"with them (first: {bad[0]}); the files were changed after saving")
        return self._unflatten(flat, target_state), extra

    def _check_target(self, target_state: TrainState) -> None:
        if self.trainable_mask is not None:
            _, frozen_leaves = self._frozen_leaves(target_state.params)
            abstract_frozen = [leaf for leaf in frozen_leaves if not isinstance(leaf, jax.Array)]
            if abstract_frozen:
                raise ValueError(
                    f"checkpoints in {self.directory} hold only trainable params; the restore target must "
                    f"hold real arrays for the {len(abstract_frozen)} frozen params (load the pretrained towers "
                    "into the target state before restoring)")

    def _frozen_leaves(self, params: PyTree) -> tuple[list[str], list[Any]]:
        mask_leaves = jax.tree.leaves(self.trainable_mask)
        named = list(_flat_named("params", params).items())
        frozen = [(name, leaf) for (name, leaf), keep in zip(named, mask_leaves) if not keep]
        return [name for name, _ in frozen], [leaf for _, leaf in frozen]

    def restore_latest(self, target_state: TrainState) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint restored like `restore`, or None if there is none yet.

        Newer checkpoints that fail to restore are moved to `<directory>-unreadable/<step>` with a warning.

        Raises:
          UnreadableCheckpointError: there are checkpoints but none can be restored.
        """
        self._check_target(target_state)
        steps = sorted(self.all_steps(), reverse=True)
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                restored, error = self.restore(step, target_state), None
            except Exception as caught:  # orbax and tensorstore raise bare Exception, ValueError, JSON errors...
                restored, error = None, caught
            if not _all_processes(error is None):
                failures.append((step, _one_line(error) if error is not None else "failed on another process"))
                log.warning("checkpoint step %d in %s/%d is unreadable (%s)", step, self.directory, step,
                            failures[-1][1])
                continue
            for bad_step, reason in failures:
                moved_to = self._move_aside(bad_step)
                log.warning("checkpoint step %d could not be restored (%s); moved it to %s (not deleted) and "
                            "resumed from step %d instead", bad_step, reason, moved_to, step)
            return restored
        if not steps:
            return None
        raise UnreadableCheckpointError(
            f"no readable checkpoint in {self.directory}: steps {steps} all failed to restore (newest, step "
            f"{failures[0][0]}: {failures[0][1]}); to start over, move that directory aside (e.g. mv "
            f"{self.directory} {self.directory}.bad) and rerun, or put back a good copy of one step")

    def _move_aside(self, step: int) -> str:
        """Moves checkpoint `step` out of the managed directory (process 0; the others wait) and returns where."""
        quarantine = epath.Path(f"{self.directory}-unreadable")
        destination = quarantine / str(step)
        if jax.process_index() == 0:
            suffix = 1
            while destination.exists():
                destination = quarantine / f"{step}.{suffix}"
                suffix += 1
            quarantine.mkdir(parents=True, exist_ok=True)
            if not quarantine.exists():
                # An object store keeps no empty folder, and epath's fsspec client refuses to rename into a folder
                # it cannot see: give the folder an object.
                (quarantine / "README.txt").write_text("Checkpoints moved here could not be restored; see the "
                                                       "run's log for why. Delete them once inspected.\n")
            (epath.Path(self.directory) / str(step)).rename(destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxalign checkpoint moved aside {step}")
        self._manager.reload()
        return os.fspath(destination)

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
