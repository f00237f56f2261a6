"""What the evaluation reads and what matching one subject gives; the error for bad input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
