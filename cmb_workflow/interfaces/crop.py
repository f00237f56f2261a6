"""Crop the conformed image to the models' input box, centred on the brain."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..configs import CONVENTIONS
from ..imageops import WORK_IMAGE_SUFFIX, read_mask
from ..preprocessing import box_affine, crop_start, extract_box


class CropToBrainInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed (and defaced) image")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the conformed grid")
    dimensions = traits.Tuple((160, 214, 176), traits.Int, traits.Int, traits.Int,
                              usedefault=True, desc="box size in voxels")
    top_margin = traits.Int(5, usedefault=True,
                            desc="voxels above the top of the mask when the box is moved up")
    convention = traits.Enum(*CONVENTIONS, usedefault=True,
                             desc="when and how far the box moves up (preprocessing.crop_start)")


class CropToBrainOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="cropped image, zero where the box leaves the image")
    out_mask = File(exists=True, desc="cropped brain mask")
    box_file = File(exists=True, desc="JSON: box start in conformed voxels and how much lies outside")


class CropToBrain(SimpleInterface):
    """Cut the models' box out of the conformed image and its brain mask."""

    input_spec = CropToBrainInputSpec
    output_spec = CropToBrainOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = read_mask(self.inputs.mask_file)
        dimensions = np.asarray(self.inputs.dimensions)
        start = crop_start(mask, dimensions, self.inputs.top_margin, self.inputs.convention)
        affine = box_affine(img.affine, start)
        cropped = extract_box(np.asarray(img.dataobj, dtype=np.float32), start, dimensions)
        cropped_mask = extract_box(mask.astype(np.uint8), start, dimensions)
        cwd = Path(runtime.cwd)
        nib.save(nib.Nifti1Image(cropped, affine), cwd / f"cropped{WORK_IMAGE_SUFFIX}")
        nib.save(nib.Nifti1Image(cropped_mask, affine), cwd / "cropped_mask.nii.gz")
        box = {
            "start": [int(s) for s in start],
            "dimensions": [int(d) for d in dimensions],
            "brain_voxels_outside_box": int(mask.sum() - cropped_mask.sum()),
        }
        (cwd / "box.json").write_text(json.dumps(box, indent=2))
        self._results.update(out_file=str(cwd / f"cropped{WORK_IMAGE_SUFFIX}"),
                             out_mask=str(cwd / "cropped_mask.nii.gz"),
                             box_file=str(cwd / "box.json"))
        return runtime
