"""Where every run starts: join the other processes, set up logging, turn on the compilation cache.

`start()` is called once per process before anything touches the devices: by `jaxalign.cli.main` for every
`jaxalign` command, and by a notebook or script that drives the programs directly. It

1. joins the launcher's processes into one JAX program (`jaxalign.distributed.initialize_from_environment`:
   when `launch/local.sh` sets the JAXALIGN_* variables, and always under a multi-task SLURM step or on a
   multi-host TPU slice, whose environments JAX reads itself);
2. sets up logging: INFO on process 0; warnings and errors only on the others, each line tagged with the process
   index, so N processes do not print N copies of every message;
3. turns on JAX's persistent compilation cache (`$JAXALIGN_COMPILATION_CACHE`, else
   `<cache root>/jax_compilation_cache`, the cache root being `$JAXALIGN_CACHE` or `~/.cache/jaxalign`), so a
   rerun, a resume or a second stage with the same shapes skips compiling. A cache the caller set already
   (`JAX_COMPILATION_CACHE_DIR`, the test suite) is kept; `JAXALIGN_COMPILATION_CACHE=off` turns it off.

The mesh is made by each program from its config (`jaxalign.programs.training.make_mesh`), after `start()`.

Public API:
  start() -> StartInfo(distributed, process_index, process_count, compilation_cache)
  cache_root() -> str
"""
from __future__ import annotations

import dataclasses
import logging
import os

CACHE_ENV = "JAXALIGN_CACHE"
COMPILATION_CACHE_ENV = "JAXALIGN_COMPILATION_CACHE"
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


@dataclasses.dataclass(frozen=True)
class StartInfo:
    """What `start` did: whether it joined a multi-process program, this process's place, the cache folder."""

    distributed: bool
    process_index: int
    process_count: int
    compilation_cache: str | None


def cache_root() -> str:
    """$JAXALIGN_CACHE, else ~/.cache/jaxalign: cached demo towers and the compilation cache."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jaxalign")


def configure_logging(process_index: int, process_count: int) -> None:
    """INFO on process 0, WARNING elsewhere; lines carry `[process i/n]` when there are several processes."""
    tag = f"[process {process_index}/{process_count}] " if process_count > 1 else ""
    logging.basicConfig(level=logging.INFO if process_index == 0 else logging.WARNING,
                        format=tag + LOG_FORMAT, force=True)


def enable_compilation_cache() -> str | None:
    """Points JAX's persistent compilation cache at the configured folder; returns it (None: off)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir  # chosen by the caller already
    folder = os.environ.get(COMPILATION_CACHE_ENV) or os.path.join(cache_root(), "jax_compilation_cache")
    if folder.lower() == "off":
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    # Small programs recompile in well under a second; caching them costs more disk than it saves time.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder


def start() -> StartInfo:
    """Joins the processes (if launched as several), sets up logging and the compilation cache. Call it once,
    before any JAX computation."""
    from jaxalign import distributed

    joined = distributed.initialize_from_environment()
    import jax

    configure_logging(jax.process_index(), jax.process_count())
    return StartInfo(joined, jax.process_index(), jax.process_count(), enable_compilation_cache())
