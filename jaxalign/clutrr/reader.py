"""Reader and writer for CLUTRR CSV files: the released EMNLP-2019 zips and what the reference generator writes.

One row is one story. The released files (Sinha et al., 2019) have these columns, in this order; cells marked
"literal" are Python literals written with ``repr`` and read back with ``ast.literal_eval``:

=============  ==========================================================================================
(unnamed)      row number within the file
id             a UUID
story          the story text, people in brackets: ``[Dorothy]``
query          literal ``(x, y)``: the question is "y is x's what?"
text_query     unused in the released data (empty)
target         the answer label, for example ``grandson``
text_target    literal list with zero or one sentence stating the answer
clean_story    the story without its noise sentences
proof_state    literal list of ``{(x, r, z): [(x, r1, y), (y, r2, z)]}`` proof steps, the target's first
f_comb         the path's edge labels joined by ``-``
task_name      ``task_<noise>.<k>``: noise 1 clean, 2 supporting, 3 irrelevant, 4 disconnected
story_edges    literal list of node-index pairs; the first k form the path from node 0 to the query's tail
edge_types     literal list of the k path edge labels; edge (a, b) with label r means "b is a's r"
query_edge     literal ``(0, n)``: node indices of the query
genders        ``name:gender`` pairs joined by commas, in node-index order (not a literal)
syn_story      unused in the released data (empty)
node_mapping   literal dict: person id in the generator's family tree -> node index
task_split     ``train`` or ``test``
=============  ==========================================================================================

Files written by the reference generator (github.com/facebookresearch/clutrr, ``clutrr/generator.py``
``generate_rows`` and ``clutrr/main.py`` ``Clutrr.store``, which saves pandas frames with ``to_csv``) differ:

- ``edge_types`` labels every story edge, noise included (``get_story_relations('story')`` followed by
  ``get_story_relations('fact')``): ``story_edges[:k]`` is the path and the rest are the noise facts, in the
  same order in both columns. Both conventions are read; noise labels land in ``ClutrrRow.noise_edge_types``,
  so ``edge_types`` always holds the k path labels.
- Its relation store spells the female ``un`` relation ``neice``; the reader reads it as ``niece`` in
  ``target``, ``edge_types``, ``f_comb`` and ``proof_state``.
- ``text_query`` holds a question sentence; ``syn_story`` is empty.

Only the columns in ``REQUIRED_COLUMNS`` must be present; the others default when absent (the row index to
the row's position in the file, text columns to empty, ``node_mapping`` to ``{}``) and unknown extra columns
are ignored. ``write_csv`` always writes the released column set.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import io
import logging
import os
import re
import zipfile
from collections.abc import Iterable
from typing import Any, TextIO

from jaxalign.clutrr import relations

COLUMNS: tuple[str, ...] = (
    "", "id", "story", "query", "text_query", "target", "text_target", "clean_story", "proof_state", "f_comb",
    "task_name", "story_edges", "edge_types", "query_edge", "genders", "syn_story", "node_mapping", "task_split")
# The columns a row cannot be read without; every other column of COLUMNS takes its default when absent.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "id", "story", "query", "target", "proof_state", "f_comb", "task_name", "story_edges", "edge_types",
    "query_edge", "genders")
_COLUMN_DEFAULTS = {"text_query": "", "text_target": "", "clean_story": "", "syn_story": "", "node_mapping": "",
                    "task_split": ""}
# The reference generator's relation store (clutrr/store/relations_store.yaml) spells niece "neice".
LABEL_SPELLINGS = {"neice": "niece"}
NOISE_TASKS = {1: "clean", 2: "supporting", 3: "irrelevant", 4: "disconnected"}
_TASK_NAME = re.compile(r"^task_(\d+)\.(\d+)$")

logger = logging.getLogger(__name__)


class ClutrrFormatError(ValueError):
    """A CLUTRR CSV row that does not follow the released format; names the file, row id and field."""

    def __init__(self, source: str, row_id: str, field: str, problem: str):
        self.source, self.row_id, self.field, self.problem = source, row_id, field, problem
        super().__init__(f"{source}: row {row_id}: field {field!r}: {problem}. Fix or remove this row, or read "
                         "with skip_bad=True to skip bad rows and count them in a ReadReport.")


@dataclasses.dataclass(frozen=True)
class ClutrrRow:
    """One CLUTRR story with its symbolic graph (every column of the released format, parsed).

    Node indices refer to ``genders``: node i is ``genders[i][0]``. Edge ``(a, b)`` with label r means "b is
    a's r". ``story_edges[:k]`` is the path from the query's head (node 0) to its tail, labelled by
    ``edge_types`` (always k labels); ``story_edges[k:]`` are the noise facts, labelled by ``noise_edge_types``
    when the file labels them (the reference generator's files) and empty otherwise (the released files).
    """

    index: int
    id: str
    story: str
    query: tuple[str, str]
    text_query: str
    target: str
    text_target: tuple[str, ...]
    clean_story: str
    proof_state: tuple[dict, ...]
    f_comb: str
    task_name: str
    story_edges: tuple[tuple[int, int], ...]
    edge_types: tuple[str, ...]
    query_edge: tuple[int, int]
    genders: tuple[tuple[str, str], ...]
    syn_story: str
    node_mapping: dict[int, int]
    task_split: str
    noise_edge_types: tuple[str, ...] = ()

    @property
    def noise_task(self) -> int:
        """1 clean, 2 supporting, 3 irrelevant, 4 disconnected."""
        return int(_TASK_NAME.match(self.task_name).group(1))

    @property
    def k(self) -> int:
        """Number of edges on the path from the query's head to its tail."""
        return int(_TASK_NAME.match(self.task_name).group(2))

    @property
    def names(self) -> tuple[str, ...]:
        """Person names by node index."""
        return tuple(name for name, _ in self.genders)

    @property
    def path_edges(self) -> tuple[tuple[int, int], ...]:
        return self.story_edges[:self.k]

    @property
    def noise_edges(self) -> tuple[tuple[int, int], ...]:
        return self.story_edges[self.k:]

    @property
    def noise_labelled(self) -> bool:
        """Whether the noise edges carry relation labels (always false for a row without noise edges)."""
        return bool(self.noise_edge_types)

    @property
    def target_relation(self) -> str:
        """The ungendered relation type of the target (``'mother'`` -> ``'inv-child'``)."""
        return relations.relation_type(self.target)


@dataclasses.dataclass
class ReadReport:
    """What a lenient read (``skip_bad=True``) kept and skipped."""

    rows_read: int = 0
    rows_skipped: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def add_skip(self, error: ClutrrFormatError) -> None:
        self.rows_skipped += 1
        self.problems.append(str(error))


_INT = re.compile(r"-?\d+")
_QUOTED = re.compile(r"'([^'\\]*)'")
_DOUBLE_QUOTED = re.compile(r'"([^"\\]*)"')
_TRIPLE = re.compile(r"\('([^'\\]*)', '([^'\\]*)', '([^'\\]*)'\)")


def _fast_int_pairs(cell: str) -> list[tuple[int, int]]:
    numbers = [int(n) for n in _INT.findall(cell)]
    return list(zip(numbers[::2], numbers[1::2]))


def _fast_proof(cell: str) -> list[dict]:
    triples = _TRIPLE.findall(cell)
    return [{triples[i]: [triples[i + 1], triples[i + 2]]} for i in range(0, len(triples) - 2, 3)]


# Fast parsers for the usual shapes of each literal column. A fast result is used only when its repr is
# exactly the cell (then ast.literal_eval would give the same value); anything else goes to ast.literal_eval.
# This makes reading a released zip several times faster (compiling each cell dominates otherwise).
_FAST_PARSERS = {
    "query": lambda cell: tuple(_QUOTED.findall(cell)),
    "text_target": lambda cell: (_DOUBLE_QUOTED if cell.startswith('["') else _QUOTED).findall(cell),
    "proof_state": _fast_proof,
    "story_edges": _fast_int_pairs,
    "edge_types": lambda cell: _QUOTED.findall(cell),
    "query_edge": lambda cell: tuple(int(n) for n in _INT.findall(cell)),
    "node_mapping": lambda cell: dict(_fast_int_pairs(cell)),
}


def _literal(cell: str, field: str, fail) -> Any:
    fast = _FAST_PARSERS.get(field)
    if fast is not None:
        value = fast(cell)
        if repr(value) == cell:
            return value
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        raise fail(field, f"not a Python literal ({type(error).__name__}): {cell[:80]!r}") from None


def _respell(label: str) -> str:
    return LABEL_SPELLINGS.get(label, label)


def _respell_text(text: str) -> str:
    """``f_comb`` with the generator's spellings replaced (no label contains another's spelling)."""
    for spelling, label in LABEL_SPELLINGS.items():
        text = text.replace(spelling, label)
    return text


def _respell_proof(steps: list[dict]) -> list[dict]:
    def fix(fact):
        return (fact[0], _respell(fact[1]), fact[2]) if isinstance(fact, tuple) and len(fact) == 3 else fact
    return [{fix(conclusion): [fix(premise) for premise in premises] if isinstance(premises, list) else premises
             for conclusion, premises in step.items()} for step in steps]


def parse_row(record: dict[str, str], source: str = "<row>", position: int | None = None) -> ClutrrRow:
    """Parses and validates one CSV record (a ``csv.DictReader`` row) into a ``ClutrrRow``.

    Args:
      record: {column: cell}. Columns outside ``REQUIRED_COLUMNS`` may be absent (they take their defaults);
        unknown columns are ignored. ``edge_types`` may label the k path edges or every story edge.
      source: the file, named in errors.
      position: the row's 0-based position in its file, its index when the file has no index column.
    Raises:
      ClutrrFormatError: naming ``source``, the row id and the bad field.
    """
    row_id = record.get("id") or f"#{record.get('', '?' if position is None else position)}"

    def fail(field: str, problem: str) -> ClutrrFormatError:
        return ClutrrFormatError(source, row_id, field, problem)

    short = [column for column in COLUMNS if column in record and record[column] is None]
    if short:
        raise fail(short[0], "cell missing: the row has fewer cells than the header")
    missing = [column for column in REQUIRED_COLUMNS if column not in record]
    if missing:
        raise fail(missing[0], "column missing")
    record = {**_COLUMN_DEFAULTS, **record}
    if "" in record:
        try:
            index = int(record[""])
        except ValueError:
            raise fail("", f"row number is not an integer: {record['']!r}") from None
    else:
        index = 0 if position is None else position

    match = _TASK_NAME.match(record["task_name"])
    if not match:
        raise fail("task_name", f"expected task_<noise>.<k>, got {record['task_name']!r}")
    noise_task, k = int(match.group(1)), int(match.group(2))
    if noise_task not in NOISE_TASKS or k < 1:
        raise fail("task_name", f"noise task must be 1-4 and k >= 1, got {record['task_name']!r}")

    query = _literal(record["query"], "query", fail)
    if not (isinstance(query, tuple) and len(query) == 2 and all(isinstance(n, str) for n in query)):
        raise fail("query", f"expected a pair of names, got {query!r}")
    text_target = _literal(record["text_target"], "text_target", fail) if record["text_target"] else []
    if not (isinstance(text_target, list) and all(isinstance(s, str) for s in text_target)):
        raise fail("text_target", "expected a list of sentences")
    proof_state = _literal(record["proof_state"], "proof_state", fail)
    if not (isinstance(proof_state, list) and all(isinstance(step, dict) for step in proof_state)):
        raise fail("proof_state", "expected a list of {conclusion: [premises]} dicts")
    if any(spelling in record["proof_state"] for spelling in LABEL_SPELLINGS):
        proof_state = _respell_proof(proof_state)
    story_edges = _literal(record["story_edges"], "story_edges", fail)
    if not (isinstance(story_edges, list) and all(
            isinstance(e, tuple) and len(e) == 2 and all(isinstance(n, int) for n in e) for e in story_edges)):
        raise fail("story_edges", "expected a list of (int, int) pairs")
    edge_types = _literal(record["edge_types"], "edge_types", fail)
    if not (isinstance(edge_types, list) and all(isinstance(label, str) for label in edge_types)):
        raise fail("edge_types", "expected a list of labels")
    edge_types = [_respell(label) for label in edge_types]
    query_edge = _literal(record["query_edge"], "query_edge", fail)
    if not (isinstance(query_edge, tuple) and len(query_edge) == 2 and all(isinstance(n, int) for n in query_edge)):
        raise fail("query_edge", f"expected a pair of node indices, got {query_edge!r}")
    node_mapping = _literal(record["node_mapping"], "node_mapping", fail) if record["node_mapping"] else {}
    if not isinstance(node_mapping, dict):
        raise fail("node_mapping", "expected a dict")

    genders = []
    for item in record["genders"].split(","):
        name, _, gender = item.rpartition(":")
        if not name or gender not in relations.GENDERS:
            raise fail("genders", f"expected name:male or name:female, got {item!r}")
        genders.append((name, gender))

    # Consistency of the symbolic graph.
    target, f_comb = _respell(record["target"]), _respell_text(record["f_comb"])
    if target not in relations.LABEL_TO_TYPE:
        raise fail("target", f"unknown kinship label {record['target']!r}")
    unknown = [label for label in edge_types if label not in relations.LABEL_TO_TYPE]
    if unknown:
        raise fail("edge_types", f"unknown kinship label {unknown[0]!r}")
    if len(story_edges) < k:
        raise fail("story_edges", f"{len(story_edges)} edges, fewer than k = {k}")
    # Released files label the k path edges; the reference generator labels every story edge, noise included.
    if len(edge_types) not in (k, len(story_edges)):
        raise fail("edge_types", f"{len(edge_types)} labels for a path of k = {k} edges among "
                                 f"{len(story_edges)} story edges: expected {k} (the path's, as in the released "
                                 f"files) or {len(story_edges)} (every story edge's, as the reference generator "
                                 "writes)")
    edge_types, noise_edge_types = edge_types[:k], edge_types[k:]
    if "-".join(edge_types) != f_comb:
        raise fail("f_comb", f"{record['f_comb']!r} is not the path labels {'-'.join(edge_types)!r}")
    nodes = len(genders)
    if any(not 0 <= n < nodes for edge in story_edges for n in edge):
        raise fail("story_edges", f"node index out of range for {nodes} people in genders")
    if any(not 0 <= n < nodes for n in query_edge):
        raise fail("query_edge", f"node index out of range for {nodes} people in genders")
    path = story_edges[:k]
    walk_ok = path[0][0] == query_edge[0] and path[-1][1] == query_edge[1] and all(
        path[i][1] == path[i + 1][0] for i in range(k - 1))
    if not walk_ok:
        raise fail("story_edges", f"the first k = {k} edges {path} do not form a path from node {query_edge[0]} "
                                  f"to node {query_edge[1]} (query_edge)")
    if (genders[query_edge[0]][0], genders[query_edge[1]][0]) != query:
        raise fail("query", f"names {query} are not those of query_edge {query_edge} in genders")
    for (head, tail), label in zip(story_edges, edge_types + noise_edge_types):
        if relations.LABEL_TO_GENDER[label] != genders[tail][1]:
            raise fail("edge_types", f"label {label!r} of edge ({head}, {tail}) does not match the gender of "
                                     f"{genders[tail][0]} ({genders[tail][1]})")
    if relations.LABEL_TO_GENDER[target] != genders[query_edge[1]][1]:
        raise fail("target", f"label {target!r} does not match the gender of {query[1]}")

    return ClutrrRow(
        index=index, id=record["id"], story=record["story"], query=query, text_query=record["text_query"],
        target=target, text_target=tuple(text_target), clean_story=record["clean_story"],
        proof_state=tuple(proof_state), f_comb=f_comb, task_name=record["task_name"],
        story_edges=tuple(story_edges), edge_types=tuple(edge_types), query_edge=query_edge,
        genders=tuple(genders), syn_story=record["syn_story"], node_mapping=node_mapping,
        task_split=record["task_split"], noise_edge_types=tuple(noise_edge_types))


def read_rows(stream: TextIO, source: str, *, skip_bad: bool = False,
              report: ReadReport | None = None) -> list[ClutrrRow]:
    """Reads CLUTRR rows from an open text stream (see ``read_csv``)."""
    reader = csv.DictReader(stream)
    header = tuple(reader.fieldnames or ())
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise ClutrrFormatError(source, "header", missing[0], f"column missing; the header is {header}")
    local_report = report if report is not None else ReadReport()
    rows = []
    for position, record in enumerate(reader):
        try:
            rows.append(parse_row(record, source, position))
        except ClutrrFormatError as error:
            if not skip_bad:
                raise
            local_report.add_skip(error)
            continue
        local_report.rows_read += 1
    if report is None and local_report.rows_skipped:
        logger.warning("%s: skipped %d malformed rows; first: %s", source, local_report.rows_skipped,
                       local_report.problems[0])
    return rows


def read_csv(path: str | os.PathLike, *, skip_bad: bool = False,
             report: ReadReport | None = None) -> list[ClutrrRow]:
    """Reads one CLUTRR CSV file.

    Args:
      path: a CSV in the released format or as the reference generator writes it (see the module docstring).
      skip_bad: skip malformed rows instead of raising; each is counted (and described) in ``report``, or logged
        as a warning when no report is given.
      report: collects rows read and skipped.

    Raises:
      ClutrrFormatError: on the first malformed row unless ``skip_bad``.
    """
    with open(path, newline="", encoding="utf-8") as stream:
        return read_rows(stream, os.fspath(path), skip_bad=skip_bad, report=report)


def read_zip(path: str | os.PathLike, *, members: Iterable[str] | None = None, skip_bad: bool = False,
             report: ReadReport | None = None) -> dict[str, list[ClutrrRow]]:
    """Reads the CSVs of a released CLUTRR zip: {file name (``1.3_test.csv``): rows}, in archive order.

    Args:
      path: the zip file.
      members: file names to read (default: every CSV); a name missing from the zip is an error.
      skip_bad, report: as for ``read_csv``.
    """
    result = {}
    wanted = None if members is None else set(members)
    with zipfile.ZipFile(path) as archive:
        if wanted is not None:
            missing = sorted(wanted - {os.path.basename(info.filename) for info in archive.infolist()})
            if missing:
                raise FileNotFoundError(f"{os.fspath(path)}: no member named {missing[0]}")
        for info in archive.infolist():
            if info.is_dir() or not info.filename.endswith(".csv"):
                continue
            if wanted is not None and os.path.basename(info.filename) not in wanted:
                continue
            with archive.open(info) as raw:
                stream = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                source = f"{os.fspath(path)}:{info.filename}"
                result[os.path.basename(info.filename)] = read_rows(
                    stream, source, skip_bad=skip_bad, report=report)
    return result


def file_order(name: str) -> tuple:
    """Sort key of CLUTRR file names by task, then k: '1.2_test.csv' < '1.10_test.csv' < '2.3_test.csv'."""
    head = name.split("_")[0].split(",")[0]
    task, _, k = head.partition(".")
    return (int(task) if task.isdigit() else 0, int(k) if k.isdigit() else 0, name)


def row_to_record(row: ClutrrRow) -> dict[str, str]:
    """The CSV cells of a row, written the way the released files write them (noise labels, if any, follow the
    path labels in ``edge_types``, as the reference generator writes them)."""
    return {
        "": str(row.index), "id": row.id, "story": row.story, "query": repr(tuple(row.query)),
        "text_query": row.text_query, "target": row.target, "text_target": repr(list(row.text_target)),
        "clean_story": row.clean_story, "proof_state": repr(list(row.proof_state)), "f_comb": row.f_comb,
        "task_name": row.task_name, "story_edges": repr([tuple(e) for e in row.story_edges]),
        "edge_types": repr(list(row.edge_types) + list(row.noise_edge_types)),
        "query_edge": repr(tuple(row.query_edge)),
        "genders": ",".join(f"{name}:{gender}" for name, gender in row.genders), "syn_story": row.syn_story,
        "node_mapping": repr(dict(row.node_mapping)), "task_split": row.task_split,
    }


def write_rows(rows: Iterable[ClutrrRow], stream: TextIO) -> None:
    writer = csv.DictWriter(stream, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row_to_record(row))


def write_csv(rows: Iterable[ClutrrRow], path: str | os.PathLike) -> None:
    """Writes rows as a CSV in the released format (same columns, same cell syntax)."""
    with open(path, "w", newline="", encoding="utf-8") as stream:
        write_rows(rows, stream)
