"""Find the images to process in a BIDS-like folder (or SHiVAi's 'standard' layout)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger("cmb_workflow.inputs")

MODALITY_SUFFIXES = ("swi", "T2starw")
# Entities kept in output names, in BIDS order; echo is dropped because one echo is used.
OUTPUT_ENTITIES = ("sub", "ses", "acq", "rec", "run")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")


class InputError(ValueError):
    pass


@dataclass(frozen=True)
class Rejected:
    """A file that was found but not processed; it is listed in the summary with its reason."""

    source: str
    reason: str
    status: str = "failed"  # failed: it clashes with another image; skipped: not usable as named


@dataclass(frozen=True)
class ImageJob:
    """One image to process and where its results go."""

    source: Path
    modality: str
    entities: tuple[tuple[str, str], ...]
    mask: Path | None = None

    @property
    def entity(self) -> dict:
        return dict(self.entities)

    @property
    def prefix(self) -> str:
        """sub-X[_ses-Y][_acq-..][_run-Z]: the start of every output file name."""
        return "_".join(f"{key}-{value}" for key, value in self.entities if key in OUTPUT_ENTITIES)

    @property
    def relative_prefix(self) -> str:
        entity = self.entity
        parts = [f"sub-{entity['sub']}"] + ([f"ses-{entity['ses']}"] if "ses" in entity else [])
        return "/".join(parts + ["anat", self.prefix])

    @property
    def node_name(self) -> str:
        return self.prefix.replace("-", "_")


def parse_entities(name: str):
    """('sub-01_ses-1_run-2_swi.nii.gz') -> ((('sub','01'),('ses','1'),('run','2')), 'swi')."""
    match = _NIFTI.match(name)
    stem = match.group("stem") if match else name.split(".")[0]
    *pairs, suffix = stem.split("_")
    entities = []
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not _LABEL.match(key) or not _LABEL.match(value):
            raise InputError(f"{name}: '{pair}' is not a BIDS key-value entity "
                             "(labels are letters and digits only)")
        entities.append((key, value))
    if not entities or entities[0][0] != "sub":
        raise InputError(f"{name}: BIDS file names start with sub-<label>")
    return tuple(entities), suffix


def validate_label(label: str, what: str) -> str:
    label = label.removeprefix(f"{what}-")
    if not _LABEL.match(label):
        raise InputError(f"{what} label {label!r}: only letters and digits are allowed")
    return label


def find_images(root, *, input_type: str = "bids", participant_label=(), session_label=(),
                echo: int = 1, masks_dir=None) -> tuple[list[ImageJob], list[Rejected]]:
    """Images to process, and the files that were found but cannot be used."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: input folder does not exist")
    subjects = {validate_label(s, "sub") for s in participant_label}
    sessions = {validate_label(s, "ses") for s in session_label}
    rejected: list[Rejected] = []
    candidates = (_bids_candidates(root, rejected) if input_type == "bids"
                  else _standard_candidates(root))
    jobs = []
    for path, entities, suffix in candidates:
        entity = dict(entities)
        if subjects and entity["sub"] not in subjects:
            continue
        if sessions and entity.get("ses") not in sessions:
            continue
        if "echo" in entity and entity["echo"] != str(echo):
            LOGGER.info("%s: skipped, echo %s is used", path, echo)
            continue
        jobs.append(ImageJob(path, suffix, entities))
    jobs, clashes = _drop_clashes(jobs)
    rejected += clashes
    if not jobs and not rejected:
        raise InputError(_nothing_found(root, input_type, bool(subjects or sessions)))
    return [_with_mask(job, masks_dir) for job in jobs], rejected


def _nothing_found(root: Path, input_type: str, filtered: bool) -> str:
    """Why no image was found: the layout that was expected and the images that were seen."""
    if filtered:
        return f"{root}: no *_swi or *_T2starw images found for the selected subjects/sessions"
    expected = ("sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>]_swi.nii[.gz] (or "
                "_T2starw)" if input_type == "bids" else "<subject>/swi/<image>.nii[.gz]")
    seen = sorted(str(path.relative_to(root)) for path in root.rglob("*.nii*")
                  if "derivatives" not in path.relative_to(root).parts)
    message = f"{root}: no image found in the expected layout {expected}"
    if seen:
        shown = ", ".join(seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")
        message += f"; seen but not used: {shown}"
        if input_type == "bids":
            message += ("; for one folder per subject holding swi/<image>, use --input-type "
                        "standard, or arrange the files as BIDS")
    return message


def _bids_candidates(root: Path, rejected: list[Rejected]):
    for path in sorted(root.glob("sub-*/**/anat/*.nii*")):
        if "derivatives" in path.relative_to(root).parts:
            continue
        try:
            entities, suffix = parse_entities(path.name)
        except InputError as exc:
            if _modality_suffix(path.name):
                rejected.append(Rejected(str(path), str(exc).removeprefix(f"{path.name}: "),
                                         "skipped"))
            else:
                LOGGER.debug("%s", exc)
            continue
        if suffix in MODALITY_SUFFIXES and path.name.startswith(path.parts[len(root.parts)]):
            yield path, entities, suffix


def _modality_suffix(name: str) -> bool:
    """Whether a file name ends like an image this tool reads (_swi or _T2starw NIfTI)."""
    match = _NIFTI.match(name)
    return bool(match) and match.group("stem").rsplit("_", 1)[-1] in MODALITY_SUFFIXES


def _standard_candidates(root: Path):
    """SHiVAi's layout: IN/<subject>/swi/<one image>.nii[.gz]."""
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(subject_dir.glob("swi/*.nii*"))
        if not images:
            continue
        label = re.sub(r"[^A-Za-z0-9]", "", subject_dir.name.removeprefix("sub-"))
        if not label:
            LOGGER.warning("%s: cannot derive a subject label", subject_dir)
            continue
        for run, image in enumerate(images, start=1):
            entities = (("sub", label),) + ((("run", str(run)),) if len(images) > 1 else ())
            yield image, entities, "swi"


def _drop_clashes(jobs):
    """Two images that would write the same outputs (e.g. swi and T2starw of one session)."""
    by_prefix: dict[str, ImageJob] = {}
    rejected = []
    for job in jobs:
        if job.prefix in by_prefix:
            rejected.append(Rejected(str(job.source), f"outputs would overwrite those of "
                                     f"{by_prefix[job.prefix].source.name}; give the images "
                                     "distinct acq- or run- entities"))
        else:
            by_prefix[job.prefix] = job
    return list(by_prefix.values()), rejected


def _with_mask(job: ImageJob, masks_dir) -> ImageJob:
    """A *_desc-brain_mask beside the image, or in masks_dir, whose entities fit the image's."""
    folders = [job.source.parent]
    if masks_dir:
        folders.insert(0, Path(masks_dir) / Path(job.relative_prefix).parent)
    entity = job.entity
    best, best_score = None, -1
    for folder in folders:
        for path in sorted(folder.glob("*_desc-brain_mask.nii*")):
            try:
                entities, _ = parse_entities(path.name)
            except InputError:
                continue
            keys = {k: v for k, v in entities if k not in ("desc", "space")}
            if all(entity.get(k) == v for k, v in keys.items()) and len(keys) > best_score:
                best, best_score = path, len(keys)
        if best:
            break
    return ImageJob(job.source, job.modality, job.entities, best)
