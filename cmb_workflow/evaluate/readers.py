"""Reading truth JSONs, label images and result tables into lesion sets."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .records import EvaluationInputError, LabelImage, LesionSet, Result, Truth

RESULTS_COLUMNS = ("label", "x", "y", "z", "volume_mm3")


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


def load_truth(key: str, files: dict[str, Path]) -> Truth:
    image = _read_label_image(files["mask"], split_binary=True) if "mask" in files else None
    if "json" in files:
        lesions, grid = _read_truth_json(files["json"])
        return Truth(key, grid, lesions, files["json"], image)
    return Truth(key, "unknown", image.lesions, image.path, image)


def load_result(key: str, tsv: Path, dseg: Path | None, min_peak_probability: float,
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
