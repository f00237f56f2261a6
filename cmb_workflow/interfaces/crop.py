"""Crop the conformed image to the models' input box, centred on the brain."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)
from scipy import ndimage


class CropToBrainInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed image")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the conformed grid")
    dimensions = traits.Tuple(traits.Int, traits.Int, traits.Int, value=(160, 214, 176),
                              usedefault=True, desc="box size in voxels")
    top_margin = traits.Int(5, usedefault=True,
                            desc="voxels kept above the top of the mask when the box is moved up")


class CropToBrainOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="cropped image, zero where the box leaves the image")
    out_mask = File(exists=True, desc="cropped brain mask")
    box_file = File(exists=True, desc="JSON: box start in conformed voxels and how much lies outside")


def crop_start(mask: np.ndarray, dimensions, top_margin: int) -> np.ndarray:
    """Box start (voxel index, may be negative) as the SHIVA models' authors place it."""
    dimensions = np.asarray(dimensions)
    centre = np.ceil(ndimage.center_of_mass(mask)).astype(int)
    start = centre - dimensions // 2
    # Masks reaching into the neck pull the centre down; keep the top of the brain in the box.
    top = int(np.nonzero(mask.any(axis=(0, 1)))[0].max())
    start[2] = max(start[2], top + top_margin - dimensions[2] + 1)
    return start


def extract_box(data: np.ndarray, start, dimensions) -> np.ndarray:
    """data[start:start+dimensions] with zeros where the box leaves the array."""
    out = np.zeros(tuple(dimensions), dtype=data.dtype)
    source, target = [], []
    for begin, size, length in zip(start, dimensions, data.shape):
        lo, hi = max(begin, 0), min(begin + size, length)
        source.append(slice(lo, max(hi, lo)))
        target.append(slice(lo - begin, max(hi, lo) - begin))
    out[tuple(target)] = data[tuple(source)]
    return out


class CropToBrain(SimpleInterface):
    input_spec = CropToBrainInputSpec
    output_spec = CropToBrainOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        dimensions = np.asarray(self.inputs.dimensions)
        start = crop_start(mask, dimensions, self.inputs.top_margin)
        # Moving the origin by `start` voxels keeps every voxel's world position exact.
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3, :3] @ start + img.affine[:3, 3]
        cropped = extract_box(np.asarray(img.dataobj, dtype=np.float32), start, dimensions)
        cropped_mask = extract_box(mask.astype(np.uint8), start, dimensions)
        cwd = Path(runtime.cwd)
        nib.save(nib.Nifti1Image(cropped, affine), cwd / "cropped.nii.gz")
        nib.save(nib.Nifti1Image(cropped_mask, affine), cwd / "cropped_mask.nii.gz")
        box = {
            "start": [int(s) for s in start],
            "dimensions": [int(d) for d in dimensions],
            "brain_voxels_outside_box": int(mask.sum() - cropped_mask.sum()),
        }
        (cwd / "box.json").write_text(json.dumps(box, indent=2))
        self._results.update(out_file=str(cwd / "cropped.nii.gz"),
                             out_mask=str(cwd / "cropped_mask.nii.gz"),
                             box_file=str(cwd / "box.json"))
        return runtime
