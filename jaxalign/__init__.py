"""jaxalign: retrieval-augmented alignment of lightweight VLMs and structured knowledge distillation in JAX."""

__version__ = "0.1.0"
