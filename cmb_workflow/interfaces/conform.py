"""Conform: reorient to RAS and resample to 1 mm isotropic, keeping world coordinates."""

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from ..configs import InputLimits
from ..imageops import ImageError, conformed_grid, load_volume, resample


class ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw SWI or T2*-GRE image (3D, or 4D multi-echo)")
    echo = traits.Int(1, usedefault=True, desc="echo (1-based) taken from a 4D multi-echo image")
    interpolation = traits.Enum("bspline", "welch", "linear", usedefault=True,
                                desc="bspline: cubic; welch: windowed sinc as the SHIVA models' "
                                     "authors resample (about 50 times slower here)")
    limits = traits.Dict(desc="configs.InputLimits as a mapping: images beyond them are refused")


class ConformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="image on a 1 mm RAS grid covering the input field of view")


class Conform(SimpleInterface):
    """Resample the image to 1 mm isotropic RAS; NaN set to 0; constant images refused."""

    input_spec = ConformInputSpec
    output_spec = ConformOutputSpec

    def _run_interface(self, runtime):
        limits = InputLimits(**self.inputs.limits) if isdefined(self.inputs.limits) else None
        img = load_volume(self.inputs.in_file, echo=self.inputs.echo, limits=limits)
        data = np.nan_to_num(np.asarray(img.dataobj), nan=0.0, posinf=0.0, neginf=0.0)
        if data.max() == data.min():
            raise ImageError(f"{self.inputs.in_file}: image is constant ({data.max()}) or all NaN")
        img = nib.Nifti1Image(data, img.affine)
        shape, affine = conformed_grid(img)
        conformed = resample(img, shape, affine, self.inputs.interpolation, clamp=True)
        out_file = Path(runtime.cwd) / "conformed.nii.gz"
        nib.save(conformed, out_file)
        self._results["out_file"] = str(out_file)
        return runtime
