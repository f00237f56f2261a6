"""Lesion-wise evaluation of microbleed detections against a reference.

``cmb-workflow evaluate --truth DIR --results DIR [--out TSV]``

Inputs
------
Truth directory, searched recursively (files whose names start with the BIDS
entities, e.g. ``sub-01_ses-1_desc-cmb_lesions.json``):

* ``*_desc-cmb_lesions.json`` - ``{"grid": {"label": ...}, "lesions": [{"x", "y",
  "z", "diameter_mm", ...}]}``, centres in world (scanner RAS) mm.
* ``*_desc-cmb_mask.nii.gz`` or ``*_desc-cmb_dseg.nii.gz`` - integer label image;
  a binary (0/1) image is split into 26-connected components.

Results directory, searched recursively:

* ``*_desc-cmb_lesions.tsv`` - columns ``label x y z volume_mm3`` at least.
* ``*_desc-cmb_dseg.nii.gz`` next to it (optional) - labels 1..N.

Subjects are paired on the file name up to ``_desc-``.  When one directory lies
inside the other, the inner one is left out of the outer one's search, and a
``*_desc-cmb_dseg.nii.gz`` that sits beside a ``*_desc-cmb_lesions.tsv`` is a
pipeline output, never truth.  Hidden folders are skipped.

Matching views
--------------
``distance``
    VALDO 2021 task 2: a prediction (its TSV centre) hits a reference lesion
    whose centre is within ``match_distance_mm`` (5 mm).  Reference lesions come
    from the truth JSON, or from the truth mask's components (centre of mass,
    equivalent-sphere diameter) when there is no JSON.
``overlap``
    A prediction component hits a reference component when they share at
    least one voxel.  Only for subjects with a truth mask and a predicted dseg
    (or no results at all); both must be on the same voxel grid.  Reference
    diameters are the components' equivalent-sphere diameters.

Both views match one to one with an optimal assignment: the number of hits is
maximised first, then the total centre distance (distance view) or the total
``1 - IoU`` (overlap view) is minimised.  So one prediction close to two
references counts once, and the other reference is a miss.

With ``min_peak_probability`` > 0, only predictions whose ``max_prob`` (a
column of the lesion table then needed) reaches it are scored, as if the
pipeline had been run with that ``min_peak_probability``: one set of results
then shows the trade-off between sensitivity and false positives at several
detection thresholds.

With ``drop_likely_mimics``, each view is scored a second time without the
predictions whose ``likely_mimic`` column says ``yes`` (views
``distance_no_mimics`` and ``overlap_no_mimics``), as if the pipeline had
been run with ``--drop-likely-mimics``.

With ``min_diameter_mm`` > 0, reference lesions smaller than that are
*excluded*: not counted as misses, and predictions matched to them are neither
hits nor false positives.  Counted references are matched first, excluded ones
then take their pick of the predictions left over.

TSV layout (one row per subject, summary or breakdown; ``n/a`` = undefined)
-----------------------------------------------------------------------------
view             ``distance`` or ``overlap`` (``_no_mimics`` appended: without
                 the likely mimics)
scope            ``subject``, ``pooled``, ``median``, ``size`` or ``grid``
group            subject key (subject rows), ``all`` (pooled, median), size bin
                 such as ``3-5mm`` meaning 3 <= d < 5 mm (size), grid label (grid)
grid             the truth JSON's ``grid.label`` (``unknown`` when absent) for
                 subject and grid rows, ``all`` otherwise
status           ``ok`` or ``missing_results`` (subject rows), ``n/a`` otherwise
n_subjects       subjects in the row
n_ref            counted reference lesions (tp + fn)
n_pred           counted predictions (tp + fp)
n_ref_excluded   reference lesions below ``min_diameter_mm``
n_pred_excluded  predictions matched to excluded reference lesions
tp, fp, fn       hits, false positives, misses
sensitivity      tp / (tp + fn); n/a without reference lesions
precision        tp / (tp + fp); n/a without predictions
f1               2 tp / (2 tp + fp + fn); n/a when all three are 0
fp_per_scan      fp / n_subjects (FPavg)
fp_per_lesion    fp / n_ref (FPcmb); n/a without reference lesions
abs_count_diff   |n_pred - n_ref| per subject; its mean over subjects in pooled
                 and grid rows; n/a in size rows
dice             voxel Dice of truth mask and predicted dseg (subject); pooled
                 as 2 sum(intersection) / sum(volumes); n/a when both masks are
                 empty (two empty masks give n/a, not 1) or either is absent,
                 and in size rows; whole masks, so ``min_diameter_mm`` does
                 not apply to it
sensitivity_ci_low, sensitivity_ci_high
                 95 % Wilson score interval of the sensitivity; n/a without
                 reference lesions
fp_per_scan_ci_low, fp_per_scan_ci_high
                 95 % exact (Garwood) Poisson interval of the false positives
                 per scan

Both intervals treat lesions and false positives as independent of the scan
they are on; when they cluster on a few scans the true uncertainty is larger.
n/a in median rows.

Pooled rows sum the counts over subjects, then take the ratios.  Median rows
hold the per-subject median of every numeric column, leaving out subjects where
the value is n/a (e.g. sensitivity of a subject without reference lesions).
Size rows pool all subjects: references fall in the bin of their own diameter,
predictions in the bin of their matched reference, or of their own
equivalent-sphere diameter (from ``volume_mm3``, or the dseg component volume
in the overlap view) when unmatched.  A subject without results counts all its
reference lesions as misses.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.stats import binomtest, chi2

from .models import is_probability

DEFAULT_SIZE_BINS_MM = (3.0, 5.0, 10.0)
RESULTS_COLUMNS = ("label", "x", "y", "z", "volume_mm3")
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
# Affines written by different tools differ by float rounding; a real grid
# mismatch is much larger than this.
AFFINE_TOLERANCE_MM = 1e-3


class EvaluationInputError(ValueError):
    """Bad or inconsistent input; the message names the file and the problem."""


@dataclass
class LesionSet:
    centres: np.ndarray  # (n, 3) world mm
    diameters: np.ndarray  # (n,) mm; NaN when unknown


@dataclass
class LabelImage:
    path: Path
    labels: np.ndarray  # 3-D integer labels, 0 = background
    affine: np.ndarray
    ids: np.ndarray  # sorted non-zero labels present
    voxel_counts: np.ndarray  # voxels per id
    lesions: LesionSet


@dataclass
class Truth:
    key: str
    grid: str
    lesions: LesionSet  # from the JSON, else from the mask
    lesion_source: Path
    image: LabelImage | None


@dataclass
class Result:
    key: str
    lesions: LesionSet
    image: LabelImage | None


@dataclass
class Outcome:
    """Per-lesion matching result for one subject in one view."""

    subject: str
    grid: str
    status: str
    ref_diameter: np.ndarray
    ref_counted: np.ndarray  # False for references below the minimum diameter
    ref_hit: np.ndarray
    pred_bin_diameter: np.ndarray  # matched reference's diameter, else its own
    pred_tp: np.ndarray
    pred_excluded: np.ndarray
    voxel_overlap: tuple[int, int] | None  # (intersection, sum of both volumes)


# ---------------------------------------------------------------- discovery


def _subject_key(path: Path) -> str:
    return path.name.split("_desc-", 1)[0]


def _nested_inside(inner: Path, outer: Path) -> Path | None:
    """``inner`` when it lies strictly inside ``outer``, so ``outer``'s search can skip it."""
    if inner != outer and inner.is_relative_to(outer):
        return inner
    return None


def _find(root: Path, pattern: str, skip: Path | None) -> list[Path]:
    found = []
    for path in sorted(root.rglob(pattern)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if skip is not None and path.is_relative_to(skip):
            continue
        found.append(path)
    return found


def _is_pipeline_output(dseg: Path) -> bool:
    return dseg.with_name(f"{_subject_key(dseg)}_desc-cmb_lesions.tsv").exists()


def _discover_truth(root: Path, skip: Path | None) -> dict[str, dict[str, Path]]:
    """Map subject key -> {"json": path, "mask": path} (either may be absent)."""
    candidates = [("json", p) for p in _find(root, "*_desc-cmb_lesions.json", skip)]
    candidates += [("mask", p) for p in _find(root, "*_desc-cmb_mask.nii.gz", skip)]
    candidates += [
        ("mask", p)
        for p in _find(root, "*_desc-cmb_dseg.nii.gz", skip)
        if not _is_pipeline_output(p)
    ]
    subjects: dict[str, dict[str, Path]] = {}
    for kind, path in candidates:
        entry = subjects.setdefault(_subject_key(path), {})
        if kind in entry:
            raise EvaluationInputError(
                f"{path}: a second truth {kind} for subject {_subject_key(path)} "
                f"(first: {entry[kind]}); keep one"
            )
        entry[kind] = path
    return subjects


def _discover_results(root: Path, skip: Path | None) -> dict[str, tuple[Path, Path | None]]:
    """Map subject key -> (lesion TSV, dseg beside it or None)."""
    subjects: dict[str, tuple[Path, Path | None]] = {}
    for tsv in _find(root, "*_desc-cmb_lesions.tsv", skip):
        key = _subject_key(tsv)
        if key in subjects:
            raise EvaluationInputError(
                f"{tsv}: a second results table for subject {key} (first: {subjects[key][0]})"
            )
        dseg = tsv.with_name(f"{key}_desc-cmb_dseg.nii.gz")
        subjects[key] = (tsv, dseg if dseg.exists() else None)
    return subjects


# ---------------------------------------------------------------- readers


def _equivalent_diameter(volume_mm3: np.ndarray) -> np.ndarray:
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=float) / math.pi)


def _finite_number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _read_truth_json(path: Path) -> tuple[LesionSet, str]:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationInputError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(document, dict) or not isinstance(document.get("lesions"), list):
        raise EvaluationInputError(f"{path}: expected an object with a 'lesions' list")
    centres, diameters = [], []
    for number, lesion in enumerate(document["lesions"], start=1):
        if not isinstance(lesion, dict):
            raise EvaluationInputError(f"{path}: lesion #{number} is not an object")
        centre = [_finite_number(lesion.get(axis)) for axis in "xyz"]
        if None in centre:
            raise EvaluationInputError(f"{path}: lesion #{number} needs numeric 'x', 'y' and 'z'")
        diameter = lesion.get("diameter_mm")
        if diameter is not None and (_finite_number(diameter) is None or diameter <= 0):
            raise EvaluationInputError(
                f"{path}: lesion #{number} has diameter_mm {diameter!r}; expected a positive number"
            )
        centres.append(centre)
        diameters.append(math.nan if diameter is None else float(diameter))
    grid = document.get("grid")
    label = grid.get("label") if isinstance(grid, dict) else None
    lesions = LesionSet(np.reshape(np.array(centres, dtype=float), (-1, 3)), np.array(diameters))
    return lesions, str(label) if label not in (None, "") else "unknown"


def _read_label_image(path: Path, split_binary: bool) -> LabelImage:
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise EvaluationInputError(f"{path}: cannot read image ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise EvaluationInputError(f"{path}: expected a 3-D label image, got shape {data.shape}")
    if not np.all(np.isfinite(data)) or np.any(data < 0) or np.any(data != np.round(data)):
        raise EvaluationInputError(f"{path}: values must be non-negative integer labels")
    labels = data.astype(np.int32)
    if split_binary and labels.max(initial=0) <= 1:
        labels, _ = ndimage.label(labels, structure=np.ones((3, 3, 3)))
    # One pass over the image for every label's voxels (center_of_mass takes one per axis
    # and label set, four times as long on native grids of a 0.5 mm scan).
    voxels = ndimage.value_indices(labels, ignore_value=0)
    ids = np.array(sorted(voxels), dtype=np.int32)
    voxel_counts = np.array([voxels[label][0].size for label in ids], dtype=int)
    voxel_volume = abs(np.linalg.det(image.affine[:3, :3]))
    centres = np.zeros((0, 3))
    if ids.size:
        voxel_centres = np.array([np.mean(voxels[label], axis=1) for label in ids])
        centres = nib.affines.apply_affine(image.affine, voxel_centres)
    lesions = LesionSet(centres, _equivalent_diameter(voxel_counts * voxel_volume))
    return LabelImage(path, labels, image.affine, ids, voxel_counts, lesions)


def _read_results_tsv(path: Path, with_peaks: bool, with_mimics: bool = False
                      ) -> tuple[np.ndarray, LesionSet, np.ndarray, np.ndarray | None]:
    """Return the labels, lesions, (with_peaks; else NaN) max_prob and (with_mimics; else None)
    likely_mimic as booleans of a pipeline lesion table."""
    columns = RESULTS_COLUMNS + (("max_prob",) if with_peaks else ())
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if reader.fieldnames is None:
            raise EvaluationInputError(
                f"{path}: empty file; expected a header with columns {' '.join(RESULTS_COLUMNS)}"
            )
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        missing = [name for name in columns if name not in reader.fieldnames]
        if missing:
            raise EvaluationInputError(f"{path}: missing column(s) {', '.join(missing)}")
        if with_mimics and "likely_mimic" not in reader.fieldnames:
            raise EvaluationInputError(f"{path}: missing column likely_mimic (needed to drop "
                                       "the likely mimics)")
        rows = list(reader)
    values = np.zeros((len(rows), len(columns)))
    for index, row in enumerate(rows):
        for column, name in enumerate(columns):
            try:
                values[index, column] = float(row[name])
            except (TypeError, ValueError):
                raise EvaluationInputError(
                    f"{path}: line {index + 2}: {name} {row[name]!r} is not a number"
                ) from None
    if not np.all(np.isfinite(values)) or np.any(values[:, 4] < 0):
        raise EvaluationInputError(f"{path}: non-finite value or negative volume_mm3")
    peaks = values[:, 5] if with_peaks else np.full(len(rows), math.nan)
    lesions = LesionSet(values[:, 1:4], _equivalent_diameter(values[:, 4]))
    mimics = np.array([row["likely_mimic"] == "yes" for row in rows], dtype=bool) \
        if with_mimics else None
    return values[:, 0].astype(int), lesions, peaks, mimics


def _load_truth(key: str, files: dict[str, Path]) -> Truth:
    image = _read_label_image(files["mask"], split_binary=True) if "mask" in files else None
    if "json" in files:
        lesions, grid = _read_truth_json(files["json"])
        return Truth(key, grid, lesions, files["json"], image)
    return Truth(key, "unknown", image.lesions, image.path, image)


def _load_result(key: str, tsv: Path, dseg: Path | None, min_peak_probability: float,
                 drop_likely_mimics: bool = False) -> dict[str, Result]:
    """The result of each variant: "" (every lesion at the detection threshold) and, with
    drop_likely_mimics, "_no_mimics"; the files are read once."""
    labels, lesions, peaks, mimics = _read_results_tsv(
        tsv, with_peaks=min_peak_probability > 0, with_mimics=drop_likely_mimics)
    image = None
    if dseg is not None:
        # Labels 1..N are the pipeline's lesion ids: keep them, never re-split.
        image = _read_label_image(dseg, split_binary=False)
        if set(image.ids.tolist()) != set(labels.tolist()):
            warnings.warn(f"{dseg}: its labels differ from those in {tsv}", stacklevel=2)
    confident = peaks >= min_peak_probability if min_peak_probability > 0 \
        else np.ones(len(labels), dtype=bool)
    variants = {"": confident}
    if drop_likely_mimics:
        variants["_no_mimics"] = confident & ~mimics
    return {suffix: Result(key, _subset(lesions, kept) if not kept.all() else lesions,
                           _kept_labels(image, labels[kept])
                           if image is not None and not kept.all() else image)
            for suffix, kept in variants.items()}


def _subset(lesions: LesionSet, kept: np.ndarray) -> LesionSet:
    return LesionSet(lesions.centres[kept], lesions.diameters[kept])


def _kept_labels(image: LabelImage, labels: np.ndarray) -> LabelImage:
    """image with only `labels` left."""
    kept = np.isin(image.ids, labels)
    return LabelImage(image.path, np.where(np.isin(image.labels, image.ids[kept]), image.labels, 0),
                      image.affine, image.ids[kept], image.voxel_counts[kept],
                      _subset(image.lesions, kept))


# ---------------------------------------------------------------- matching


def _assign(allowed: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of rows to columns over allowed pairs only.

    Maximises the number of matched pairs, then minimises their total cost
    (costs must be >= 0).
    """
    if not allowed.any():
        return np.zeros(0, int), np.zeros(0, int)
    # A forbidden pair costs more than all allowed pairs together, so the
    # solver takes one only where no allowed pair could replace it.
    penalty = cost[allowed].sum() + 1.0
    rows, cols = linear_sum_assignment(np.where(allowed, cost, penalty))
    keep = allowed[rows, cols]
    return rows[keep], cols[keep]


def _score(
    truth: Truth,
    status: str,
    ref_diameter: np.ndarray,
    pred_diameter: np.ndarray,
    allowed: np.ndarray,
    cost: np.ndarray,
    min_diameter_mm: float,
    voxel_overlap: tuple[int, int] | None,
) -> Outcome:
    ref_counted = ~(ref_diameter < min_diameter_mm)
    ref_match = np.full(ref_diameter.size, -1)
    pred_match = np.full(pred_diameter.size, -1)
    # Counted references get first pick, so an excluded small lesion never
    # takes a prediction away from a lesion that counts.
    for refs in (np.flatnonzero(ref_counted), np.flatnonzero(~ref_counted)):
        free = np.flatnonzero(pred_match < 0)
        rows, cols = _assign(allowed[np.ix_(refs, free)], cost[np.ix_(refs, free)])
        ref_match[refs[rows]] = free[cols]
        pred_match[free[cols]] = refs[rows]

    matched = np.flatnonzero(pred_match >= 0)
    matched_refs = pred_match[matched]
    pred_tp = np.zeros(pred_diameter.size, bool)
    pred_excluded = np.zeros(pred_diameter.size, bool)
    pred_bin_diameter = pred_diameter.copy()
    pred_tp[matched] = ref_counted[matched_refs]
    pred_excluded[matched] = ~ref_counted[matched_refs]
    pred_bin_diameter[matched] = ref_diameter[matched_refs]
    return Outcome(
        truth.key,
        truth.grid,
        status,
        ref_diameter,
        ref_counted,
        ref_match >= 0,
        pred_bin_diameter,
        pred_tp,
        pred_excluded,
        voxel_overlap,
    )


def _distance_outcome(truth: Truth, result: Result | None, max_mm: float, min_mm: float) -> Outcome:
    if min_mm > 0 and np.isnan(truth.lesions.diameters).any():
        raise EvaluationInputError(
            f"{truth.lesion_source}: a lesion lacks diameter_mm, which --min-diameter needs"
        )
    pred = result.lesions if result else LesionSet(np.zeros((0, 3)), np.zeros(0))
    distance = np.linalg.norm(truth.lesions.centres[:, None, :] - pred.centres[None, :, :], axis=-1)
    return _score(
        truth,
        "ok" if result else "missing_results",
        truth.lesions.diameters,
        pred.diameters,
        distance <= max_mm,
        distance,
        min_mm,
        None,
    )


def _overlap_outcome(truth: Truth, result: Result | None, min_mm: float) -> Outcome:
    ref = truth.image
    if result is None:
        pred_labels, pred_ids = np.zeros_like(ref.labels), np.zeros(0, int)
        pred_counts, pred_diameters = np.zeros(0, int), np.zeros(0)
    else:
        pred = result.image
        if pred.labels.shape != ref.labels.shape or not np.allclose(
            pred.affine, ref.affine, atol=AFFINE_TOLERANCE_MM
        ):
            raise EvaluationInputError(
                f"{pred.path}: voxel grid {pred.labels.shape} differs from truth mask {ref.path} "
                f"{ref.labels.shape}; overlap matching and Dice need the same grid"
            )
        pred_labels, pred_ids = pred.labels, pred.ids
        pred_counts, pred_diameters = pred.voxel_counts, pred.lesions.diameters

    both = (ref.labels > 0) & (pred_labels > 0)
    shared = np.zeros((ref.ids.size, pred_ids.size))
    np.add.at(
        shared,
        (np.searchsorted(ref.ids, ref.labels[both]), np.searchsorted(pred_ids, pred_labels[both])),
        1,
    )
    union = np.add.outer(ref.voxel_counts, pred_counts) - shared
    iou = np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)
    volumes = int(np.count_nonzero(ref.labels)) + int(np.count_nonzero(pred_labels))
    return _score(
        truth,
        "ok" if result else "missing_results",
        ref.lesions.diameters,
        pred_diameters,
        shared > 0,
        1.0 - iou,
        min_mm,
        (int(both.sum()), volumes),
    )


# ---------------------------------------------------------------- tables


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def wilson_interval(hits: int, total: int) -> tuple[float, float]:
    """Wilson interval (CI_LEVEL) of the proportion hits / total; NaNs when total is 0."""
    if not total:
        return math.nan, math.nan
    interval = binomtest(hits, total).proportion_ci(CI_LEVEL, method="wilson")
    return float(interval.low), float(interval.high)


def _fp_per_scan_interval(fp: int, n_subjects: int) -> tuple[float, float]:
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
                   + _fp_per_scan_interval(fp, n_subjects))),
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


def _view_tables(view: str, outcomes: list[Outcome], edges: tuple[float, ...]) -> dict[str, list]:
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


# ---------------------------------------------------------------- output


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


# ---------------------------------------------------------------- entry points


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

    Returns tables as lists of row dicts (columns as in the module docstring):
    ``subjects``, ``summary`` (pooled and median rows), ``by_size``,
    ``by_grid``, and ``results_without_truth`` (rows with ``subject`` and
    ``path``).  Rows of every view are included; undefined values are NaN.
    Writes ``out_tsv`` when given.  Raises ``EvaluationInputError`` on bad input.
    min_peak_probability, drop_likely_mimics: see the module docstring.
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
    truth_files = _discover_truth(truth_root, _nested_inside(results_root, truth_root))
    result_files = _discover_results(results_root, _nested_inside(truth_root, results_root))
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
        truth = _load_truth(key, truth_files[key])
        results = (
            _load_result(key, *result_files[key], min_peak_probability, drop_likely_mimics)
            if key in result_files
            else {}
        )
        for suffix in variants:
            result = results.get(suffix)
            outcomes[f"distance{suffix}"].append(
                _distance_outcome(truth, result, match_distance_mm, min_diameter_mm)
            )
            if truth.image is not None and (result is None or result.image is not None):
                outcomes[f"overlap{suffix}"].append(
                    _overlap_outcome(truth, result, min_diameter_mm))

    tables: dict[str, list] = {name: [] for name in TABLE_NAMES}
    for view, view_outcomes in outcomes.items():
        if view_outcomes:
            for name, rows in _view_tables(view, view_outcomes, edges).items():
                tables[name] += rows
    tables["results_without_truth"] = [
        {"subject": key, "path": str(result_files[key][0])}
        for key in sorted(set(result_files) - set(truth_files))
    ]
    if out_tsv is not None:
        write_tsv(tables, out_tsv)
    return tables


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
