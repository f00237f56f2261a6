"""`cmb-workflow evaluate`'s options and entry point."""

from __future__ import annotations

import argparse
import sys

from .core import evaluate
from .records import EvaluationInputError
from .tables import DEFAULT_SIZE_BINS_MM, format_tables


def _size_bins_argument(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` options to ``parser``."""
    parser.add_argument(
        "--truth", required=True, help="reference directory (lesion JSON and/or masks)"
    )
    parser.add_argument("--results", required=True, help="cmb-workflow output directory")
    parser.add_argument("--out", help="write all tables to this TSV")
    parser.add_argument(
        "--match-distance",
        type=float,
        default=5.0,
        metavar="MM",
        help="largest centre distance for a hit (default: %(default)s, as VALDO 2021)",
    )
    parser.add_argument(
        "--min-diameter",
        type=float,
        default=0.0,
        metavar="MM",
        help="ignore reference lesions smaller than this: not misses, and "
        "predictions on them not false positives (default: %(default)s)",
    )
    parser.add_argument(
        "--size-bins",
        type=_size_bins_argument,
        default=DEFAULT_SIZE_BINS_MM,
        metavar="MM,MM,...",
        help="diameter bin edges for the size breakdown (default: 3,5,10)",
    )
    parser.add_argument(
        "--min-peak-probability",
        type=float,
        default=0.0,
        metavar="P",
        help="score only predictions whose max_prob is at least P, as if `run` had been "
        "given --min-peak-probability P (default: every prediction)",
    )
    parser.add_argument(
        "--drop-likely-mimics",
        action="store_true",
        help="also score each view without the lesions flagged likely_mimic, as if `run` "
        "had been given --drop-likely-mimics",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the evaluation, print the tables; return the exit status (2 on bad input)."""
    try:
        tables = evaluate(
            args.truth,
            args.results,
            out_tsv=args.out,
            match_distance_mm=args.match_distance,
            min_diameter_mm=args.min_diameter,
            size_bins_mm=args.size_bins,
            min_peak_probability=args.min_peak_probability,
            drop_likely_mimics=args.drop_likely_mimics,
        )
    except EvaluationInputError as exc:
        print(f"cmb-workflow evaluate: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(format_tables(tables))
    if args.out:
        print(f"\nWrote {args.out}")
    return 0
