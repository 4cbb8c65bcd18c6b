"""Mean ± std over seeds and paired differences, against numbers worked out by hand."""
import math

import pytest

from jaxalign.evaluate import seed_stats


def test_summary_of_three_seeds():
    # mean (0.5 + 0.6 + 0.7) / 3 = 0.6; squared deviations 0.01 + 0 + 0.01 = 0.02; / (3 - 1) -> std 0.1;
    # se = 0.1 / sqrt(3) = 0.057735
    summary = seed_stats.summarise([0.5, 0.6, 0.7])
    assert summary["n"] == 3
    assert summary["mean"] == pytest.approx(0.6) and summary["std"] == pytest.approx(0.1)
    assert summary["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert seed_stats.format_mean_std(summary) == "0.600 ± 0.100"


def test_missing_and_single_values():
    assert seed_stats.summarise([None, float("nan"), 0.25]) == {"n": 1, "mean": 0.25, "std": None, "se": None,
                                                                "values": [0.25]}
    assert seed_stats.summarise([])["mean"] is None and seed_stats.format_mean_std(seed_stats.summarise([])) == "-"


def test_paired_difference_removes_what_the_seeds_share():
    # Arm a beats arm b by 0.04, 0.05, 0.06 on the same seeds, though both move by 0.2 between seeds:
    # differences mean 0.05, std 0.01, se 0.01 / sqrt(3) = 0.00577; 0.05 > 2 * 0.00577 -> exceeds.
    a, b = [0.54, 0.75, 0.36], [0.50, 0.70, 0.30]
    result = seed_stats.paired_difference(a, b)
    assert result["mean"] == pytest.approx(0.05) and result["std"] == pytest.approx(0.01)
    assert result["exceeds_2se"] is True
    # Unpaired, the same numbers would not separate: the arms' own stds are about 0.19 and 0.20.
    assert seed_stats.summarise(a)["std"] > 0.15


def test_a_difference_within_twice_its_error_does_not_exceed():
    # differences +0.1, -0.1, +0.05: mean 0.01667, std = sqrt(((0.0833)^2 + (0.1167)^2 + (0.0333)^2) / 2) = 0.1041,
    # se 0.0601; 0.0167 < 0.120 -> does not exceed.
    result = seed_stats.paired_difference([0.6, 0.4, 0.55], [0.5, 0.5, 0.5])
    assert result["mean"] == pytest.approx(0.1 / 6) and result["se"] == pytest.approx(0.10408 / math.sqrt(3), rel=1e-3)
    assert result["exceeds_2se"] is False
    assert seed_stats.paired_difference([0.6], [0.5])["exceeds_2se"] is False  # one pair: no error estimate
    with pytest.raises(ValueError, match="pair them by seed"):
        seed_stats.paired_difference([0.1, 0.2], [0.1])
