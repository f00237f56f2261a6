"""Lesion-wise evaluation of microbleed detections against a reference
(``cmb-workflow evaluate --truth DIR --results DIR [--out TSV]``).

The input files, the matching views and every column of the tables are described in
docs/evaluation.md. The steps, in order: discovery (which files belong to which subject),
readers, matching (one subject, one view), tables (rows, TSV and terminal output); core holds
evaluate(), which runs them, and cli the subcommand.
"""

from .cli import add_arguments, run_from_args
from .core import evaluate
from .records import EvaluationInputError
from .tables import (CI_COLUMNS, COLUMNS, DEFAULT_SIZE_BINS_MM, format_tables,
                     fp_per_scan_interval, wilson_interval, write_tsv)

__all__ = ["CI_COLUMNS", "COLUMNS", "DEFAULT_SIZE_BINS_MM", "EvaluationInputError",
           "add_arguments", "evaluate", "format_tables", "fp_per_scan_interval", "run_from_args",
           "wilson_interval",
           "write_tsv"]
