"""The generic training loop: resume, step, log, evaluate, checkpoint, stop on a non-finite loss.

Trainers (TinyAlign stages, CLUTRR distillation) build their state, jitted step and data, then call `train`.
The loop owns everything that is the same for all of them:

  * exact resume: the latest checkpoint in `<workdir>/checkpoints` is restored (params, optimizer state, step
    and random key; a learning-rate horizon held in the optimizer state, `horizon_schedule`, comes from the
    run's config instead) and the batch iterator is created from the restored step (`batch_iterator_factory(step)`),
    so an interrupted and resumed run sees the same batches and keys, and ends with the same parameters, as
    an uninterrupted one. A *resumable* iterator (one with a JSON-able `state` property: its position after the
    last batch it yielded) is asked for its state at every checkpoint; each process's state is stored in the
    checkpoint's JSON extra (`extra['data_iterator_state'] = {'process_count', 'processes': [state per
    process]}`) and handed back on resume as `batch_iterator_factory(step, start_state=state)`, so the iterator
    restores its position without replaying steps 0..step-1. An iterator whose state is keyed by data shard
    (`{'shards': {shard number: state}}`) gets the states of every process merged into one, so a run resumed on
    another number of processes over the same shards continues each shard where it stopped (the factory picks
    its shards). Checkpoints without a state (older ones), or with per-process states saved by another process
    count, resume by `batch_iterator_factory(step)`;
  * prefetch (trainers pass `prefetch=2`): batches are taken from the iterator that many ahead on a background thread
    (`jaxalign.data.prefetch.Prefetcher`: the iterator's decoding and device placement overlap the step); the
    state saved is that of the batch the checkpointed step consumed, not of the read-ahead;
  * no host synchronisation per step: the step's metrics stay on the device and are pulled to the host, all
    the steps since the last pull in one transfer (`_pull_metrics`), only at log steps and at the steps that
    need a known-good state (checkpoint, evaluation, preemption, the last step). One exception: on XLA:CPU with
    several devices (fake meshes in tests) each step is waited for before the next is dispatched, because
    overlapping programs with collectives can hang there (`jaxalign.sharding.steps_need_lockstep`);
  * the resolved config is written to `<workdir>/config.json` at start;
  * metrics go to `<workdir>/metrics.jsonl` and TensorBoard; a progress bar shows loss, examples/s and ETA;
  * a NaN or infinite loss raises `NonFiniteLossError` naming the first step that produced one; it is seen at
    the next pull (at most `log_every` steps later, always before a checkpoint or evaluation), and the bad state
    is not saved, so the last checkpoint written stays the latest good one;
  * checkpoints every `checkpoint_every` steps and at the end (async, keep-last-N);
  * preemption: SIGTERM (a scheduler's preemption notice) to any process ends the run after the current step:
    every process saves a checkpoint at the same step N, logs "preempted at step N, checkpoint saved in ..." and
    `train` raises `TrainingPreempted`, a `SystemExit` with code 143 (`PREEMPTED_EXIT_CODE`, 128 + SIGTERM, the
    status schedulers expect from a process ended by SIGTERM; non-zero so that a preempted run is never taken
    for a finished one), so the command exits without a traceback and rerunning it resumes. Processes agree on
    N through JAX's preemption sync manager (`multihost_utils.reached_preemption_sync_point`: the coordination
    service's own SIGTERM notifier plus a background protocol that picks the step after the furthest one any
    process reached; a local check per step, no collective). A single process (no `jax.distributed`) uses its
    own SIGTERM handler and stops after the step it is in. Only when the preemption service is disabled
    (`jax_enable_preemption_service=False`) do processes agree by all-gathering their flag, every step;
  * a corrupt latest checkpoint is skipped on resume (see `Checkpointer.restore_latest`);
  * early stopping: every evaluation record ({'step', 'eval/<name>': value}) of the run is kept in
    `TrainResult.evaluations` and in every checkpoint's extra (`extra['evaluations']`), so a resumed run knows
    the evaluations before its checkpoint. After each evaluation `should_stop(state, evaluations)` (the state just
    evaluated, every record so far) may end the run at that step: a checkpoint of the step is saved with
    `extra['stopped_at']`, and rerunning the command restores it and trains no further (`TrainResult.stopped_at`).
    The callable may also keep what it needs of the state (e.g. the best parameters so far).

Step numbering: "step n" is the state after n updates (`state.step == n`); metrics and checkpoints of step n
describe that state.

A process that dies (kill -9, lost host) is detected by the JAX coordination service: after
`JAXALIGN_HEARTBEAT_TIMEOUT` seconds without its heartbeat the others are terminated by the runtime instead of
waiting in a collective forever (see tests/test_train_faults.py for what a survivor prints).

Public API:
  train(*, state, train_step, batch_iterator_factory, total_steps, workdir, ...)
      -> TrainResult(state, history, evaluations, stopped_at)
  NonFiniteLossError(step, metrics)
  TrainingPreempted(step, directory);  PREEMPTED_EXIT_CODE = 143
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxalign import sharding
from jaxalign.configs.base import save_resolved_config
from jaxalign.data.prefetch import Prefetcher
from jaxalign.train import horizon_schedule
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.metrics import MetricWriter
from jaxalign.train.progress import TrainProgress
from jaxalign.train.state import TrainState

PyTree = Any
log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143
ITERATOR_STATE = "data_iterator_state"  # the checkpoint extra's key of the batch iterators' states
EVALUATIONS = "evaluations"  # the checkpoint extra's key of the run's evaluation records
STOPPED_AT = "stopped_at"  # the checkpoint extra's key of the step at which `should_stop` ended the run


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; `step` is the update that produced it (1-based, like checkpoints)."""

    def __init__(self, step: int, metrics: dict[str, float], last_good_checkpoint: int | None, directory: str):
        self.step = step
        self.metrics = metrics
        self.last_good_checkpoint = last_good_checkpoint
        kept = (f"the last good checkpoint is step {last_good_checkpoint} in {directory}"
                if last_good_checkpoint is not None else f"no checkpoint was written yet in {directory}")
        super().__init__(f"non-finite loss {metrics.get('loss')} at step {step} (metrics {metrics}); training "
                         f"stopped and the bad state was not saved; {kept}. Lower the learning rate, check the "
                         "batch of that step, or resume from the checkpoint.")


class TrainingPreempted(SystemExit):
    """SIGTERM arrived: a checkpoint of `step` was saved by every process; exits with `PREEMPTED_EXIT_CODE`."""

    def __init__(self, step: int, directory: str):
        self.step = step
        self.directory = directory
        self.message = (f"preempted at step {step}, checkpoint saved in {directory}/{step}; rerun the same command "
                        "to resume")
        super().__init__(PREEMPTED_EXIT_CODE)

    def __str__(self) -> str:
        return self.message


class _PreemptionNotice:
    """Whether a preemption notice (SIGTERM to any process) has reached every process at a given step.

    `reached(step)` must be called at every step, by every process, with the same step numbers.
    """

    def __init__(self):
        self._received = False
        self._previous_handler = None
        self._use_jax_sync = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        # With jax.distributed the runtime installs its own SIGTERM notifier; a Python handler would replace it.
        if not self._use_jax_sync and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM received: stopping after the current step and saving a checkpoint")
        self._received = True

    def reached(self, step: int) -> bool:
        if self._use_jax_sync:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() > 1:
            return bool(np.any(multihost_utils.process_allgather(np.asarray(self._received))))
        return self._received

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


@dataclasses.dataclass
class TrainResult:
    """Final state and the metrics logged every `log_every` steps (dicts with 'step').

    `evaluations` are the run's evaluation records ({'step', 'eval/<name>'}), those before a resume included;
    `stopped_at` is the step at which `should_stop` ended the run (None when it ran to `total_steps`).
    """

    state: TrainState
    history: list[dict[str, float]]
    evaluations: list[dict[str, float]] = dataclasses.field(default_factory=list)
    stopped_at: int | None = None


def train(*, state: TrainState, train_step: Callable[[TrainState, PyTree], tuple[TrainState, dict]],
          batch_iterator_factory: Callable[[int], Iterator[PyTree]], total_steps: int, workdir: str,
          log_every: int = 10, checkpoint_every: int = 100, keep: int = 3, config: Any = None,
          eval_fn: Callable[[TrainState], dict[str, float]] | None = None, eval_every: int | None = None,
          checkpoint_trainable_mask: PyTree | None = None, examples_per_step: int | None = None,
          async_checkpoints: bool = True, progress: bool | None = None, prefetch: int = 0,
          should_stop: Callable[[TrainState, list[dict[str, float]]], bool] | None = None) -> TrainResult:
    """Runs (or resumes) training until `state.step == total_steps`, or until `should_stop` ends it.

    Args:
      state: a freshly initialised state, already placed on the mesh; also the restore target (its shardings,
        and its frozen params when `checkpoint_trainable_mask` is set).
      train_step: jitted `(state, batch) -> (state, metrics)` with a scalar 'loss' in metrics.
      batch_iterator_factory: `start_step -> iterator of global batches` starting at batch `start_step`; if
        its iterators have a `state` property (JSON-able), it is also called as `(start_step, start_state=...)`
        with a state saved at `start_step` (see the module docstring).
      total_steps: number of updates of the whole run.
      workdir: run directory (config.json, metrics.jsonl, tensorboard/, checkpoints/).
      log_every: metrics are written and kept in the history every this many steps (and at the last one).
      checkpoint_every: a checkpoint every this many steps; one is always written at the end.
      keep: checkpoints kept.
      config: the resolved config (ConfigDict or dict) to save as config.json and in checkpoint extras.
      eval_fn: `state -> dict of metrics`, run every `eval_every` steps and at the end; logged as 'eval/<name>'.
      checkpoint_trainable_mask: if given, frozen params are not written to checkpoints (see Checkpointer).
      examples_per_step: global batch size, for the examples/s throughput shown and logged.
      async_checkpoints: save in the background (waited for before returning or raising).
      progress: show a progress bar (None: only on a terminal).
      prefetch: batches prepared ahead on a background thread (0, the default: none, the iterator runs in this
        thread, in step with the loop). The iterator must not run collectives across processes when prefetched
        (see `jaxalign.data.prefetch`); the trainers pass 2.
      should_stop: `(state, evaluations) -> bool`, called after every evaluation with the state evaluated and all
        evaluation records so far (restored ones included); True ends the run at that step, with a checkpoint
        (see the module docstring). Must give the same answer on every process.

    Raises:
      NonFiniteLossError: the loss became NaN or infinite.
      TrainingPreempted: SIGTERM arrived; a checkpoint of the step reached was saved (exit code 143).
      UnreadableCheckpointError: checkpoints exist but none can be restored.
    """
    # --- run directory and config (through epath: a gs:// workdir stays one, written once) ----------------------
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if config is not None and jax.process_index() == 0:
        save_resolved_config(config, workdir)
    checkpoint_dir = os.fspath(epath.Path(workdir) / "checkpoints")
    checkpointer = Checkpointer(checkpoint_dir, keep=keep, trainable_mask=checkpoint_trainable_mask,
                                async_saves=async_checkpoints)

    # --- resume ------------------------------------------------------------------------------------------------
    fresh_opt_state = state.opt_state
    restored = checkpointer.restore_latest(state)
    iterator_state = None
    evaluations: list[dict[str, float]] = []
    stopped_at: int | None = None
    if restored is not None:
        state, extra = restored
        # A schedule's horizon held in the optimizer state is the run's setting: the config's, not the checkpoint's.
        state = state.replace(opt_state=horizon_schedule.keep_horizon(state.opt_state, fresh_opt_state))
        log.info("resumed from %s at step %d (checkpoint extras: %s)", checkpoint_dir, int(state.step),
                 sorted(extra))
        iterator_state = _own_iterator_state(extra.get(ITERATOR_STATE))
        evaluations = list(extra.get(EVALUATIONS) or [])
        stopped_at = extra.get(STOPPED_AT)
        if stopped_at is not None:
            log.info("the run was stopped early at step %d (should_stop); not training further", stopped_at)
    start_step = int(state.step)
    last_step = start_step if stopped_at is not None else total_steps
    if iterator_state is not None:
        batches = batch_iterator_factory(start_step, start_state=iterator_state)
    else:
        batches = batch_iterator_factory(start_step)
    resumable = _has_state(batches)

    # --- observability -----------------------------------------------------------------------------------------
    writer = MetricWriter(workdir)
    bar = TrainProgress(total_steps, start_step, examples_per_step, disable=None if progress is None else not progress)
    history: list[dict[str, float]] = []

    def eval_and_log(step: int) -> bool:
        """Evaluates, logs and records the state of `step`; returns `should_stop`'s answer (False without one)."""
        results = {f"eval/{name}": float(value) for name, value in eval_fn(state).items()}
        writer.write(step, results)
        history.append({"step": step, **results})
        evaluations.append({"step": step, **results})
        return bool(should_stop(state, evaluations)) if should_stop is not None else False

    def save_checkpoint(step: int, force: bool = False, stopped: bool = False) -> None:
        extra = {"step": step, "next_batch_index": step, EVALUATIONS: evaluations}
        if stopped:
            extra[STOPPED_AT] = step
        if resumable:
            extra[ITERATOR_STATE] = _gathered_iterator_state(batches.state)
        if config is not None:
            extra["config"] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        checkpointer.save(step, state, extra=_json_safe(extra), force=force)

    # --- loop --------------------------------------------------------------------------------------------------
    preemption = _PreemptionNotice()
    if prefetch:  # after the SIGTERM handler is in place: the thread starts reading at once
        batches = Prefetcher(batches, prefetch)
    pending: list[tuple[int, dict]] = []  # (step, metrics still on the device) since the last pull
    lockstep = sharding.steps_need_lockstep()
    last_loss: float | None = None
    try:
        for step in range(start_step + 1, last_step + 1):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"the batch iterator ran out before step {step} of {total_steps}; make "
                    "batch_iterator_factory yield at least total_steps batches (repeat epochs)") from None
            state, metrics = train_step(state, batch)
            if lockstep:  # XLA:CPU with several devices: see sharding.steps_need_lockstep
                jax.block_until_ready((state, metrics))
            pending.append((step, metrics))
            logging_step = step % log_every == 0 or step == total_steps
            evaluating = eval_fn is not None and eval_every and step % eval_every == 0 and step != total_steps
            checkpointing = step % checkpoint_every == 0 or step == total_steps
            preempted = preemption.reached(step) and step != total_steps

            if logging_step or evaluating or checkpointing or preempted:
                # The one host synchronisation: every pending step's metrics in one transfer, checked before
                # anything logs, evaluates or saves the state they led to.
                pulled = _pull_metrics([device_metrics for _, device_metrics in pending])
                for pending_step, record in zip([s for s, _ in pending], pulled):
                    if not math.isfinite(record["loss"]):
                        checkpointer.wait()
                        raise NonFiniteLossError(pending_step, record, checkpointer.latest_step(), checkpoint_dir)
                pending, record = [], pulled[-1]
                last_loss = record["loss"]
                if logging_step:
                    writer.write(step, record)
                    history.append({"step": step, **record})
            bar.update(step, last_loss)

            if evaluating and eval_and_log(step):
                stopped_at = step
                log.info("stopping early at step %d of %d (should_stop)", step, total_steps)
                save_checkpoint(step, force=True, stopped=True)
                break
            if checkpointing:
                save_checkpoint(step)
            if preempted:
                if step % checkpoint_every != 0:
                    save_checkpoint(step, force=True)
                checkpointer.wait()
                preempted = TrainingPreempted(step, checkpoint_dir)
                log.warning("%s", preempted.message)
                raise preempted

        # --- final evaluation ----------------------------------------------------------------------------------
        if eval_fn is not None and stopped_at is None and int(state.step) == total_steps:
            eval_and_log(total_steps)
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
        preemption.close()
        bar.close()
        writer.close()
        checkpointer.close()
    return TrainResult(state=state, history=history, evaluations=evaluations, stopped_at=stopped_at)


def _pull_metrics(metrics: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The steps' device metrics as floats, copied to the host in one transfer (the loop's only per-interval
    synchronisation; tests count its calls)."""
    return [{name: float(value) for name, value in step_metrics.items()}
            for step_metrics in jax.device_get(metrics)]


def _has_state(iterator: Any) -> bool:
    try:
        iterator.state
    except AttributeError:
        return False
    return True


def _gathered_iterator_state(local_state: Any) -> dict[str, Any]:
    """{'process_count', 'processes': [the state of each process's iterator]} (the extra is written by one
    process only, so every process's state goes into it). Called by every process at the same step."""
    if jax.process_count() == 1:
        return {"process_count": 1, "processes": [local_state]}
    encoded = np.frombuffer(json.dumps(local_state).encode("utf-8"), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([encoded.size], dtype=np.int32))
    padded = np.zeros(int(np.max(lengths)), dtype=np.uint8)
    padded[:encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return {"process_count": jax.process_count(),
            "processes": [json.loads(bytes(row[:int(length)]).decode("utf-8"))
                          for row, length in zip(gathered, np.ravel(lengths))]}


def _own_iterator_state(saved: Any) -> Any:
    """This process's iterator state from a checkpoint's extra: the merged shard states when every process saved
    `{'shards': {...}}` (any process count), else the state this process index saved with the same process
    count; None (replay from the step) otherwise."""
    if not isinstance(saved, dict) or "processes" not in saved:
        return None
    states = saved["processes"]
    if states and all(isinstance(state, dict) and set(state) == {"shards"} for state in states):
        merged: dict[str, Any] = {}
        for state in states:
            merged.update(state["shards"])
        return {"shards": merged}
    if saved.get("process_count") != jax.process_count():
        log.warning("the checkpoint's data iterator state is from %s processes, this run has %d: the iterator "
                    "replays the steps before the checkpoint instead", saved.get("process_count"),
                    jax.process_count())
        return None
    return saved["processes"][jax.process_index()]


def _json_safe(value: Any) -> Any:
    """Best-effort JSON form of a checkpoint extra (tuples to lists, unknown objects to strings)."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
