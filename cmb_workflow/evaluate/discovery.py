"""Finding the truth and result files of each subject (docs/evaluation.md, Inputs)."""

from __future__ import annotations

from pathlib import Path

from .records import EvaluationInputError


def _subject_key(path: Path) -> str:
    return path.name.split("_desc-", 1)[0]


def nested_inside(inner: Path, outer: Path) -> Path | None:
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


def discover_truth(root: Path, skip: Path | None) -> dict[str, dict[str, Path]]:
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


def discover_results(root: Path, skip: Path | None) -> dict[str, tuple[Path, Path | None]]:
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
