"""The symbolic solver: bracketing search, ambiguity, and agreement with every unambiguous released label."""
import pathlib

import pytest

from jaxalign.clutrr import reader, relations, solver

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clutrr"
requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"released CLUTRR data folder {DATA} is absent")

# Measured on the released zips: (rows, unambiguous, ambiguous). Every unambiguous row agrees with its label.
RELEASED_COUNTS = {
    "data_06b8f2a1": (10601, 10435, 166), "data_089907f8": (11240, 11112, 128),
    "data_523348e6": (10543, 10380, 163), "data_7c5b0e70": (10571, 10446, 125),
    "data_d83ecc3e": (10545, 10382, 163), "data_db9b8f04": (16131, 15887, 244),
}


def test_solution_needs_a_bracketing_other_than_left_to_right():
    # son . mother has no rule, but son . (mother . father) = child . inv-grand = inv-child.
    assert relations.compose("child", "inv-child") is None
    solution = solver.solve_path(["son", "mother", "father"])
    assert solution.labels == ("father",) and not solution.ambiguous and solution.label == "father"


def test_final_label_takes_the_tail_gender():
    assert solver.solve_path(["brother", "son"]).label == "nephew"
    assert solver.solve_path(["brother", "son"], tail_gender="female").label == "niece"
    assert solver.solve_path(["daughter", "daughter", "brother"]).label == "grandson"


def test_ambiguous_pattern_returns_every_candidate():
    # (wife . son) . grandmother = child . inv-grand = mother; wife . (son . grandmother) = SO . inv-child.
    solution = solver.solve_path(["wife", "son", "grandmother"])
    assert solution.ambiguous and solution.labels == ("mother", "mother-in-law") and solution.label is None


def test_unsolvable_path():
    solution = solver.solve_path(["husband", "wife"])
    assert not solution.solved and solution.labels == ()


@pytest.fixture(scope="module")
def released():
    """Reads each released zip at most once for this module."""
    cache = {}

    def rows_of(name):
        if name not in cache:
            files = reader.read_zip(DATA / f"{name}.zip")
            cache[name] = [row for rows in files.values() for row in rows]
        return cache[name]
    return rows_of


@requires_data
def test_solver_agrees_with_every_unambiguous_row_of_one_zip(released):
    rows = released("data_7c5b0e70")
    result = solver.agreement(rows)
    assert (result.rows, result.unambiguous, result.ambiguous) == RELEASED_COUNTS["data_7c5b0e70"]
    assert result.agree_unambiguous == result.unambiguous and result.disagreements == []
    assert result.target_among_ambiguous == result.ambiguous and result.unsolvable == 0
    assert [row.id for row in rows if solver.proof_problems(row)] == []


@requires_data
def test_solver_agrees_on_all_six_released_zips(released):
    for name, counts in RELEASED_COUNTS.items():
        result = solver.agreement(released(name))
        assert (result.rows, result.unambiguous, result.ambiguous) == counts, name
        assert result.agree_unambiguous == result.unambiguous, (name, result.disagreements)
        assert result.target_among_ambiguous == result.ambiguous and result.unsolvable == 0, name
