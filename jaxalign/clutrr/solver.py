"""Symbolic CLUTRR solver: the kinship relation a path of edges implies under the composition rules.

A left-to-right fold of a long path is often undefined (``son . mother`` has no rule, while ``son . (mother .
father)`` does), and the released labels follow each row's proof tree. So the solver searches over every
bracketing of the path: dynamic programming over spans, where ``derivable[i][j]`` holds every relation type that
some bracketing of edges i..j-1 composes to. The final label is the gendered form of the full span's relation,
gendered by the query's tail person. A row is ambiguous when the full span has more than one derivable relation
(a few k >= 3 patterns, such as father vs father-in-law).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from jaxalign.clutrr import relations
from jaxalign.clutrr.reader import ClutrrRow


@dataclasses.dataclass(frozen=True)
class Solution:
    """What the rules derive for one path.

    Attributes:
      relations: every relation type derivable over the whole path, sorted.
      labels: their gendered labels (tail's gender), in the same order.
      ambiguous: more than one relation is derivable.
    """

    relations: tuple[str, ...]
    labels: tuple[str, ...]

    @property
    def ambiguous(self) -> bool:
        return len(self.relations) > 1

    @property
    def solved(self) -> bool:
        return bool(self.relations)

    @property
    def label(self) -> str | None:
        """The single label of an unambiguous, solvable path; None otherwise."""
        return self.labels[0] if len(self.labels) == 1 else None


def derivable_relations(path_relations: Sequence[str]) -> tuple[str, ...]:
    """Every relation type some bracketing of ``path_relations`` (ungendered types) composes to, sorted."""
    count = len(path_relations)
    if count == 0:
        raise ValueError("a path needs at least one edge")
    # derivable[start][end]: relation types of the span path_relations[start:end].
    derivable = [[frozenset()] * (count + 1) for _ in range(count + 1)]
    for start, relation in enumerate(path_relations):
        if relation not in relations.GENDERED_LABELS:
            raise ValueError(f"unknown relation type {relation!r} at position {start}")
        derivable[start][start + 1] = frozenset({relation})
    for length in range(2, count + 1):
        for start in range(count - length + 1):
            end = start + length
            found = set()
            for middle in range(start + 1, end):
                for first in derivable[start][middle]:
                    for second in derivable[middle][end]:
                        result = relations.COMPOSITION_RULES.get((first, second))
                        if result is not None:
                            found.add(result)
            derivable[start][end] = frozenset(found)
    return tuple(sorted(derivable[0][count]))


def solve_path(path_labels: Sequence[str], tail_gender: str | None = None) -> Solution:
    """Solves a path given as gendered edge labels (``['son', 'mother', 'father']``).

    Args:
      path_labels: labels of the path's edges, from the query's head to its tail.
      tail_gender: gender of the query's tail; by default that of the last edge's tail (the same person).
    """
    if tail_gender is None:
        tail_gender = relations.LABEL_TO_GENDER[path_labels[-1]]
    found = derivable_relations([relations.relation_type(label) for label in path_labels])
    return Solution(relations=found, labels=tuple(relations.gendered_label(r, tail_gender) for r in found))


def solve_row(row: ClutrrRow) -> Solution:
    """Solves a row from its symbolic graph (path edge labels and the query tail's gender)."""
    return solve_path(row.edge_types, row.genders[row.query_edge[1]][1])


@dataclasses.dataclass
class Agreement:
    """How the solver's labels compare with the rows' target labels."""

    rows: int = 0
    unambiguous: int = 0
    agree_unambiguous: int = 0
    ambiguous: int = 0
    target_among_ambiguous: int = 0
    unsolvable: int = 0
    disagreements: list[str] = dataclasses.field(default_factory=list)

    @property
    def accuracy_unambiguous(self) -> float:
        return self.agree_unambiguous / self.unambiguous if self.unambiguous else float("nan")

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["accuracy_unambiguous"] = self.accuracy_unambiguous
        return fields


def agreement(rows: Iterable[ClutrrRow], max_listed: int = 20) -> Agreement:
    """Counts agreement of the solver with the target labels.

    Unambiguous rows count as agreeing when the single derived label equals the target; ambiguous rows are
    counted apart, with how often the target is among the candidates. Up to ``max_listed`` disagreeing rows are
    described (id, pattern, target, derived).
    """
    result = Agreement()
    for row in rows:
        solution = solve_row(row)
        result.rows += 1
        if not solution.solved:
            result.unsolvable += 1
            if len(result.disagreements) < max_listed:
                result.disagreements.append(f"{row.id} {row.f_comb}: target {row.target}, no rule applies")
        elif solution.ambiguous:
            result.ambiguous += 1
            result.target_among_ambiguous += row.target in solution.labels
        else:
            result.unambiguous += 1
            if solution.label == row.target:
                result.agree_unambiguous += 1
            elif len(result.disagreements) < max_listed:
                result.disagreements.append(f"{row.id} {row.f_comb}: target {row.target}, solver {solution.label}")
    return result


def proof_problems(row: ClutrrRow) -> list[str]:
    """Proof steps of a row that the composition rules do not justify, and a wrong proof conclusion.

    Each step ``(x, r, z): [(x, r1, y), (y, r2, z)]`` must satisfy r1 . r2 = r (ungendered), and the first step
    must conclude the query with the target label. Empty for a sound proof.
    """
    problems = []
    steps = relations.parse_proof_state(list(row.proof_state))
    if steps and (steps[0][0][0], steps[0][0][2]) != tuple(row.query):
        problems.append(f"first proof step concludes {steps[0][0]}, not the query {row.query}")
    if steps and steps[0][0][1] != row.target:
        problems.append(f"first proof step concludes {steps[0][0][1]!r}, not the target {row.target!r}")
    for (head, label, tail), premises in steps:
        if len(premises) != 2:
            problems.append(f"step {(head, label, tail)} has {len(premises)} premises, expected 2")
            continue
        (_, first, _), (_, second, _) = premises
        derived = relations.compose(relations.relation_type(first), relations.relation_type(second))
        if derived != relations.relation_type(label):
            problems.append(f"step {(head, label, tail)}: {first} . {second} gives {derived}, not {label}")
    return problems
