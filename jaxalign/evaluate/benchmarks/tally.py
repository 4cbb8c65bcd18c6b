"""Averages of per-question scores, overall and per group (answer type, split, subject), NaN-free.

Public API:
  fraction(numerator, denominator) -> float        (0.0 when the denominator is 0)
  GroupTally: .add(group, score) ; .result() -> {group: {"accuracy", "questions"}}
"""
from __future__ import annotations

import collections


def fraction(numerator: float, denominator: float) -> float:
    """numerator / denominator, and 0.0 for an empty denominator (a metric with nothing to count is 0, not an
    error: sklearn's `zero_division=0` convention)."""
    return float(numerator) / float(denominator) if denominator else 0.0


class GroupTally:
    """Sums of per-question scores (1.0 right, 0.0 wrong, or a soft score) per group."""

    def __init__(self):
        self.score_sum: collections.Counter = collections.Counter()
        self.count: collections.Counter = collections.Counter()

    def add(self, group: str, score: float) -> None:
        self.score_sum[str(group)] += float(score)
        self.count[str(group)] += 1

    def result(self) -> dict[str, dict[str, float | int]]:
        """{group: {"accuracy": mean score in [0, 1], "questions": count}}, groups sorted by name."""
        return {group: {"accuracy": fraction(self.score_sum[group], self.count[group]), "questions": self.count[group]}
                for group in sorted(self.count)}
