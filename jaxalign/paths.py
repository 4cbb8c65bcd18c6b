"""Run paths that may be local folders or object-store URIs (gs://bucket/run): the one place that tells them apart.

Files of a run are read and written through `etils.epath`, which reaches gs:// through its own client, so a
workdir string is passed on as written. Only two things need to know the difference: orbax, which refuses a
relative local path (so local ones are made absolute, remote ones never are: abspath would turn `gs://b/run`
into a folder on this worker's disk), and writers that append (object stores cannot append to an object).

Public API:
  is_remote(path) -> bool
  orbax_directory(path) -> str
"""
from __future__ import annotations

import os


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store URI (gs://, s3:// ...)."""
    return "://" in os.fspath(path)


def orbax_directory(path: str | os.PathLike) -> str:
    """`path` as orbax should get it: a local path made absolute, an object-store URI unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)
