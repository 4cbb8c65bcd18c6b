"""CLUTRR kinship benchmark: relations and rules, CSV reader, symbolic solver, seeded generator, tfds builder.

Modules: ``relations`` (relation types, gendered labels, composition rules), ``reader`` (released CSV format,
``ClutrrRow``), ``solver`` (all-bracketings rule search), ``family`` (family trees closed under the rules),
``generator`` (seeded data sets in the released format), ``templates`` (synthetic sentences), ``tfds_builder``
(array_record builder, imported on demand because it imports tensorflow_datasets), ``prepared`` (the rows of a
data set written by `jaxalign prepare-data clutrr`, read back lazily; also imported on demand), ``commands`` (CLI).
"""
from jaxalign.clutrr.reader import ClutrrFormatError, ClutrrRow, ReadReport, read_csv, read_zip, write_csv
from jaxalign.clutrr.solver import Solution, agreement, solve_path, solve_row
from jaxalign.clutrr.generator import generate, generate_dataset

__all__ = ["ClutrrFormatError", "ClutrrRow", "ReadReport", "read_csv", "read_zip", "write_csv", "Solution",
           "agreement", "solve_path", "solve_row", "generate", "generate_dataset"]
