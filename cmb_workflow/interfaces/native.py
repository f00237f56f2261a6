"""Bring maps from the cropped 1 mm grid back onto the input image's own grid."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec)

from ..imageops import resample
from .brainmask import mask_quality


class ToNativeInputSpec(BaseInterfaceInputSpec):
    reference = File(exists=True, mandatory=True, desc="the raw input image (its grid is the target)")
    probability = File(exists=True, mandatory=True, desc="probability map, cropped grid")
    labels = File(exists=True, mandatory=True, desc="lesion labels, cropped grid")
    lesion_table = File(exists=True, mandatory=True, desc="JSON lesion rows (centroids in world mm)")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask on the conformed grid")


class ToNativeOutputSpec(TraitedSpec):
    probability = File(exists=True, desc="probability on the native grid (linear), float32")
    labels = File(exists=True, desc="lesion labels on the native grid (nearest), int32")
    brain_mask = File(exists=True, desc="brain mask on the native grid, uint8")
    brain_mask_quality = File(exists=True, desc="JSON: the native mask's brainmask.mask_quality")


def native_labels(labels: nib.Nifti1Image, rows, shape, affine) -> np.ndarray:
    """Nearest-neighbour labels; a lesion thinner than the native voxels keeps its centroid voxel.

    That way every row of the lesion table is present in the native label map.
    """
    native = np.asarray(resample(labels, shape, affine, "nearest").dataobj).astype(np.int32)
    if not rows:  # a clean scan: nothing to look for
        return native
    present = set(np.unique(native).tolist())
    inverse = np.linalg.inv(affine)
    for row in rows:
        if row["label"] in present:
            continue
        voxel = np.round(nib.affines.apply_affine(
            inverse, [row["x"], row["y"], row["z"]])).astype(int)
        if np.all(voxel >= 0) and np.all(voxel < shape):
            native[tuple(voxel)] = row["label"]
    return native


class ToNative(SimpleInterface):
    """Resample the probability map, the lesion labels and the brain mask onto the raw input's
    grid, and measure the mask there."""

    input_spec = ToNativeInputSpec
    output_spec = ToNativeOutputSpec

    def _run_interface(self, runtime):
        # Only the header is needed for the target grid; 4D inputs give their 3D grid.
        reference = nib.load(self.inputs.reference)
        shape, affine = reference.shape[:3], reference.affine
        cwd = Path(runtime.cwd)

        probability = resample(nib.load(self.inputs.probability), shape, affine, "linear")
        probability = nib.Nifti1Image(np.clip(probability.get_fdata(dtype=np.float32), 0, 1), affine)
        nib.save(probability, cwd / "probability.nii.gz")

        rows = json.loads(Path(self.inputs.lesion_table).read_text())
        labels = native_labels(nib.load(self.inputs.labels), rows, shape, affine)
        nib.save(nib.Nifti1Image(labels, affine), cwd / "labels.nii.gz")

        mask = resample(nib.load(self.inputs.brain_mask), shape, affine, "linear")
        mask = (np.asarray(mask.dataobj) >= 0.5).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, affine), cwd / "brain_mask.nii.gz")
        quality = mask_quality(mask > 0, nib.affines.voxel_sizes(affine))
        (cwd / "brain_mask_quality.json").write_text(json.dumps(quality, indent=2) + "\n")

        self._results.update(probability=str(cwd / "probability.nii.gz"),
                             labels=str(cwd / "labels.nii.gz"),
                             brain_mask=str(cwd / "brain_mask.nii.gz"),
                             brain_mask_quality=str(cwd / "brain_mask_quality.json"))
        return runtime
