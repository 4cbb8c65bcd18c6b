"""Training metrics on disk: JSON lines (`metrics.jsonl`) and TensorBoard event files, side by side.

Every `write(step, metrics)` appends one line `{"step": 12, "loss": 2.31, ...}` to `<workdir>/metrics.jsonl`
(easy to read back with `read_metrics`, plot, or grep) and one scalar per metric to the TensorBoard event file
in `<workdir>/tensorboard/`. Values may be Python numbers, NumPy or JAX scalars; they are fetched to the host.
Only process 0 writes in a multi-process run.

Public API:
  MetricWriter(workdir, tensorboard=True)  .write(step, metrics)  .flush()  .close()  (also a context manager)
  read_metrics(workdir) -> list[dict]
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _to_float(value: Any) -> float:
    return float(np.asarray(jax.device_get(value)))


class MetricWriter:
    """Appends scalar metrics of a run to `<workdir>/metrics.jsonl` and TensorBoard events."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.workdir = workdir
        self._active = jax.process_index() == 0
        self._file = None
        self._summary = None
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
            self._summary = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` (name -> scalar) at `step`."""
        if not self._active:
            return
        values = {name: _to_float(value) for name, value in metrics.items()}
        # json writes NaN / Infinity tokens, which Python's json reads back; keep them visible rather than drop.
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._summary is not None:
            for name, value in values.items():
                self._summary.add_scalar(name, value, int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._summary is not None:
            self._summary.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._summary is not None:
            self._summary.close()
            self._summary = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
