"""Builders for small test inputs: synthetic heads on arbitrary grids, BIDS trees, models."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

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
