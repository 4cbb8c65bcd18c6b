"""Reading benchmark files (JSON documents, JSON lines, tab-separated text) with errors that name the file and line.

Every reader raises `BenchmarkInputError` for input it cannot use: a missing file, a line that is not JSON, a record
without a field its layout needs. The message is one line that names the file (and the line or record where there
is one) and says what was expected, so a command can print it as it is.

Public API:
  BenchmarkInputError
  read_json(path, what) -> the parsed document
  read_json_records(path, what) -> [(line_or_record_number, record)]   (a JSON array or JSON lines)
  read_text_lines(path, what) -> [(line_number, text)]                 (non-blank lines, newline removed)
  require_field(record, field, path, where, what) -> value
  single_path(paths, benchmark) -> the one path of a benchmark that reads one questions file
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

PathLike = str | os.PathLike


class BenchmarkInputError(ValueError):
    """A benchmark input file that cannot be used as it is; the message names the file and, where known, the line."""


def _check_file(path: PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BenchmarkInputError(f"{path}: no such file (expected {what})")
    if os.path.isdir(path):
        raise BenchmarkInputError(f"{path}: is a folder, expected a file ({what})")
    return path


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise BenchmarkInputError(f"{path}: not UTF-8 text at byte {error.start} (expected {what})") from None
    except OSError as error:
        raise BenchmarkInputError(f"{path}: cannot be read ({error.strerror}; expected {what})") from None


def read_json(path: PathLike, what: str) -> Any:
    """The parsed JSON document at `path`; `what` names the file's role for error messages ("VQAv2 annotations")."""
    path = _check_file(path, what)
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as error:
        raise BenchmarkInputError(f"{path}: line {error.lineno}: not valid JSON ({error.msg}; expected {what})") \
            from None


def read_json_records(path: PathLike, what: str) -> list[tuple[int, Any]]:
    """The records of a JSON array or of a JSON-lines file, each with its 1-based line (JSON lines) or record
    (array) number. POPE's `coco_pope_*.json` files, despite their name, are JSON lines; both forms are read."""
    path = _check_file(path, what)
    text = _read_text(path, what)
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    else:
        if isinstance(document, list):
            return list(enumerate(document, start=1))
        return [(1, document)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise BenchmarkInputError(f"{path}: line {number}: not valid JSON ({error.msg}; expected {what}, one "
                                      "JSON object a line)") from None
    return records


def read_text_lines(path: PathLike, what: str) -> list[tuple[int, str]]:
    """The non-blank lines of a text file, each with its 1-based number, the line break removed."""
    path = _check_file(path, what)
    text = _read_text(path, what)
    return [(number, line.rstrip("\r\n")) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def require_field(record: Any, field: str, path: PathLike, where: str, what: str) -> Any:
    """`record[field]`, or an error naming the file, the place (`where`, e.g. "line 3") and the missing field."""
    if not isinstance(record, dict):
        raise BenchmarkInputError(f"{os.fspath(path)}: {where}: expected a JSON object ({what}), "
                                  f"got {type(record).__name__}")
    if field not in record:
        raise BenchmarkInputError(f"{os.fspath(path)}: {where}: no {field!r} field ({what})")
    return record[field]


def single_path(paths: PathLike | Sequence[PathLike], benchmark: str) -> str:
    """The one questions path of a benchmark that reads a single questions file."""
    if isinstance(paths, (str, os.PathLike)):
        return os.fspath(paths)
    if len(paths) != 1:
        raise BenchmarkInputError(f"{benchmark} reads one questions file, got {len(paths)}: "
                                  + ", ".join(os.fspath(path) for path in paths))
    return os.fspath(paths[0])
