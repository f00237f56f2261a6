"""Shear the face off the conformed image, as the SHIVA models' authors do before cropping."""

from pathlib import Path

import nibabel as nib
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec

from ..imageops import ImageError, WORK_IMAGE_SUFFIX, read_mask
from ..preprocessing import deface


class DefaceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed image")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the conformed grid")


class DefaceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image, zero below Quickshear's plane (the face)")


class Deface(SimpleInterface):
    """Quickshear (buffer 10 voxels) of the conformed image around its brain mask."""

    input_spec = DefaceInputSpec
    output_spec = DefaceOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        mask = read_mask(self.inputs.mask_file)
        try:
            defaced = deface(img, mask)
        except ImageError as exc:
            raise ImageError(f"{self.inputs.in_file}: {exc}") from exc
        out_file = Path(runtime.cwd) / f"defaced{WORK_IMAGE_SUFFIX}"
        nib.save(defaced, out_file)
        self._results["out_file"] = str(out_file)
        return runtime
