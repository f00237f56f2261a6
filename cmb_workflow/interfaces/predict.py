"""Predict microbleed probabilities with an ensemble of SHIVA-convention 3D U-Nets."""

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..models import load_ensemble


class PredictInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="cropped image scaled to [0, 1]")
    mask_file = File(exists=True, mandatory=True, desc="cropped brain mask")
    model_descriptor = File(exists=True, mandatory=True, desc="model_info*.json of the ensemble")
    allow_unverified = traits.Bool(False, usedefault=True,
                                   desc="load model files whose md5 does not match (unsafe)")
    mask_input = traits.Bool(True, usedefault=True, desc="zero the image outside the brain first")
    mask_output = traits.Bool(True, usedefault=True,
                              desc="zero the probabilities outside the brain")


class PredictOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="mean probability of the folds, cropped grid, float32")


class Predict(SimpleInterface):
    """Models are loaded once per process and kept for the next subject."""

    input_spec = PredictInputSpec
    output_spec = PredictOutputSpec

    def _run_interface(self, runtime):
        ensemble = load_ensemble(self.inputs.model_descriptor,
                                 allow_unverified=self.inputs.allow_unverified)
        img = nib.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        if self.inputs.mask_input:
            data = data * mask
        probability = ensemble.predict(data[np.newaxis, ..., np.newaxis])[0]
        if self.inputs.mask_output:
            probability = probability * mask
        probability = np.clip(probability, 0.0, 1.0).astype(np.float32)
        out_file = Path(runtime.cwd) / "probability.nii.gz"
        nib.save(nib.Nifti1Image(probability, img.affine), out_file)
        self._results["out_file"] = str(out_file)
        return runtime
