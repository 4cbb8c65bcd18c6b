"""Multi-host start-up: one process per host, joined by JAX's own runtime (`jax.distributed`).

There is no home-made distribution layer. A launcher (see `launch/`) starts the same entry point once per host
and tells it how to find the coordinator, either through the standard cluster environments that
`jax.distributed.initialize()` detects by itself (TPU VMs, SLURM) or through these variables:

  JAXALIGN_COORDINATOR   host:port of process 0
  JAXALIGN_NUM_PROCESSES number of processes
  JAXALIGN_PROCESS_ID    this process's index
  JAXALIGN_DISTRIBUTED   '1' to initialise from the cluster environment when the three above are unset,
                         '0' never to initialise (one process per task on purpose)
  JAXALIGN_HEARTBEAT_TIMEOUT  seconds without a heartbeat after which the others give up on a dead process
                         (JAX's default, 100, when unset)

Every `jaxalign` command calls `initialize_from_environment()` first (through `jaxalign.programs.startup.start`,
called by `jaxalign.cli.main`), so a launcher only sets the environment and the program joins the cluster itself.
Without the variables above, a SLURM step with several tasks (`SLURM_STEP_NUM_TASKS` > 1, i.e. under `srun`) and
a TPU slice with several hosts (`TPU_WORKER_HOSTNAMES` lists more than one) are joined automatically, since
there a lone process per task or host is never what was meant.

`initialize_from_environment()` does nothing when none is set, so single-host runs need no flags.
"""
from __future__ import annotations

import os

import jax

_ENV_COORDINATOR = "JAXALIGN_COORDINATOR"
_ENV_NUM_PROCESSES = "JAXALIGN_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAXALIGN_PROCESS_ID"
_ENV_AUTO = "JAXALIGN_DISTRIBUTED"
_ENV_HEARTBEAT = "JAXALIGN_HEARTBEAT_TIMEOUT"


def initialize_from_environment() -> bool:
    """Calls `jax.distributed.initialize` when the launcher asked for it; returns whether it did.

    Must run before any other JAX call touches the devices.
    """
    coordinator = os.environ.get(_ENV_COORDINATOR)
    timeouts = {}
    if os.environ.get(_ENV_HEARTBEAT):
        timeouts["heartbeat_timeout_seconds"] = int(os.environ[_ENV_HEARTBEAT])
    if coordinator:
        missing = [name for name in (_ENV_NUM_PROCESSES, _ENV_PROCESS_ID) if name not in os.environ]
        if missing:
            raise RuntimeError(f"{_ENV_COORDINATOR} is set but {', '.join(missing)} is not: set all three")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ[_ENV_NUM_PROCESSES]),
                                   process_id=int(os.environ[_ENV_PROCESS_ID]), **timeouts)
        return True
    auto = os.environ.get(_ENV_AUTO)
    if auto == "1" or (auto != "0" and cluster_detected()):
        jax.distributed.initialize(**timeouts)  # TPU VM pods and SLURM are detected by JAX itself
        return True
    return False


def cluster_detected(environ: dict[str, str] | None = None) -> str | None:
    """'slurm' or 'tpu' when the environment is one of several tasks / hosts of one job, else None."""
    environ = os.environ if environ is None else environ
    if int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return "slurm"
    hosts = [host for host in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if host.strip()]
    if len(hosts) > 1:
        return "tpu"
    return None


def is_main_process() -> bool:
    """True on the process that writes logs, plots and exported files (process 0)."""
    return jax.process_index() == 0


def host_slice(num_items: int) -> range:
    """The contiguous range of item indexes this process reads: an even split over processes, rest to the last."""
    per_process = num_items // jax.process_count()
    start = jax.process_index() * per_process
    stop = num_items if jax.process_index() == jax.process_count() - 1 else start + per_process
    return range(start, stop)
