"""Brain mask on the conformed grid: a supplied mask brought onto it, or an automatic one."""

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)
from scipy import ndimage

from ..imageops import ImageError, load_volume, resample, to_sitk

# Below this volume a mask cannot be a brain (the smallest adult brains are ~900 mL).
MIN_BRAIN_ML = 200.0


class BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed image")
    supplied_mask = File(exists=True, desc="brain mask on any grid; used instead of the automatic one")
    method = traits.Enum("auto", "none", usedefault=True,
                         desc="without a supplied mask: auto (intensity-based) or none (whole image)")


class BrainMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="binary brain mask on the conformed grid")


class BrainMask(SimpleInterface):
    input_spec = BrainMaskInputSpec
    output_spec = BrainMaskOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        if isdefined(self.inputs.supplied_mask):
            mask = _supplied_mask(self.inputs.supplied_mask, img)
        elif self.inputs.method == "none":
            mask = np.ones(img.shape, dtype=np.uint8)
        else:
            mask = _automatic_mask(img)
        out_file = Path(runtime.cwd) / "brain_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), out_file)
        self._results["out_file"] = str(out_file)
        return runtime


def _supplied_mask(path, reference: nib.Nifti1Image) -> np.ndarray:
    source = load_volume(path)
    if not np.any(np.asarray(source.dataobj) > 0):
        raise ImageError(f"{path}: brain mask is empty")
    # Linear then threshold keeps mask edges smooth when coming from a coarser grid.
    binary = nib.Nifti1Image((np.asarray(source.dataobj) > 0).astype(np.float32), source.affine)
    mask = np.asarray(resample(binary, reference.shape, reference.affine, "linear").dataobj) >= 0.5
    if not mask.any():
        raise ImageError(f"{path}: brain mask does not overlap the image")
    return mask


def _automatic_mask(img: nib.Nifti1Image) -> np.ndarray:
    """Otsu foreground, opened to cut the brain off skull and scalp, largest central component.

    A first robust version: it needs no weights and no registration.
    """
    smoothed = sitk.SmoothingRecursiveGaussian(to_sitk(img), 1.0)
    foreground = sitk.GetArrayFromImage(sitk.OtsuThreshold(smoothed, 0, 1)).transpose(2, 1, 0) > 0
    ball = ndimage.generate_binary_structure(3, 1)
    core = ndimage.binary_erosion(foreground, ball, iterations=4)
    labels, count = ndimage.label(core)
    if count == 0:
        raise ImageError("automatic brain mask found no foreground")
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, count + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    # Grow back only through foreground (geodesically), so thin dark skull is never jumped.
    mask = ndimage.binary_dilation(mask, ball, iterations=4, mask=foreground)
    mask = ndimage.binary_closing(mask, ball, iterations=3)
    mask = ndimage.binary_fill_holes(mask)
    if mask.sum() * np.prod(img.header.get_zooms()[:3]) / 1000.0 < MIN_BRAIN_ML:
        raise ImageError(f"automatic brain mask is implausibly small ({mask.sum()} voxels)")
    return mask
