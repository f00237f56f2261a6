"""One-to-one matching of one subject's predictions to its reference lesions, in the distance
and the overlap view (docs/evaluation.md, Matching views)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .records import EvaluationInputError, LesionSet, Outcome, Result, Truth

# Affines written by different tools differ by float rounding; a real grid
# mismatch is much larger than this.
AFFINE_TOLERANCE_MM = 1e-3


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


def distance_outcome(truth: Truth, result: Result | None, max_mm: float, min_mm: float) -> Outcome:
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


def overlap_outcome(truth: Truth, result: Result | None, min_mm: float) -> Outcome:
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
