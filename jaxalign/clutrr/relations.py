"""CLUTRR kinship relations and their composition rules, as data.

A relation type is ungendered (``child``); its surface label is gendered by the *tail* person of the edge: an
edge ``(a, r, b)`` means "b is a's r", so ``child`` reads ``son`` when b is male and ``daughter`` when b is
female. The composition table says that ``(x r1 y)`` and ``(y r2 z)`` give ``(x r3 z)``; it is the rule set of
the CLUTRR generator (Sinha et al., EMNLP 2019), read from its released code and checked against the proofs in
the released data (``derive_gendered_pair_table``).

The design notes speak of twelve relation types but name eleven; the eleven named ones are all the generator
and the released data ever use (``sibling-in-law`` itself is never produced), so this module defines those.
"""
from __future__ import annotations

import ast
import csv
import io
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping

MALE = "male"
FEMALE = "female"
GENDERS = (MALE, FEMALE)

# Relation type -> (label when the tail is male, label when the tail is female).
GENDERED_LABELS: dict[str, tuple[str, str]] = {
    "child": ("son", "daughter"),
    "inv-child": ("father", "mother"),
    "SO": ("husband", "wife"),
    "sibling": ("brother", "sister"),
    "grand": ("grandson", "granddaughter"),
    "inv-grand": ("grandfather", "grandmother"),
    "in-law": ("son-in-law", "daughter-in-law"),
    "inv-in-law": ("father-in-law", "mother-in-law"),
    "sibling-in-law": ("brother-in-law", "sister-in-law"),
    "un": ("nephew", "niece"),
    "inv-un": ("uncle", "aunt"),
}
RELATION_TYPES: tuple[str, ...] = tuple(GENDERED_LABELS)

# Every surface label, in a fixed order (class ids for models): 22 labels, of which the released data uses 18.
LABELS: tuple[str, ...] = tuple(label for pair in GENDERED_LABELS.values() for label in pair)
LABEL_TO_TYPE: dict[str, str] = {
    label: relation for relation, pair in GENDERED_LABELS.items() for label in pair}
LABEL_TO_GENDER: dict[str, str] = {
    label: gender for pair in GENDERED_LABELS.values() for label, gender in zip(pair, GENDERS)}

# (r1, r2) -> r3: (x r1 y) and (y r2 z) give (x r3 z).
COMPOSITION_RULES: dict[tuple[str, str], str] = {
    ("child", "child"): "grand",
    ("child", "SO"): "in-law",
    ("child", "sibling"): "child",
    ("child", "inv-un"): "sibling",
    ("child", "inv-grand"): "inv-child",
    ("inv-child", "child"): "sibling",
    ("inv-child", "inv-child"): "inv-grand",
    ("inv-child", "sibling"): "inv-un",
    ("SO", "inv-child"): "inv-in-law",
    ("SO", "grand"): "grand",
    ("SO", "child"): "child",
    ("sibling", "sibling"): "sibling",
    ("sibling", "inv-grand"): "inv-grand",
    ("sibling", "child"): "un",
    ("sibling", "inv-child"): "inv-child",
    ("grand", "sibling"): "grand",
}

# Symmetric relations are their own inverse; the others come in pairs.
SYMMETRIC_RELATIONS: frozenset[str] = frozenset({"sibling", "SO", "sibling-in-law"})
INVERSE_RELATIONS: dict[str, str] = {
    "child": "inv-child", "inv-child": "child",
    "grand": "inv-grand", "inv-grand": "grand",
    "un": "inv-un", "inv-un": "un",
    "in-law": "inv-in-law", "inv-in-law": "in-law",
    "sibling": "sibling", "SO": "SO", "sibling-in-law": "sibling-in-law",
}


def gendered_label(relation: str, gender: str) -> str:
    """The surface label of ``relation`` when its tail person has ``gender`` ('male' or 'female')."""
    if relation not in GENDERED_LABELS:
        raise ValueError(f"unknown relation type {relation!r}; expected one of {RELATION_TYPES}")
    if gender not in GENDERS:
        raise ValueError(f"unknown gender {gender!r}; expected 'male' or 'female'")
    return GENDERED_LABELS[relation][GENDERS.index(gender)]


def relation_type(label: str) -> str:
    """The ungendered relation type of a surface label (``'mother'`` -> ``'inv-child'``)."""
    if label not in LABEL_TO_TYPE:
        raise ValueError(f"unknown kinship label {label!r}; expected one of {LABELS}")
    return LABEL_TO_TYPE[label]


def compose(first: str, second: str) -> str | None:
    """The relation type of (x first y) followed by (y second z), or None when no rule applies."""
    return COMPOSITION_RULES.get((first, second))


def inverse(relation: str, head_gender: str | None = None) -> str:
    """The inverse relation type of ``relation`` (``'child'`` -> ``'inv-child'``).

    With ``head_gender`` given, returns the gendered label of the inverse edge instead: the inverse of
    (a r b) is (b r' a), whose tail is a.
    """
    if relation not in INVERSE_RELATIONS:
        raise ValueError(f"unknown relation type {relation!r}; expected one of {RELATION_TYPES}")
    inverted = INVERSE_RELATIONS[relation]
    return inverted if head_gender is None else gendered_label(inverted, head_gender)


def gendered_composition_table() -> dict[tuple[str, str], str]:
    """Every gendered (label1, label2) -> label3 implied by ``COMPOSITION_RULES``.

    The gender of the result is the gender of the tail z, which is also the gender of label2's tail.
    """
    table = {}
    for (first, second), result in COMPOSITION_RULES.items():
        for first_label in GENDERED_LABELS[first]:
            for gender in GENDERS:
                table[(first_label, gendered_label(second, gender))] = gendered_label(result, gender)
    return table


def parse_proof_state(cell: str | list) -> list[tuple[tuple[str, str, str], list[tuple[str, str, str]]]]:
    """Proof steps of a ``proof_state`` cell: [((x, r3, z), [(x, r1, y), (y, r2, z)]), ...]."""
    value = ast.literal_eval(cell) if isinstance(cell, str) else cell
    steps = []
    for step in value:
        for conclusion, premises in step.items():
            steps.append((tuple(conclusion), [tuple(p) for p in premises]))
    return steps


def derive_gendered_pair_table(
        proof_states: Iterable[str | list]) -> dict[tuple[str, str], str]:
    """The gendered composition table used by a data set, read off its proofs.

    Args:
      proof_states: ``proof_state`` cells (strings as in the CSV, or parsed lists), for example
        ``(row.proof_state for row in rows)`` over training files.

    Returns:
      (label1, label2) -> label3 for every two-premise proof step seen.

    Raises:
      ValueError: when two proofs compose the same pair of labels to different results.
    """
    table: dict[tuple[str, str], str] = {}
    for cell in proof_states:
        for (_, result, _), premises in parse_proof_state(cell):
            if len(premises) != 2:
                raise ValueError(f"proof step with {len(premises)} premises (expected 2): {premises}")
            key = (premises[0][1], premises[1][1])
            if table.setdefault(key, result) != result:
                raise ValueError(f"proofs disagree: {key} gives both {table[key]!r} and {result!r}")
    return table


def _proof_state_cells(path: str | os.PathLike) -> Iterator[str]:
    """The ``proof_state`` column of a CSV file, or of every ``*_train.csv`` inside a released zip."""
    path = os.fspath(path)
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("_train.csv"):
                    with archive.open(name) as raw:
                        yield from (record["proof_state"] for record in
                                    csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")))
    else:
        with open(path, newline="", encoding="utf-8") as stream:
            yield from (record["proof_state"] for record in csv.DictReader(stream))


def pair_table_from_files(paths: Iterable[str | os.PathLike]) -> dict[tuple[str, str], str]:
    """The gendered composition table read off the proofs of CLUTRR files.

    Args:
      paths: CSV files in the released format, or released zips (their training files are read).

    Returns:
      (label1, label2) -> label3; 62 pairs for the released training data (all of ``gendered_composition_table``
      except the same-sex couples ``son . husband`` and ``daughter . wife``).
    """
    return derive_gendered_pair_table(cell for path in paths for cell in _proof_state_cells(path))


def check_pair_table(table: Mapping[tuple[str, str], str]) -> list[str]:
    """Entries of a derived gendered table that ``COMPOSITION_RULES`` does not reproduce (empty when all do)."""
    expected = gendered_composition_table()
    return [f"{first} . {second} -> {result} (rules give {expected.get((first, second))})"
            for (first, second), result in sorted(table.items())
            if expected.get((first, second)) != result]
