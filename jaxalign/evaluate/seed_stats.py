"""Results over seeds: mean ± std per arm, and paired differences that say whether two arms differ.

A single run is not a comparison: the demo's cells move by ±0.15 between runs whose floating-point rounding
differs in the last bit. Runs are therefore repeated over seeds, and two arms are compared *paired by seed* (the
same seed draws the same training subset, data order and test questions for both), which removes the variance
they share:

    d_s = metric(arm A, seed s) - metric(arm B, seed s)
    mean difference = mean_s d_s,   standard error = std_s(d_s, ddof=1) / sqrt(n)

A difference "exceeds twice its standard error" when |mean| > 2 SE (about a 95% interval excluding zero for
large n; with 3 seeds the SE itself is uncertain, so treat it as a screen, not a test).

Public API:
  summarise(values) -> {'n', 'mean', 'std', 'se', 'values'}   (std with ddof=1; None when undefined)
  paired_difference(a, b) -> {'n', 'mean', 'std', 'se', 'exceeds_2se', 'differences'}
  format_mean_std(summary, digits=3) -> '0.512 ± 0.031'
"""
from __future__ import annotations

import math
from typing import Sequence


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(value) for value in values if value is not None and math.isfinite(float(value))]


def summarise(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation (ddof=1) and standard error of the finite `values`."""
    kept = _finite(values)
    n = len(kept)
    mean = sum(kept) / n if n else None
    std = math.sqrt(sum((value - mean) ** 2 for value in kept) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "se": std / math.sqrt(n) if std is not None else None,
            "values": kept}


def paired_difference(a: Sequence[float | None], b: Sequence[float | None]) -> dict:
    """a - b per position (seed), over the positions where both are finite; its mean, std, SE, and whether
    |mean| exceeds twice the SE (False when the SE is undefined, i.e. fewer than 2 pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values against {len(b)}; pair them by seed")
    differences = [float(x) - float(y) for x, y in zip(a, b)
                   if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    summary = summarise(differences)
    exceeds = bool(summary["se"] is not None and summary["se"] > 0 and abs(summary["mean"]) > 2 * summary["se"])
    if summary["se"] == 0 and summary["n"] > 1 and summary["mean"] != 0:
        exceeds = True  # every pair differs by the same non-zero amount
    return {"n": summary["n"], "mean": summary["mean"], "std": summary["std"], "se": summary["se"],
            "exceeds_2se": exceeds, "differences": differences}


def format_mean_std(summary: dict, digits: int = 3) -> str:
    """'mean ± std' ('mean' alone for one value, '-' for none)."""
    if summary.get("mean") is None:
        return "-"
    if summary.get("std") is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
