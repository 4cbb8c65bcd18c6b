"""One training set-up for every trainer (TinyAlign stages, the CLUTRR teacher and students).

What is the same for all of them lives here, so a trainer only says what is its own (model, data, loss):

  * the mesh from the config's shape (`make_mesh`);
  * the optimizer from freeze rules, the state and its shardings on the mesh (`setup_training` -> `Training`);
  * the jitted step, traced in the mesh, state donated, timed without a host synchronisation per step
    (`Training.jit_step` -> `TimedStep`);
  * the loop: resume, checkpoints, metrics, preemption (`run_loop`, over `jaxalign.train.loop.train`);
  * early stopping on an evaluation metric with the best state kept (`EarlyStopping`, `best_evaluation`);
  * the per-process data slice: which rows of a global batch this process reads (`data_shards` for trainers that
    read one pipeline shard per mesh batch shard, `process_rows` for trainers that featurise a contiguous block
    of each global batch);
  * host copies of global arrays (`host_rows`, `host_copy`);
  * process-0 outputs through `etils.epath`, so a `gs://` workdir is written once, where it says
    (`write_json`), and where the run ran (`where_it_ran`: process and device counts).

Public API:
  make_mesh(shape) -> Mesh
  setup_training(params, param_axes, rules, mesh, seed) -> Training(mesh, state, shardings, optimizer, mask)
  Training.jit_step(step_fn, extra_shardings=()) -> TimedStep
  LoopSettings(...);  run_loop(training, step, batches_from, total_steps, workdir, config, settings, ...)
  best_evaluation(evaluations, metric) -> record | None;  EarlyStopping(metric, patience, keep_best)
  data_shards(mesh, global_batch_size) -> (shard count, this process's shards)
  process_rows(batch_size, mesh) -> range
  host_rows(array, mesh) -> np.ndarray;  host_copy(tree) -> tree of np.ndarray
  write_json(workdir, name, value) -> None (process 0);  where_it_ran() -> {'process_count', 'device_count'}
  gather_json(value) -> [value of each process]
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from jaxalign import sharding
from jaxalign.train import loop, optimizer as optimizer_lib
from jaxalign.train import state as state_lib
from jaxalign.train import step as step_lib

PyTree = Any


# ================================================================================================ mesh and state
def make_mesh(shape: Sequence[int]) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh of a config's `mesh` field (one entry may be -1)."""
    return sharding.make_mesh(tuple(shape))


class TimedStep:
    """A jitted `(state, batch, *extra) -> (state, metrics)` that records how long steps take without waiting for
    the device every step: the first call (compilation) is waited for alone, then one wait every `every` calls.

    `compile_seconds` is the first call's time; `seconds_per_step` the median of the later intervals' time per step
    (None until one interval has passed)."""

    def __init__(self, jitted: Callable, every: int = 10):
        self.jitted, self.every = jitted, max(1, every)
        self.calls, self._since, self._times = 0, 0.0, []

    def __call__(self, state, batch, *extra):
        if self.calls == 0:
            self._since = time.perf_counter()
        new_state, metrics = self.jitted(state, batch, *extra)
        self.calls += 1
        if self.calls == 1 or (self.calls - 1) % self.every == 0:
            jax.block_until_ready(metrics["loss"])
            now = time.perf_counter()
            self._times.append((now - self._since) / (1 if self.calls == 1 else self.every))
            self._since = now
        return new_state, metrics

    @property
    def compile_seconds(self) -> float | None:
        return self._times[0] if self._times else None

    @property
    def seconds_per_step(self) -> float | None:
        return float(np.median(self._times[1:])) if len(self._times) > 1 else None


@dataclasses.dataclass
class Training:
    """A trainer's state on the mesh and what made it.

    Attributes:
      mesh: the device mesh.
      state: `TrainState` (step 0, or what the loop will restore over), placed with `shardings`.
      shardings: `TrainState` of NamedShardings (params by their logical axes, Adam moments like their params).
      optimizer: the optax transformation built from the freeze rules (frozen parts get no optimizer state).
      mask: pytree of bools, True for trained leaves (frozen leaves are not checkpointed).
    """

    mesh: Mesh
    state: state_lib.TrainState
    shardings: state_lib.TrainState
    optimizer: optax.GradientTransformation
    mask: PyTree

    def jit_step(self, step_fn: Callable, extra_shardings: tuple = (), time_every: int = 10) -> TimedStep:
        """`step_fn(state, batch, *extra) -> (state, metrics)` jitted with the state's shardings, batch rows over
        the mesh's batch axes, `extra_shardings` for the extra arguments (e.g. a memory bank as it is laid out),
        traced in the mesh, the state donated; timed by `TimedStep`."""
        return TimedStep(step_lib.jit_train_step(step_fn, self.mesh, self.shardings,
                                                 sharding.batch_sharding(self.mesh, 1), extra_shardings),
                         every=time_every)


def setup_training(params: PyTree, param_axes: PyTree, rules: list, mesh: Mesh, seed: int) -> Training:
    """Optimizer from `rules` ([(regex, transformation or None = frozen)], first match wins, see
    `jaxalign.train.optimizer.build_optimizer`), parameters sharded by `param_axes`, a step-0 state with key
    `PRNGKey(seed)` placed on `mesh`."""
    optimizer = optimizer_lib.build_optimizer(params, rules)
    mask = optimizer_lib.trainable_mask(params, rules)
    params = sharding.shard_params(params, param_axes, mesh)
    state = state_lib.create_train_state(params, optimizer, jax.random.PRNGKey(seed))
    shardings = state_lib.state_shardings(state, param_axes, mesh)
    return Training(mesh, jax.device_put(state, shardings), shardings, optimizer, mask)


# ================================================================================================ loop
@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How often the loop logs, evaluates and checkpoints (each trainer maps its config's fields onto these)."""

    log_every: int = 10
    checkpoint_every: int = 100
    keep: int = 3
    eval_every: int | None = None
    async_checkpoints: bool = True
    progress: bool | None = None
    prefetch: int = 2


def run_loop(training: Training, step: Callable, batches_from: Callable, total_steps: int, workdir: str,
             config: Any, settings: LoopSettings, *, examples_per_step: int,
             eval_fn: Callable | None = None, should_stop: Callable | None = None) -> loop.TrainResult:
    """`jaxalign.train.loop.train` with the trainer's state, step and batches: resume, checkpoints (frozen
    parameters left out), metrics, evaluation every `settings.eval_every`, early stopping (`should_stop`, e.g.
    an `EarlyStopping`), preemption."""
    return loop.train(state=training.state, train_step=step, batch_iterator_factory=batches_from,
                      total_steps=total_steps, workdir=workdir, log_every=settings.log_every,
                      checkpoint_every=settings.checkpoint_every, keep=settings.keep, config=config,
                      eval_fn=eval_fn, eval_every=settings.eval_every, checkpoint_trainable_mask=training.mask,
                      examples_per_step=examples_per_step, async_checkpoints=settings.async_checkpoints,
                      progress=settings.progress, prefetch=settings.prefetch, should_stop=should_stop)


# ================================================================================================ early stopping
def best_evaluation(evaluations: Sequence[dict], metric: str) -> dict | None:
    """The evaluation record with the highest `metric` (the earliest of equals: a later one must improve on it
    strictly); None when no record has a finite value."""
    best = None
    for record in evaluations:
        value = record.get(metric)
        if value is not None and np.isfinite(value) and (best is None or value > best[metric]):
            best = record
    return best


@dataclasses.dataclass
class EarlyStopping:
    """`should_stop` of `run_loop`: stops when `metric` has not improved for `patience` evaluations and hands
    every new best state to `keep_best`.

    Attributes:
      metric: the evaluation record's key, e.g. 'eval/valid_accuracy' (higher is better).
      patience: evaluations without a strict improvement before stopping; 0 never stops (the best is still
        kept, so a run selects its best evaluation either way).
      keep_best: `(state, record) -> None`, called when the evaluation just made is the best so far (the state
        is the one evaluated, on the mesh; every process calls it).
    """

    metric: str
    patience: int
    keep_best: Callable[[state_lib.TrainState, dict], None]

    def __call__(self, state: state_lib.TrainState, evaluations: list[dict]) -> bool:
        best = best_evaluation(evaluations, self.metric)
        if best is None:
            return False
        if best is evaluations[-1]:
            self.keep_best(state, best)
        since_best = len(evaluations) - 1 - next(i for i, record in enumerate(evaluations) if record is best)
        return self.patience > 0 and since_best >= self.patience


# ================================================================================================ data slices
def data_shards(mesh: Mesh, global_batch_size: int) -> tuple[int, range]:
    """(number of data shards, the shards this process reads) for a global batch of `global_batch_size` rows.

    The rows of a step are one part per data shard, in shard order; shard s reads the pipeline's host slice s of
    the shard count (its own slice, order and bad-sample replacement). The shards are the mesh's batch shards
    (data x fsdp), so the rows of every step depend on the mesh alone, not on how many processes share it:
    2 processes x 4 devices train on the same rows as 1 process x 8 devices, and each row is read by one process
    only. When the processes or the batch do not divide the batch shards, each process is one shard.
    """
    count, processes = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
    if count % processes or global_batch_size % count:
        count = processes
    per_process = count // processes
    return count, range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def process_rows(batch_size: int, mesh: Mesh) -> range:
    """The rows of a global batch of `batch_size` that this process's devices hold: one contiguous block.

    A process featurises only these rows; `sharding.global_batch` joins the blocks of all processes in order.
    """
    if batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"batch_size={batch_size} is not a multiple of the {mesh.shape['data'] * mesh.shape['fsdp']}"
                         " devices of the mesh's data and fsdp axes; pick a batch_size they divide")
    indices = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
    blocks = sorted({index[0].indices(batch_size)[:2] for index in indices.values()})
    if any(stop != next_start for (_, stop), (next_start, _) in zip(blocks, blocks[1:])):
        raise ValueError(f"process {jax.process_index()} holds rows {blocks} of the batch, not one contiguous block; "
                         "build the mesh with each process's devices next to each other (sharding.make_mesh does)")
    return range(blocks[0][0], blocks[-1][1])


# ================================================================================================ host copies
def host_rows(array: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (all of it on a single process)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        array, mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))


def host_copy(tree: PyTree) -> PyTree:
    """NumPy copies of global arrays; a leaf sharded over processes is gathered (every process must call it)."""
    from jax.experimental import multihost_utils

    def to_host(leaf):
        if leaf.is_fully_addressable or leaf.is_fully_replicated:    # the same answer on every process
            return np.asarray(jax.device_get(leaf))
        return multihost_utils.process_allgather(leaf, tiled=True)
    return jax.tree.map(to_host, tree)


# ================================================================================================ outputs
def gather_json(value: Any) -> list[Any]:
    """The JSON-able `value` of every process, in process order (every process must call it; one process: [value])."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8)
    lengths = np.ravel(multihost_utils.process_allgather(np.asarray([encoded.size], dtype=np.int32)))
    padded = np.zeros(int(np.max(lengths)), dtype=np.uint8)
    padded[:encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(length)]).decode("utf-8")) for row, length in zip(gathered, lengths)]


def where_it_ran() -> dict[str, int]:
    """{'process_count', 'device_count'}: recorded in every summary and results file."""
    return {"process_count": jax.process_count(), "device_count": jax.device_count()}


def write_json(workdir: str | epath.Path, name: str, value: Any) -> None:
    """Writes `value` as `<workdir>/<name>` on process 0 only (other processes return at once), through epath so
    a `gs://` workdir works; written to a temporary name and renamed, so a reader never sees half a file."""
    if jax.process_index() != 0:
        return
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{name}.tmp"
    partial.write_text(json.dumps(value, indent=1, default=str), encoding="utf-8")
    partial.replace(folder / name)
