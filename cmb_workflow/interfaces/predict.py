"""Predict microbleed probabilities with an ensemble of SHIVA-convention 3D U-Nets."""

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..models import load_ensemble


class PredictInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, minlen=1,
                           desc="cropped images scaled to [0, 1], one per image of the batch")
    mask_files = traits.List(File(exists=True), mandatory=True, minlen=1,
                             desc="cropped brain masks, in the order of in_files")
    model_descriptor = File(exists=True, mandatory=True, desc="model_info*.json of the ensemble")
    allow_unverified = traits.Bool(False, usedefault=True,
                                   desc="load model files whose md5 does not match (unsafe)")
    mask_input = traits.Bool(True, usedefault=True, desc="zero the image outside the brain first")
    floor = traits.Range(0.0, 1.0, 0.0, usedefault=True,
                         desc="each fold's probabilities below this count as 0")
    mask_output = traits.Bool(True, usedefault=True,
                              desc="zero the probabilities outside the brain")


class PredictOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True),
                            desc="mean probability of the folds per image, cropped grid, float32")


class Predict(SimpleInterface):
    """A batch of images with one load of the models (kept for the next batch of the process)."""

    input_spec = PredictInputSpec
    output_spec = PredictOutputSpec

    def _run_interface(self, runtime):
        if len(self.inputs.in_files) != len(self.inputs.mask_files):
            raise ValueError(f"{len(self.inputs.in_files)} images but "
                             f"{len(self.inputs.mask_files)} brain masks")
        ensemble = load_ensemble(self.inputs.model_descriptor,
                                 allow_unverified=self.inputs.allow_unverified)
        out_files = []
        for index, (in_file, mask_file) in enumerate(zip(self.inputs.in_files,
                                                         self.inputs.mask_files)):
            img = nib.load(in_file)
            data = np.asarray(img.dataobj, dtype=np.float32)
            mask = np.asarray(nib.load(mask_file).dataobj) > 0
            if self.inputs.mask_input:
                data = data * mask
            probability = ensemble.predict(data[np.newaxis, ..., np.newaxis],
                                           floor=self.inputs.floor)[0]
            if self.inputs.mask_output:
                probability = probability * mask
            probability = np.clip(probability, 0.0, 1.0).astype(np.float32)
            out_files.append(str(Path(runtime.cwd) / f"probability_{index:03d}.nii.gz"))
            nib.save(nib.Nifti1Image(probability, img.affine), out_files[-1])
        self._results["out_files"] = out_files
        return runtime
