"""evaluate(): discover the files, read each subject, match it in every view, tabulate."""

from __future__ import annotations

from pathlib import Path

from ..models import is_probability
from .discovery import discover_results, discover_truth, nested_inside
from .matching import distance_outcome, overlap_outcome
from .readers import load_result, load_truth
from .records import EvaluationInputError, Outcome
from .tables import DEFAULT_SIZE_BINS_MM, TABLE_NAMES, view_tables, write_tsv


def _existing_dir(path: str | Path, role: str) -> Path:
    directory = Path(path).expanduser().resolve()
    if not directory.is_dir():
        raise EvaluationInputError(f"{path}: {role} directory does not exist")
    return directory


def evaluate(
    truth_dir: str | Path,
    results_dir: str | Path,
    *,
    out_tsv: str | Path | None = None,
    match_distance_mm: float = 5.0,
    min_diameter_mm: float = 0.0,
    size_bins_mm: tuple[float, ...] = DEFAULT_SIZE_BINS_MM,
    min_peak_probability: float = 0.0,
    drop_likely_mimics: bool = False,
) -> dict[str, list[dict]]:
    """Score detections in ``results_dir`` against the reference in ``truth_dir``.

    Returns tables as lists of row dicts (columns: docs/evaluation.md):
    ``subjects``, ``summary`` (pooled and median rows), ``by_size``,
    ``by_grid``, and ``results_without_truth`` (rows with ``subject`` and
    ``path``).  Rows of every view are included; undefined values are NaN.
    Writes ``out_tsv`` when given.  Raises ``EvaluationInputError`` on bad input.
    min_peak_probability, drop_likely_mimics: see docs/evaluation.md.
    """
    if not is_probability(min_peak_probability):
        raise EvaluationInputError(
            f"min peak probability {min_peak_probability}: expected a value between 0 and 1"
        )
    edges = tuple(float(edge) for edge in size_bins_mm)
    if any(edge <= 0 for edge in edges) or list(edges) != sorted(set(edges)):
        raise EvaluationInputError(
            f"size bins {size_bins_mm}: expected increasing positive diameters"
        )
    truth_root = _existing_dir(truth_dir, "truth")
    results_root = _existing_dir(results_dir, "results")
    truth_files = discover_truth(truth_root, nested_inside(results_root, truth_root))
    result_files = discover_results(results_root, nested_inside(truth_root, results_root))
    if not truth_files:
        raise EvaluationInputError(
            f"{truth_dir}: no *_desc-cmb_lesions.json, *_desc-cmb_mask.nii.gz "
            "or *_desc-cmb_dseg.nii.gz found"
        )
    if not result_files:
        raise EvaluationInputError(f"{results_dir}: no *_desc-cmb_lesions.tsv found")

    variants = ("", "_no_mimics") if drop_likely_mimics else ("",)
    outcomes: dict[str, list[Outcome]] = {
        f"{view}{suffix}": [] for suffix in variants for view in ("distance", "overlap")}
    for key in sorted(truth_files):
        truth = load_truth(key, truth_files[key])
        results = (
            load_result(key, *result_files[key], min_peak_probability, drop_likely_mimics)
            if key in result_files
            else {}
        )
        for suffix in variants:
            result = results.get(suffix)
            outcomes[f"distance{suffix}"].append(
                distance_outcome(truth, result, match_distance_mm, min_diameter_mm)
            )
            if truth.image is not None and (result is None or result.image is not None):
                outcomes[f"overlap{suffix}"].append(
                    overlap_outcome(truth, result, min_diameter_mm))

    tables: dict[str, list] = {name: [] for name in TABLE_NAMES}
    for view, view_outcomes in outcomes.items():
        if view_outcomes:
            for name, rows in view_tables(view, view_outcomes, edges).items():
                tables[name] += rows
    tables["results_without_truth"] = [
        {"subject": key, "path": str(result_files[key][0])}
        for key in sorted(set(result_files) - set(truth_files))
    ]
    if out_tsv is not None:
        write_tsv(tables, out_tsv)
    return tables
