"""A tqdm progress bar for training: step count, loss, throughput (examples / s) and ETA.

tqdm supplies the ETA from the step rate; the bar adds the loss and examples per second to its postfix.
It is disabled automatically when stderr is not a terminal (logs stay clean) unless `disable=False`.

Public API:
  TrainProgress(total_steps, initial_step=0, examples_per_step=None, disable=None)
    .update(step, loss=None, **postfix)  .close()
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class TrainProgress:
    """Progress of a training run from `initial_step` to `total_steps`."""

    def __init__(self, total_steps: int, initial_step: int = 0, examples_per_step: int | None = None,
                 disable: bool | None = None, description: str = "train"):
        if disable is None:
            disable = not sys.stderr.isatty()
        self.examples_per_step = examples_per_step
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, unit="step", disable=disable,
                         dynamic_ncols=True)
        self._last_step = initial_step
        self._last_time = time.perf_counter()

    def update(self, step: int, loss: float | None = None, **postfix: float) -> None:
        """Moves the bar to `step` (steps done) and shows the loss and throughput since the last update."""
        now = time.perf_counter()
        steps = step - self._last_step
        shown = {}
        if loss is not None:
            shown["loss"] = f"{float(loss):.4f}"
        if self.examples_per_step and steps > 0 and now > self._last_time:
            shown["examples/s"] = f"{steps * self.examples_per_step / (now - self._last_time):.1f}"
        shown.update({name: f"{float(value):.4g}" for name, value in postfix.items()})
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(steps)
        self._last_step, self._last_time = step, now

    def close(self) -> None:
        self._bar.close()
