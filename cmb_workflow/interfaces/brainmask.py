"""Brain mask on the conformed grid: the template's warped onto the image, a supplied mask
brought onto it, or the whole image."""

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    SimpleInterface, TraitedSpec, isdefined, traits)
from scipy import ndimage

from ..configs import CONVENTIONS
from ..imageops import (ImageError, bounding_box, fill_holes, largest_component, load_volume,
                        mask_to_sitk, nifti_zeros, read_mask)
from ..preprocessing import MASK_THRESHOLD, clean_mask, mask_onto_grid
from ..registration import mni152, warp_to_subject

# Grown by this much, the template's mask keeps cortical microbleeds that a registration a
# millimetre or two short of the cortex would cut off.
TEMPLATE_MASK_DILATION_MM = 1
# A microbleed on the cortex is as dark as the CSF and skull beyond it, so the intensity mask
# has a dent there, deeper than the microbleed after the mask's opening. Closed by this radius,
# the dents of held-out phantoms' 5-9 mm cortical microbleeds were filled (with 5 mm, cut in half).
DENT_CLOSING_MM = 8


class BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="conformed image")
    method = traits.Enum("supplied", "template", "none", usedefault=True,
                         desc="supplied: supplied_mask (its absence is an error); template: the "
                              "MNI152 brain mask warped with template_transforms, within "
                              "intensity_mask; none: the whole image")
    supplied_mask = File(exists=True, desc="brain mask on any grid")
    template_transforms = InputMultiObject(File(exists=True),
                                           desc="template -> image transforms (RegisterTemplate)")
    intensity_mask = File(exists=True, desc="RegisterTemplate's intensity-based mask")
    convention = traits.Enum(*CONVENTIONS, usedefault=True,
                             desc="how a supplied mask is brought onto the grid, and whether "
                                  "SHiVAi's small-part rule cleans the mask (preprocessing.py)")


class BrainMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="binary brain mask on the conformed grid")


class BrainMask(SimpleInterface):
    """The brain mask on the conformed grid, by `method`: a supplied mask resampled onto it,
    the template's mask warped onto it (grown, within the intensity mask, dents closed), or
    the whole image."""

    input_spec = BrainMaskInputSpec
    output_spec = BrainMaskOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        if self.inputs.method == "template":
            within = read_mask(self.inputs.intensity_mask)
            mask = template_mask(self.inputs.in_file, self.inputs.template_transforms, within)
            if self.inputs.convention == "shivai":
                mask = clean_mask(mask, nib.affines.voxel_sizes(img.affine))
        elif self.inputs.method == "supplied":
            if not isdefined(self.inputs.supplied_mask):
                raise ImageError("no brain mask was supplied (brain_mask: supplied needs a "
                                 "*_desc-brain_mask.nii[.gz] beside the image or under "
                                 "--masks-dir)")
            mask = supplied_mask(self.inputs.supplied_mask, img, self.inputs.convention)
        else:
            mask = np.ones(img.shape, dtype=bool)
        out_file = Path(runtime.cwd) / "brain_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), out_file)
        self._results["out_file"] = str(out_file)
        return runtime


def template_mask(image_file, transforms, within: np.ndarray) -> np.ndarray:
    """The template's brain mask on the image's grid: holes filled, grown, kept within the
    image's intensity-based mask (dark skull, sinuses and air are not brain), largest part,
    its dents closed (within the template's mask)."""
    # The result lies within `within`, and none of the steps reaches further than a voxel past
    # it (the closing fills only between parts of the mask), so they run on its box: the same
    # mask as the whole grid gives, in a fraction of the time.
    box = bounding_box(within, margin=TEMPLATE_MASK_DILATION_MM + 1)
    warped = warp_to_subject(mni152("brain_mask"), image_file, transforms, box=box)
    template = fill_holes(np.asarray(warped.dataobj) >= 0.5)
    template = ndimage.binary_dilation(template, ndimage.generate_binary_structure(3, 1),
                                       iterations=TEMPLATE_MASK_DILATION_MM)
    mask = largest_component(template & within[box])
    if not mask.any():
        raise ImageError(f"{image_file}: the registered template brain lies outside the image")
    full = nifti_zeros(within.shape, bool)
    full[box] = close_dents(mask, nib.affines.voxel_sizes(warped.affine)) & template
    return full


def close_dents(mask: np.ndarray, zooms) -> np.ndarray:
    """The mask closed by a ball of DENT_CLOSING_MM (ITK's ball of that radius in voxels), as
    if the mask were surrounded by background: a mask cut by the field of view is not eaten."""
    radius = [int(np.ceil(DENT_CLOSING_MM / zoom)) for zoom in zooms]
    # Dilation then erosion as distance thresholds: ITK's ball of radius r holds the offsets
    # within r + 0.5 voxels. The same voxels as sitk.BinaryMorphologicalClosing in half its time.
    # r + 1 voxels of background around it hold the whole dilation.
    pad = [(r + 1, r + 1) for r in radius]
    spacing = [1.0 / (r + 0.5) for r in radius[::-1]]  # SimpleITK's axes are the array's reversed

    def within_ball_of(part: np.ndarray) -> np.ndarray:
        image = mask_to_sitk(part)
        image.SetSpacing(spacing)
        distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False,
                                                squaredDistance=True, useImageSpacing=True)
        return sitk.GetArrayViewFromImage(distance) <= 1.0

    dilated = within_ball_of(np.pad(mask, pad))
    closed = ~within_ball_of(~dilated)
    return closed[tuple(slice(before, -after) for before, after in pad)]


def mask_quality(mask: np.ndarray, voxel_sizes) -> dict:
    """Brain volume, and the share of the mask's surface lying on the field of view's edge
    (a brain cut off by the field of view, or a mask leaking to it), by face area in mm^2.

    voxel_sizes: from the affine (nibabel.affines.voxel_sizes), which places the voxels;
    header pixdims may disagree with it."""
    zooms = np.asarray(voxel_sizes[:3], dtype=float)
    surface = edge = 0.0
    for axis in range(3):
        face_mm2 = np.prod(zooms) / zooms[axis]
        along = np.moveaxis(mask, axis, 0)  # views: no copy of the volume
        on_edge = np.count_nonzero(along[0]) + np.count_nonzero(along[-1])
        surface += face_mm2 * (np.count_nonzero(along[1:] != along[:-1]) + on_edge)
        edge += face_mm2 * on_edge
    return {"brain_volume_ml": round(float(mask.sum() * np.prod(zooms) / 1000.0), 1),
            "mask_fov_edge_fraction": round(float(edge / surface), 4) if surface else 0.0}


def supplied_mask(path, reference: nib.Nifti1Image, convention: str) -> np.ndarray:
    """A mask on any grid (probabilities, or binary at any scale) on the reference grid, brain
    being 0.5 and above; refused when empty or elsewhere."""
    source = load_volume(path, prefer_qform=convention == "shivai")
    if not (np.asarray(source.dataobj) >= MASK_THRESHOLD).any():
        raise ImageError(f"{path}: brain mask is empty (no voxel of 0.5 or more)")
    try:
        mask = mask_onto_grid(source, reference, convention)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from exc
    if not mask.any():
        raise ImageError(f"{path}: brain mask does not overlap the image (it lies elsewhere in "
                         "scanner space)")
    return mask
