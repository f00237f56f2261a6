"""Builders for small test inputs: synthetic heads on arbitrary grids, BIDS trees, models."""

from __future__ import annotations

import csv
import hashlib
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

# The comparison of two output folders is the maintainers' script, shared rather than copied.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import compare_outputs  # noqa: E402

# Head geometry in world mm (scanner RAS), centred near the origin.
BRAIN_RADII = np.array([62.0, 80.0, 60.0])
BLOB_RADIUS_MM = 3.0


def grid_affine(voxel_size, shape, *, axcodes="RAS", rotation_deg=(0, 0, 0), centre=(0, 5, 10)):
    """An affine with the given voxel size, axis order/flips and obliquity, centred on `centre`."""
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    linear = np.zeros((3, 3))
    for column, code in enumerate(axcodes):
        row, sign = axes[code]
        linear[row, column] = sign * voxel_size[column]
    linear = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix() @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre) - linear @ ((np.asarray(shape) - 1) / 2)
    return affine


def make_head(shape, affine, blobs_world=(), *, dtype=np.int16, scale=1000.0, seed=0):
    """A head: bright-ish brain ellipsoid, dark skull, bright scalp, dark blobs; plus its brain mask."""
    rng = np.random.default_rng(seed)
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T
    radius = np.linalg.norm(world / BRAIN_RADII, axis=1)
    # Bright CSF around the brain (as on SWI), then dark skull, then bright scalp.
    image = np.where(radius < 1.0, 0.6, np.where(radius < 1.06, 0.85, 0.0))
    image = np.where((radius >= 1.06) & (radius < 1.12), 0.05, image)  # skull
    image = np.where((radius >= 1.12) & (radius < 1.2), 0.9, image)  # scalp
    for centre in blobs_world:
        distance = np.linalg.norm(world - np.asarray(centre), axis=1)
        image = np.where(distance < BLOB_RADIUS_MM, 0.08, image)
    image = image + rng.normal(0, 0.01, image.shape) * (image > 0)
    data = (image.reshape(shape) * scale).astype(dtype)
    mask = (radius < 1.02).reshape(shape).astype(np.uint8)
    return nib.Nifti1Image(data, affine), nib.Nifti1Image(mask, affine)


def save(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


# A small study: prefix -> (relative path, shape, voxel size, axis codes, rotation, dtype,
# field-of-view centre, blobs in world mm).
SUBJECTS = {
    "sub-01": ("sub-01/anat/sub-01_swi.nii.gz", (340, 400, 75), (0.5, 0.5, 2.0), "LPS",
               (8, 0, -6), np.int16, (0, 5, 10), [(20, 30, 25), (-30, -10, 0)]),
    "sub-02_ses-1": ("sub-02/ses-1/anat/sub-02_ses-1_T2starw.nii.gz", (140, 176, 150),
                     (1.2, 1.1, 1.0), "PIR", (0, 0, 0), np.float32, (0, 5, 10), [(0, 0, 0)]),
    # The field of view stops 5 mm below the top of the brain.
    "sub-03": ("sub-03/anat/sub-03_swi.nii.gz", (160, 200, 150), (1.0, 1.0, 1.0), "RAS",
               (0, 0, 0), np.int16, (0, 0, -20), [(-15, 20, -10)]),
}


def write_study(root: Path) -> Path:
    """The SUBJECTS as a BIDS tree; sub-02 comes with its brain mask."""
    for prefix, (relative, shape, zooms, axcodes, rotation, dtype, centre, blobs) in SUBJECTS.items():
        affine = grid_affine(zooms, shape, axcodes=axcodes, rotation_deg=rotation, centre=centre)
        image, mask = make_head(shape, affine, blobs, dtype=dtype)
        save(image, root / relative)
        if prefix == "sub-02_ses-1":
            save(mask, root / relative.replace("_T2starw", "_desc-brain_mask"))
    return root


def write_small_heads(root: Path, count: int) -> Path:
    """sub-01 .. sub-<count>: quarter-size heads (about 31 x 40 x 30 mm) with their brain masks,
    for tests of the workflow's mechanics on many images: each takes about a second, not half
    a minute. The template registration fails on them (registration_failure), which a
    supplied mask allows."""
    shape = (48, 60, 48)
    drawn = grid_affine((3.5, 3.5, 3.5), shape)
    quarter = grid_affine((0.875, 0.875, 0.875), shape, centre=(0, 1.25, 2.5))
    for n in range(1, count + 1):
        image, mask = make_head(shape, drawn, [(10, 10 * (n % 3), 10)], seed=n)
        anat = root / f"sub-{n:02d}/anat"
        save(nib.Nifti1Image(np.asarray(image.dataobj), quarter), anat / f"sub-{n:02d}_swi.nii.gz")
        save(nib.Nifti1Image(np.asarray(mask.dataobj), quarter),
             anat / f"sub-{n:02d}_desc-brain_mask.nii.gz")
    return root


# The model input box of write_small_heads's images (model_builders.build_dark_voxel_detector).
SMALL_HEADS_BOX = (40, 48, 40)


def read_tsv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def comparable_bytes(path: Path) -> bytes:
    """A result file's bytes, less the report's command line (it names OUT and the plugin,
    which differ between runs that must otherwise give the same results)."""
    data = path.read_bytes()
    if path.name.endswith("_report.html"):
        data = compare_outputs.COMMAND_LINE.sub(r"\1\2", data.decode()).encode()
    return data


def result_digests(out: Path) -> dict[str, str]:
    """Every result file's comparable bytes, hashed: runs that must give byte-identical files."""
    return {relative: hashlib.sha256(comparable_bytes(path)).hexdigest()
            for relative, path in compare_outputs.output_files(out).items()}


def assert_same_results(out: Path, reference: Path) -> None:
    """Same files; NIfTI voxels and headers equal, other files equal as text
    (scripts/compare_outputs.py, whose verdicts pytest shows on failure)."""
    assert compare_outputs.compare_folders(reference, out) == 0
