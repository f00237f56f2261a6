"""Brain mask on the conformed grid from a SHIVA brain-mask model (model_info JSON whose target
is a brain mask), fed as the SHIVA models' authors feed it."""

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..configs import CONVENTIONS
from ..imageops import ImageError, fill_holes, largest_component, resample
from ..models import load_ensemble
from ..preprocessing import box_affine, crop_start, extract_box, normalize

THRESHOLD = 0.5


class PredictBrainMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed image")
    model_descriptor = File(exists=True, mandatory=True,
                            desc="model_info*.json of a brain-mask ensemble")
    allow_unverified = traits.Bool(False, usedefault=True,
                                   desc="load model files whose md5 does not match (unsafe)")
    dimensions = traits.Tuple(traits.Int, traits.Int, traits.Int, mandatory=True,
                              desc="the models' input box in voxels")
    top_margin = traits.Int(5, usedefault=True, desc="as CropToBrain")
    convention = traits.Enum(*CONVENTIONS, usedefault=True, desc="as CropToBrain")
    normalization = traits.Enum("shivai", "minmax", usedefault=True, desc="as Normalize")
    percentile = traits.Float(99.0, usedefault=True, desc="as Normalize")
    clip_max = traits.Float(1.3, usedefault=True, desc="as Normalize")


class PredictBrainMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="binary brain mask on the conformed grid")


class PredictBrainMask(SimpleInterface):
    """Two passes, as the models' authors run their brain-mask model: the whole field of view
    squeezed into the models' box finds the brain roughly; then the image cropped and
    normalised around that rough mask (as for the CMB models) gives the mask. Probability above
    0.5, largest component, holes filled."""

    input_spec = PredictBrainMaskInputSpec
    output_spec = PredictBrainMaskOutputSpec

    def _run_interface(self, runtime):
        ensemble = load_ensemble(self.inputs.model_descriptor,
                                 allow_unverified=self.inputs.allow_unverified,
                                 expected_target="brain_mask")
        img = nib.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        dimensions = np.asarray(self.inputs.dimensions)

        def scaled(box, box_mask):
            return normalize(box, box_mask, self.inputs.normalization, self.inputs.percentile,
                             self.inputs.clip_max)[np.newaxis, ..., np.newaxis]

        def on_image_grid(probability, affine):
            back = resample(nib.Nifti1Image(probability, affine), img.shape, img.affine, "linear")
            return largest_component(np.asarray(back.dataobj) > THRESHOLD)

        # The box spans the whole field of view, with voxels of whatever size that takes.
        fov_affine = img.affine.copy()
        fov_affine[:3, :3] = img.affine[:3, :3] * (np.array(img.shape) / dimensions)
        fov_affine[:3, 3] = nib.affines.apply_affine(
            img.affine, (np.array(img.shape) / dimensions - 1) / 2)
        squeezed = np.asarray(resample(img, dimensions, fov_affine, "linear").dataobj)
        rough = on_image_grid(ensemble.predict(scaled(squeezed, squeezed > 0))[0], fov_affine)
        if not rough.any():
            raise ImageError(f"{self.inputs.model_descriptor}: the brain-mask model found no "
                             "brain in the image")

        start = crop_start(rough, dimensions, self.inputs.top_margin, self.inputs.convention)
        box = scaled(extract_box(data, start, dimensions), extract_box(rough, start, dimensions))
        mask = fill_holes(on_image_grid(ensemble.predict(box)[0],
                                        box_affine(img.affine, start)))

        out_file = Path(runtime.cwd) / "brain_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), out_file)
        self._results["out_file"] = str(out_file)
        return runtime
