"""PNG plots of training runs: loss curves and an accuracy bar chart (matplotlib, Agg backend, no display).

Used by `jaxalign demo` and the notebooks. Both functions take plain data (lists of (step, loss) pairs and
accuracies in [0, 1]), so they plot any run, not only TinyAlign's. `path` may be local or a gs:// / s3:// URI.

Public API:
  plot_loss_curves(curves, path, title=..., smooth=1) -> path
  moving_average(values, window) -> list
  plot_accuracy_bars(accuracies, path, title=...) -> path
"""
from __future__ import annotations

import io
import math
import os
from typing import Mapping, Sequence

import matplotlib
from etils import epath

matplotlib.use("Agg")  # files only: works on headless machines and inside test processes
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
from matplotlib.ticker import FormatStrFormatter  # noqa: E402


def _finite_points(points: Sequence[Sequence[float]], name: str) -> tuple[list[float], list[float]]:
    steps, losses = [], []
    for point in points:
        if len(point) != 2:
            raise ValueError(f"loss curve {name!r}: each point must be (step, loss), got {point!r}")
        step, loss = float(point[0]), float(point[1])
        if math.isfinite(loss):
            steps.append(step)
            losses.append(loss)
    return steps, losses


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start), same length as `values`."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_loss_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: str,
                     title: str = "training loss", ylabel: str = "loss", smooth: int = 1) -> str:
    """One line per run: `curves` maps a run name to its (step, loss) points. Non-finite losses are not drawn
    (matplotlib would break the line there anyway); a run with no finite point is an error.

    With `smooth` > 1 each run is drawn as a trailing moving average over `smooth` points, over its raw points
    drawn faintly (per-step losses of small batches are noisy).

    Returns:
      `path`, the PNG written (its folder is created).
    """
    if not curves:
        raise ValueError("plot_loss_curves: no curves given")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        steps, losses = _finite_points(points, name)
        if not steps:
            plt.close(figure)
            raise ValueError(f"loss curve {name!r} has no finite point to draw")
        if smooth > 1 and len(losses) > smooth:
            line, = axes.plot(steps, moving_average(losses, smooth), label=f"{name} (mean of {smooth})")
            axes.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
            continue
        axes.plot(steps, losses, marker="." if len(steps) < 30 else None, label=name)
    drawn = [loss for points in curves.values() for loss in _finite_points(points, "")[1]]
    if min(drawn) > 0 and max(drawn) / min(drawn) > 10:
        axes.set_yscale("log")  # a fast first drop would otherwise flatten the part worth comparing
        axes.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        axes.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_accuracy_bars(accuracies: Mapping[str, Mapping[str, float]], path: str,
                       title: str = "eval accuracy",
                       errors: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Grouped bars: `accuracies[run][group]` in [0, 1] (groups such as 'overall', 'color', 'shape'), one group
    of bars per group name, one colour per run. Missing (run, group) pairs are left empty. `errors[run][group]`,
    when given, draws an error bar of that half-length (e.g. the std over seeds).

    Returns:
      `path`, the PNG written.
    """
    if not accuracies:
        raise ValueError("plot_accuracy_bars: no accuracies given")
    groups = list(dict.fromkeys(group for values in accuracies.values() for group in values))
    for run, values in accuracies.items():
        for group, value in values.items():
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"accuracy of {run!r} / {group!r} is {value}; expected a value in [0, 1]")
    runs = list(accuracies)
    width = 0.8 / len(runs)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.5))
    for index, run in enumerate(runs):
        positions = [group_index + (index - (len(runs) - 1) / 2) * width for group_index in range(len(groups))]
        heights = [float(accuracies[run].get(group, float("nan"))) for group in groups]
        spread = None
        if errors and run in errors:
            spread = [float(errors[run].get(group) or 0.0) for group in groups]
        axes.bar(positions, heights, width=width, label=run, yerr=spread, capsize=2 if spread else 0)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(groups)
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    return _save(figure, path)


def _save(figure, path: str) -> str:
    destination = epath.Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    # Rendered in memory, then written through epath: matplotlib itself only writes local files.
    image = io.BytesIO()
    figure.savefig(image, dpi=110, format=os.path.splitext(path)[1][1:].lower() or None)
    plt.close(figure)
    destination.write_bytes(image.getvalue())
    return path
