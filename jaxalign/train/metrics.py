"""Training metrics on disk: JSON lines (`metrics.jsonl`) and TensorBoard event files, side by side.

Every `write(step, metrics)` appends one line `{"step": 12, "loss": 2.31, ...}` to `<workdir>/metrics.jsonl`
(easy to read back with `read_metrics`, plot, or grep) and one scalar per metric to the TensorBoard event file
in `<workdir>/tensorboard/`. Values may be Python numbers, NumPy or JAX scalars; they are fetched to the host.
Only process 0 writes in a multi-process run.

`workdir` may be local or a `gs://` / `s3://` URI (through `etils.epath`). Object stores cannot append to an
object, and an object being written appears only when it is closed, so there every `write` rewrites the whole
`metrics.jsonl` (lines already there, from a run being resumed, are kept): a preempted run loses no line.

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
from etils import epath

from jaxalign import paths

METRICS_FILE = "metrics.jsonl"


def _to_float(value: Any) -> float:
    return float(np.asarray(jax.device_get(value)))


class MetricWriter:
    """Appends scalar metrics of a run to `<workdir>/metrics.jsonl` and TensorBoard events."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.workdir = workdir
        self._active = jax.process_index() == 0
        self._file = None
        self._remote_lines: list[str] | None = None  # object stores: the whole file, rewritten on each write
        self._summary = None
        if not self._active:
            return
        folder = epath.Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
        self._path = folder / METRICS_FILE
        if paths.is_remote(folder):
            self._remote_lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
        else:
            self._file = self._path.open("a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
            # a string: tensorboardX writes gs:// and s3:// logdirs itself
            self._summary = SummaryWriter(os.fspath(folder / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` (name -> scalar) at `step`."""
        if not self._active:
            return
        values = {name: _to_float(value) for name, value in metrics.items()}
        # json writes NaN / Infinity tokens, which Python's json reads back; keep them visible rather than drop.
        line = json.dumps({"step": int(step), **values}) + "\n"
        if self._remote_lines is not None:
            self._remote_lines.append(line)
            self._path.write_text("".join(self._remote_lines))
        else:
            self._file.write(line)
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


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl` (a local folder or a gs:// / s3:// URI), in order."""
    text = (epath.Path(workdir) / METRICS_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
