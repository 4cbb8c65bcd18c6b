"""Shared test set-up: 8 fake CPU devices, a persistent compilation cache, tiny random seeds.

`make test` sets XLA_FLAGS before Python starts; the defaults here make a bare `pytest` behave the same.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8"
                      # in-process collectives wait up to 10 min, not 40 s, on a loaded 2-core machine (Makefile)
                      " --xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=600")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Enough XLA:CPU threads for 8 fake devices on 2 cores, set before jax starts its CPU backend below (see
# jaxalign.cpu_threads: with the default pool, collectives that may run in either order can hang).
os.environ.setdefault("PJRT_NPROC", "64")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 fake CPU devices; fails loudly if XLA_FLAGS did not take effect."""
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}: set XLA_FLAGS before importing jax"
    return devices


TRAINED_RUN_CONFIG = "jaxalign/configs/tinyalign_tiny.py:stage=2,steps=20,fraction=0.01"
TRAINED_RUN_OPTIONS = ("--config.progress=False", "--config.train.learning_rate=0.01", "--config.eval.batch_size=8",
                       "--config.eval.max_batches=1", "--config.eval.at_end=False")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, eight_devices):
    """The workdir of a tiny stage-2 easy-vqa run with retrieval, trained as users train one (`jaxalign train`),
    for the commands that load a trained run (predict, eval-suite). 20 steps at a high learning rate: with fewer
    the first generated token is the end of the turn and every answer is empty."""
    from jaxalign import cli

    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", "--config", TRAINED_RUN_CONFIG, "--workdir", str(workdir), *TRAINED_RUN_OPTIONS]) == 0
    return workdir
