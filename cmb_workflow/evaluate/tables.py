"""Rows of counts, rates and intervals from the matching outcomes, and the TSV and terminal
forms of the tables (docs/evaluation.md, TSV layout)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, chi2

from .records import Outcome

DEFAULT_SIZE_BINS_MM = (3.0, 5.0, 10.0)
COUNT_COLUMNS = ("n_ref", "n_pred", "n_ref_excluded", "n_pred_excluded", "tp", "fp", "fn")
RATE_COLUMNS = (
    "sensitivity",
    "precision",
    "f1",
    "fp_per_scan",
    "fp_per_lesion",
    "abs_count_diff",
    "dice",
)
CI_COLUMNS = ("sensitivity_ci_low", "sensitivity_ci_high", "fp_per_scan_ci_low",
              "fp_per_scan_ci_high")
CI_LEVEL = 0.95
COLUMNS = (("view", "scope", "group", "grid", "status", "n_subjects") + COUNT_COLUMNS
           + RATE_COLUMNS + CI_COLUMNS)
TABLE_NAMES = ("subjects", "summary", "by_size", "by_grid")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def wilson_interval(hits: int, total: int) -> tuple[float, float]:
    """Wilson interval (CI_LEVEL) of the proportion hits / total; NaNs when total is 0."""
    if not total:
        return math.nan, math.nan
    interval = binomtest(hits, total).proportion_ci(CI_LEVEL, method="wilson")
    return float(interval.low), float(interval.high)


def fp_per_scan_interval(fp: int, n_subjects: int) -> tuple[float, float]:
    """Exact Poisson interval of the false positives per scan."""
    tail = (1.0 - CI_LEVEL) / 2
    low = chi2.ppf(tail, 2 * fp) / 2 if fp else 0.0
    return float(low) / n_subjects, float(chi2.ppf(1.0 - tail, 2 * fp + 2) / 2) / n_subjects


def _size_bins(edges: tuple[float, ...]) -> list[tuple[str, float, float]]:
    bounds = (0.0, *edges, math.inf)
    bins = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        if low == 0.0:
            label = f"<{high:g}mm"
        elif math.isinf(high):
            label = f">={low:g}mm"
        else:
            label = f"{low:g}-{high:g}mm"
        bins.append((label, low, high))
    return bins


def _in_bin(diameters: np.ndarray, size_bin: tuple[str, float, float] | None) -> np.ndarray:
    if size_bin is None:
        return np.ones(diameters.size, bool)
    _, low, high = size_bin
    if math.isnan(low):
        return np.isnan(diameters)
    return (diameters >= low) & (diameters < high)


def _counts(outcome: Outcome, size_bin=None) -> dict[str, int]:
    ref_in = _in_bin(outcome.ref_diameter, size_bin) & outcome.ref_counted
    pred_in = _in_bin(outcome.pred_bin_diameter, size_bin)
    tp = int(np.count_nonzero(ref_in & outcome.ref_hit))
    fn = int(np.count_nonzero(ref_in & ~outcome.ref_hit))
    fp = int(np.count_nonzero(pred_in & ~outcome.pred_tp & ~outcome.pred_excluded))
    return {
        "n_ref": tp + fn,
        "n_pred": tp + fp,
        "n_ref_excluded": int(
            np.count_nonzero(_in_bin(outcome.ref_diameter, size_bin) & ~outcome.ref_counted)
        ),
        "n_pred_excluded": int(np.count_nonzero(pred_in & outcome.pred_excluded)),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _row(view, scope, group, grid, status, n_subjects, counts, abs_count_diff, dice) -> dict:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {
        "view": view,
        "scope": scope,
        "group": group,
        "grid": grid,
        "status": status,
        "n_subjects": n_subjects,
        **counts,
        "sensitivity": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "fp_per_scan": _ratio(fp, n_subjects),
        "fp_per_lesion": _ratio(fp, counts["n_ref"]),
        "abs_count_diff": abs_count_diff,
        "dice": dice,
        **dict(zip(CI_COLUMNS, wilson_interval(tp, tp + fn)
                   + fp_per_scan_interval(fp, n_subjects))),
    }


def _pooled_row(view, scope, group, grid, outcomes: list[Outcome], size_bin=None) -> dict:
    per_subject = [_counts(outcome, size_bin) for outcome in outcomes]
    counts = {name: sum(c[name] for c in per_subject) for name in COUNT_COLUMNS}
    if size_bin is None:
        abs_diffs = [abs(c["n_pred"] - c["n_ref"]) for c in per_subject]
        abs_count_diff = _ratio(sum(abs_diffs), len(outcomes))
        overlaps = [o.voxel_overlap for o in outcomes if o.voxel_overlap is not None]
        dice = _ratio(2 * sum(o[0] for o in overlaps), sum(o[1] for o in overlaps))
    else:
        abs_count_diff = dice = math.nan
    return _row(view, scope, group, grid, "n/a", len(outcomes), counts, abs_count_diff, dice)


def _median_row(view: str, subject_rows: list[dict]) -> dict:
    row = {"view": view, "scope": "median", "group": "all", "grid": "all", "status": "n/a"}
    row["n_subjects"] = len(subject_rows)
    for name in COUNT_COLUMNS + RATE_COLUMNS:
        values = np.array([r[name] for r in subject_rows], dtype=float)
        values = values[~np.isnan(values)]
        row[name] = float(np.median(values)) if values.size else math.nan
    return {**row, **dict.fromkeys(CI_COLUMNS, math.nan)}


def view_tables(view: str, outcomes: list[Outcome], edges: tuple[float, ...]) -> dict[str, list]:
    subjects = []
    for outcome in outcomes:
        counts = _counts(outcome)
        dice = math.nan
        if outcome.voxel_overlap is not None:
            dice = _ratio(2 * outcome.voxel_overlap[0], outcome.voxel_overlap[1])
        subjects.append(
            _row(
                view,
                "subject",
                outcome.subject,
                outcome.grid,
                outcome.status,
                1,
                counts,
                abs(counts["n_pred"] - counts["n_ref"]),
                dice,
            )
        )
    size_bins = _size_bins(edges)
    if any(np.isnan(o.ref_diameter).any() for o in outcomes):
        size_bins.append(("unknown", math.nan, math.nan))
    grids = sorted({o.grid for o in outcomes})
    return {
        "subjects": subjects,
        "summary": [
            _pooled_row(view, "pooled", "all", "all", outcomes),
            _median_row(view, subjects),
        ],
        "by_size": [
            _pooled_row(view, "size", size_bin[0], "all", outcomes, size_bin)
            for size_bin in size_bins
        ],
        "by_grid": [
            _pooled_row(view, "grid", grid, grid, [o for o in outcomes if o.grid == grid])
            for grid in grids
        ],
    }


def _format_value(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_tsv(tables: dict, path: str | Path) -> None:
    """Write the subject, summary and breakdown rows of ``tables`` to one TSV."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        for name in TABLE_NAMES:
            for row in tables[name]:
                writer.writerow([_format_value(row[column]) for column in COLUMNS])


_PRINTED = (
    ("view", "view"),
    ("group", "group"),
    ("n_subjects", "scans"),
    ("n_ref", "ref"),
    ("n_pred", "pred"),
    ("tp", "TP"),
    ("fp", "FP"),
    ("fn", "FN"),
    ("sensitivity", "sens"),
    ("precision", "prec"),
    ("f1", "F1"),
    ("fp_per_scan", "FP/scan"),
    ("fp_per_lesion", "FP/CMB"),
    ("abs_count_diff", "|dN|"),
    ("dice", "Dice"),
)
# Pooled sections also show the intervals, each after its figure (a key pair prints as
# "low-high").
_INTERVAL_AFTER = {"sensitivity": (CI_COLUMNS[:2], "sens 95% CI"),
                   "fp_per_scan": (CI_COLUMNS[2:], "FP/scan 95% CI")}
_PRINTED_POOLED = tuple(column for printed in _PRINTED
                        for column in (printed, _INTERVAL_AFTER.get(printed[0])) if column)


def _text_table(rows: list[dict], columns) -> list[str]:
    def cell(value):
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.3f}".rstrip("0").rstrip(".")
        return str(value)

    def interval(low, high):
        return "n/a" if math.isnan(low) else f"{low:.2f}-{high:.2f}"

    body = [[interval(*(row[k] for k in key)) if isinstance(key, tuple) else cell(row[key])
             for key, _ in columns] for row in rows]
    header = [title for _, title in columns]
    widths = [max(len(text) for text in column) for column in zip(header, *body)]
    return [
        "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
        for line in [header, *body]
    ]


def format_tables(tables: dict) -> str:
    """Render ``tables`` as plain text for the terminal."""
    lines = []
    sections = (
        ("subjects", "Per subject", _PRINTED[:2] + (("status", "status"),) + _PRINTED[2:]),
        ("summary", "Summary (pooled = sums then ratios; median over subjects)",
         (("scope", "scope"),) + _PRINTED_POOLED[:1] + _PRINTED_POOLED[2:]),
        ("by_size", "By reference lesion diameter (pooled)", _PRINTED_POOLED),
        ("by_grid", "By acquisition grid (pooled)", _PRINTED_POOLED),
    )
    for name, title, columns in sections:
        lines += [title, *_text_table(tables[name], columns), ""]
    lines += ["95% CI: Wilson (sensitivity) and exact Poisson (FP/scan) intervals, lesions and "
              "false positives taken as independent of their scans", ""]
    missing = sorted({r["group"] for r in tables["subjects"] if r["status"] == "missing_results"})
    if missing:
        lines.append("No results (all lesions counted as misses): " + ", ".join(missing))
    extra = [r["subject"] for r in tables["results_without_truth"]]
    if extra:
        lines.append("Results without truth (ignored): " + ", ".join(extra))
    return "\n".join(lines).rstrip() + "\n"
