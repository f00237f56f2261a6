"""Conform: reorient to RAS and resample to 1 mm isotropic, keeping world coordinates."""

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from ..configs import CONVENTIONS, InputLimits
from ..imageops import ImageError, WORK_IMAGE_SUFFIX, load_volume
from ..preprocessing import conform


class ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw SWI or T2*-GRE image (3D, or 4D multi-echo)")
    echo = traits.Int(1, usedefault=True, desc="echo (1-based) taken from a 4D multi-echo image")
    convention = traits.Enum(*CONVENTIONS, usedefault=True,
                             desc="the model's preparation (preprocessing.py): shivai, a 256^3 "
                                  "grid keeping the scan's rotation; cmb-workflow-1, an untilted "
                                  "grid over the field of view")
    interpolation = traits.Enum("bspline", "welch", "linear", usedefault=True,
                                desc="cmb-workflow-1's kernel: bspline (cubic), welch (windowed "
                                     "sinc, about 50 times slower) or linear")
    limits = traits.Dict(desc="configs.InputLimits as a mapping: images beyond them are refused")


class ConformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="image on the convention's 1 mm RAS grid, float32")


class Conform(SimpleInterface):
    """Resample the image to 1 mm isotropic RAS; NaN set to 0; constant images refused."""

    input_spec = ConformInputSpec
    output_spec = ConformOutputSpec

    def _run_interface(self, runtime):
        limits = InputLimits(**self.inputs.limits) if isdefined(self.inputs.limits) else None
        img = load_volume(self.inputs.in_file, echo=self.inputs.echo, limits=limits,
                          prefer_qform=self.inputs.convention == "shivai")
        data = np.nan_to_num(np.asarray(img.dataobj), nan=0.0, posinf=0.0, neginf=0.0)
        if data.max() == data.min():
            raise ImageError(f"{self.inputs.in_file}: image is constant ({data.max()}) or all NaN")
        conformed = conform(nib.Nifti1Image(data, img.affine), self.inputs.convention,
                            source=self.inputs.in_file, interpolation=self.inputs.interpolation)
        out_file = Path(runtime.cwd) / f"conformed{WORK_IMAGE_SUFFIX}"
        nib.save(conformed, out_file)
        self._results["out_file"] = str(out_file)
        return runtime
