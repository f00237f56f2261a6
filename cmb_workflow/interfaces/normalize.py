"""Scale intensities to [0, 1] exactly as the SHIVA models were trained."""

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..imageops import ImageError, WORK_IMAGE_SUFFIX, read_mask
from ..preprocessing import normalize


class NormalizeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="cropped image")
    mask_file = File(exists=True, mandatory=True, desc="cropped brain mask")
    method = traits.Enum("shivai", "minmax", usedefault=True,
                         desc="shivai: divide by the percentile, clip at clip_max, divide by "
                              "clip_max (the authors' pipeline); minmax: brain minimum to the "
                              "percentile mapped to [0, 1], clipped (the model README)")
    percentile = traits.Float(99.0, usedefault=True, desc="percentile of brain voxels")
    clip_max = traits.Float(1.3, usedefault=True, desc="shivai method: upper clip before rescaling")


class NormalizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="intensities in [0, 1], float32")


class Normalize(SimpleInterface):
    """Scale the cropped image's intensities by its brain's percentile."""

    input_spec = NormalizeInputSpec
    output_spec = NormalizeOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = read_mask(self.inputs.mask_file)
        try:
            data = normalize(np.asarray(img.dataobj), mask, self.inputs.method,
                             self.inputs.percentile, self.inputs.clip_max)
        except ValueError as exc:
            raise ImageError(str(exc)) from exc
        out_file = Path(runtime.cwd) / f"normalized{WORK_IMAGE_SUFFIX}"
        nib.save(nib.Nifti1Image(data, img.affine), out_file)
        self._results["out_file"] = str(out_file)
        return runtime
