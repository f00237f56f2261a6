"""Register the MNI152 2009 template to the conformed image; later steps warp template-space
maps (the brain mask, the MARS atlas) with the transforms this step writes."""

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..imageops import ImageError
from ..registration import intensity_brain_mask, register_template


class RegisterTemplateInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed image (1 mm RAS)")
    required = traits.Bool(True, usedefault=True,
                           desc="False: a registration that cannot start is reported in `error` "
                                "(with no transforms) instead of failing the image; for images "
                                "whose brain mask does not need it (lesion regions only)")


class RegisterTemplateOutputSpec(TraitedSpec):
    forward_transforms = traits.List(
        File(exists=True), desc="template -> image transforms, in the order "
                                "registration.warp_to_subject (ants.apply_transforms) takes them")
    intensity_mask = File(exists=True, desc="the rough intensity-based brain mask (brain and the "
                                            "CSF around it) that started the registration")
    error = traits.Str(desc="why there are no transforms (required=False only); empty if none")


class RegisterTemplate(SimpleInterface):
    """Register the MNI152 template to the conformed image (an intensity mask starts it, mutual
    information refines it); its transforms serve the brain mask and the MARS regions."""

    input_spec = RegisterTemplateInputSpec
    output_spec = RegisterTemplateOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        try:
            rough = intensity_brain_mask(img)
        except ImageError as exc:
            if self.inputs.required:
                raise
            self._results.update(forward_transforms=[], error=str(exc))
            return runtime
        intensity_mask = Path(runtime.cwd) / "intensity_mask.nii.gz"
        nib.save(nib.Nifti1Image(rough.astype(np.uint8), img.affine), intensity_mask)
        self._results.update(forward_transforms=register_template(img, rough, runtime.cwd),
                             intensity_mask=str(intensity_mask), error="")
        return runtime
