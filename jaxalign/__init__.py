"""jaxalign: retrieval-augmented alignment of lightweight VLMs and structured knowledge distillation in JAX."""
from jaxalign import cpu_threads as _cpu_threads

# Before JAX's CPU backend starts: fake multi-device CPU runs (tests, launch/local.sh, notebooks) need more XLA
# threads than cores, or collectives can hang (see jaxalign.cpu_threads).
_cpu_threads.ensure_threads_for_host_devices()

__version__ = "0.1.0"
