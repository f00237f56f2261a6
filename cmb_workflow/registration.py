"""The MNI152 2009 template registered to a conformed subject image, and template maps warped
onto it with that registration (the brain mask now; atlases later).

The template is nilearn's bundled 1 mm MNI152 2009 T1 brain: nothing is downloaded. Its
contrast is T1's, so the intensity stage uses mutual information, which needs no particular
relation between the template's and the subject's (SWI / T2*-GRE) grey levels. Mutual
information alone can settle on a wrong alignment when it starts far off, so an intensity-based
brain mask of the subject first aligns the template's brain mask to it (a similarity
transform), and the affine stage then refines that with the image, measured near the brain only
and divided by the brain's local mean, so that a bias field or bright tissue beside the brain
does not draw the template off it.

Registration is deterministic: a fixed seed for ANTs' metric sampling and one ITK thread, so
that the result does not depend on the machine's core count.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .imageops import (ImageError, bounding_box, fill_holes, largest_component, nifti_zeros,
                       sitk_geometry, to_sitk)
from .preprocessing import box_affine

# Below this volume an intensity mask cannot be a brain (the smallest adult brains are ~900 mL).
MIN_BRAIN_ML = 200.0
# Voxels the intensity mask's morphology sees beyond the field of view (its largest reach).
FOV_PAD = 8
# The intensity mask's smoothing (Gaussian sigma) before its threshold.
SMOOTHING_MM = 1.0
# Otsu's histogram: bins from the lowest to the highest value (ITK's default count).
OTSU_BINS = 128
# Any fixed value: ANTs draws the points its metric samples from it.
RANDOM_SEED = 20090
# Voxel sizes (mm) the two stages work on: coarse masks for the start, finer images after.
MASK_STAGE_MM = 4.0
IMAGE_STAGE_MM = 2.0
# The metric of the image stage sees the intensity mask grown by this much: the brain's edge
# and a little of what surrounds it, not the scalp and neck that the template lacks.
METRIC_MARGIN_MM = 5
# Background kept around the metric's reach: the masks' stage compares the whole grid, so the
# template's brain must still be seen where it overlaps no brain.
BOX_MARGIN_MM = 16
# The image stage sees the subject divided by its brain's mean within this distance (a
# Gaussian's sigma): median / worst Dice of 14 standard phantoms 0.9712 / 0.9642 -> 0.9761 /
# 0.9719, of 14 contrast-c ones 0.9715 / 0.8016 -> 0.9754 / 0.9604 (docs/performance.md).
LOCAL_MEAN_MM = 20.0
# Where the local mean is this small a part of the image's median one (the field of view's
# zeros), the image is divided by this instead.
LEAST_LOCAL_MEAN = 0.05
TRANSFORM_PREFIX = "template_to_subject_"
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearestNeighbor": sitk.sitkNearestNeighbor}

_NILEARN_LOADERS = {"t1": "load_mni152_template", "brain_mask": "load_mni152_brain_mask",
                    "gm": "load_mni152_gm_template", "wm": "load_mni152_wm_template"}


@functools.lru_cache(maxsize=None)
def mni152(kind: str) -> nib.Nifti1Image:
    """nilearn's bundled 1 mm MNI152 2009 map `kind` (t1, brain_mask, gm, wm), float32, RAS.

    Cached and shared, so its voxels are read-only.
    """
    from nilearn import datasets

    img = getattr(datasets, _NILEARN_LOADERS[kind])(resolution=1)
    if not np.allclose(img.affine[:3, :3], np.eye(3)):
        raise RuntimeError("expected nilearn's 1 mm RAS MNI152 templates")
    data = img.get_fdata(dtype=np.float32)
    data.flags.writeable = False
    return nib.Nifti1Image(data, img.affine)


def intensity_brain_mask(img: nib.Nifti1Image) -> np.ndarray:
    """Otsu foreground, opened to cut the brain off skull and scalp, largest component.

    A rough mask (it keeps the CSF around the brain): it starts the template registration.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    # The conformed grid is zeros beyond the scan's field of view, and smoothing zeros gives
    # zeros: only the field of view's box is smoothed (half of a 256^3 grid, typically). Otsu's
    # threshold depends on how many zeros there are: the grid's other zeros are counted in, so
    # it is the whole grid's threshold.
    fov = bounding_box(data != 0, FOV_PAD)
    # scipy's Gaussian in float32: a quarter of the time of SimpleITK's recursive one (in
    # double) on one core, and masks as good (docs/performance.md). It runs along the axes in
    # NIfTI's memory order (the array's reversed), on a contiguous copy: the order that was
    # measured, since another one rounds differently.
    smoothed = ndimage.gaussian_filter(
        np.ascontiguousarray(data[fov].T),
        SMOOTHING_MM / nib.affines.voxel_sizes(img.affine)[::-1], mode="nearest")
    threshold = otsu_threshold(smoothed, extra_zeros=data.size - smoothed.size)
    foreground = np.zeros(data.shape, bool)
    foreground[fov] = smoothed.T > threshold
    # The morphology below runs on the head's box (a 256^3 grid is mostly air): the box keeps
    # FOV_PAD voxels of air around the head, more than the morphology reaches, so the mask is
    # the one the whole grid gives.
    box = bounding_box(foreground, FOV_PAD)
    # A brain cut off by the field of view goes on beyond it: continuing the image there keeps
    # the erosions below from eating into the cut face.
    foreground = np.pad(foreground[box], FOV_PAD, mode="edge")
    ball = ndimage.generate_binary_structure(3, 1)
    mask = largest_component(ndimage.binary_erosion(foreground, ball, iterations=4))
    if not mask.any():
        raise ImageError("no head found to start the template registration from (the image's "
                         "foreground vanishes when opened)")
    # Grow back only through foreground (geodesically), so thin dark skull is never jumped.
    mask = ndimage.binary_dilation(mask, ball, iterations=4, mask=foreground)
    mask = ndimage.binary_closing(mask, ball, iterations=3)
    mask_in_box = fill_holes(mask)[(slice(FOV_PAD, -FOV_PAD),) * 3]
    mask = nifti_zeros(img.shape[:3], bool)
    mask[box] = mask_in_box
    if mask.sum() * np.prod(nib.affines.voxel_sizes(img.affine)) / 1000.0 < MIN_BRAIN_ML:
        raise ImageError(f"no head found to start the template registration from (its largest "
                         f"bright part is {mask.sum()} voxels, too small for a brain)")
    return mask


def otsu_threshold(values: np.ndarray, extra_zeros: int = 0) -> float:
    """Otsu's threshold of `values` and `extra_zeros` more zeros: the upper edge of the
    histogram bin (OTSU_BINS from the lowest value to the highest) that best splits them in two
    (largest variance between the classes), as ITK's Otsu filter gives it."""
    values = np.asarray(values, dtype=np.float32).ravel()
    # In float32, as ITK computes the histogram's bins for a float image: the same threshold.
    bin_count = np.float32(OTSU_BINS)
    low, high = values.min(), values.max()
    if extra_zeros:
        low, high = min(low, np.float32(0)), max(high, np.float32(0))
    if low == high:  # one value: nothing lies above it
        return float(low)
    # ITK's histogram widens the top by a hundredth of a bin, so that the highest value has one.
    high = np.float32(high + (high - low) / bin_count / np.float32(100))
    width = np.float32((high - low) / bin_count)
    bins = ((values - low) / width).astype(np.intp)
    counts = np.bincount(np.minimum(bins, OTSU_BINS - 1, out=bins),
                         minlength=OTSU_BINS).astype(float)
    if extra_zeros:
        counts[min(int(-low / width), OTSU_BINS - 1)] += extra_zeros
    centres = float(low) + (np.arange(OTSU_BINS) + 0.5) * float(width)
    below, below_sum = np.cumsum(counts)[:-1], np.cumsum(counts * centres)[:-1]
    above, above_sum = counts.sum() - below, (counts * centres).sum() - below_sum
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (below_sum / below - above_sum / above) ** 2
    best = int(np.argmax(np.where(np.isfinite(between), between, -1.0)))
    return float(low + np.float32(best + 1) * width)


@contextlib.contextmanager
def _ants():
    """ANTsPy, with ITK on one thread.

    ITK reads its thread count from the environment when a process first uses it, and keeps it.
    ANTs sums its metric per thread: with two threads, repeated runs here gave different
    transforms; with one they are identical, on any machine. The variable is set only while
    ANTsPy works, so that SimpleITK elsewhere in the process keeps its threads.
    """
    variable = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
    previous = os.environ.get(variable)
    os.environ[variable] = "1"
    try:
        import ants

        yield ants
    finally:
        if previous is None:
            del os.environ[variable]
        else:
            os.environ[variable] = previous


def register_template(img: nib.Nifti1Image, rough: np.ndarray, out_dir) -> list[str]:
    """Transforms from the template to a conformed image (1 mm RAS), written in out_dir.

    rough: a rough brain mask of the image (intensity_brain_mask); it starts the registration
    and bounds where the image is compared. Returns the transforms' paths in the order
    warp_to_subject (ants.apply_transforms) takes them.
    """
    out_dir = Path(out_dir)
    # Only the head's box is resampled for ANTs: the metric sees no further.
    box = bounding_box(rough, METRIC_MARGIN_MM + BOX_MARGIN_MM)
    rough = rough[box]
    metric_mask = ndimage.binary_dilation(rough, iterations=METRIC_MARGIN_MM)
    affine = box_affine(img.affine, [part.start for part in box])
    rough_img = nib.Nifti1Image(rough.astype(np.uint8), affine)
    images = {
        "subject_mask": _on_grid(rough_img, MASK_STAGE_MM),
        "template_mask": _resampled_template("brain_mask", MASK_STAGE_MM),
        "metric_mask": _on_grid(nib.Nifti1Image(metric_mask.astype(np.uint8), affine),
                                IMAGE_STAGE_MM, nearest=True),
        "template": _resampled_template("t1", IMAGE_STAGE_MM),
    }
    # Sliced from the whole array (memory-mapped for the conformed .nii): slicing the image's
    # proxy read the box from the file in ~47,000 pieces, 0.12 s.
    subject = _on_grid(nib.Nifti1Image(np.asarray(img.dataobj)[box], affine), IMAGE_STAGE_MM)
    brain = _on_grid(rough_img, IMAGE_STAGE_MM, nearest=True)
    images["subject"] = divided_by_local_mean(subject, brain, images["metric_mask"])
    prefix = out_dir / TRANSFORM_PREFIX
    # ANTs' inputs are read once and then deleted, so they are written uncompressed (gzip took
    # longer than the writing).
    with tempfile.TemporaryDirectory(dir=out_dir) as inputs:
        files = {name: Path(inputs) / f"{name}.nii" for name in images}
        for name, image in images.items():
            sitk.WriteImage(image, str(files[name]))
        _register(prefix, files)
    return [f"{prefix}0GenericAffine.mat"]


def _register(prefix: Path, files: dict) -> None:
    """ANTs' two stages, written as transforms under `prefix`."""
    # A level ends when the metric's slope over its last 10 iterations falls under 1e-4 (1e-6
    # before): 46 % less of ANTs' time, the same masks (benchmarks/brain_mask.py, 14 phantoms:
    # median Dice 0.9711 both, worst 0.9642 against 0.9638). 1e-3 cost a mask (Dice 0.75).
    image_levels = ["--convergence", "[500x250,1e-4,10]", "--shrink-factors", "2x1",
                    "--smoothing-sigmas", "1x0vox"]
    # The masks' stage on 8 mm voxels only: its 4 mm level (dense mean squares) took a quarter
    # of ANTs' time, and the image stage refines what it finds (28 phantoms of two looks:
    # median Dice 0.9699 against 0.9698, worst 0.9052 against 0.8356; no mask got worse by
    # more than 0.0005).
    mask_levels = ["--convergence", "[500,1e-4,10]", "--shrink-factors", "2",
                   "--smoothing-sigmas", "1vox"]
    with _ants() as ants:
        ants.registration(fixed=[
            "--dimensionality", "3", "--float", "1", "--random-seed", str(RANDOM_SEED),
            "--collapse-output-transforms", "1", "--output", str(prefix),
            "--initial-moving-transform", f"[{files['subject_mask']},{files['template_mask']},1]",
            # Masks first: alike images, so the alignment is found from far off.
            "--transform", "Similarity[0.25]",
            # Sampling a quarter of the masks' voxels and a tenth of the image's (a fifth
            # before) halved ANTs' time with the same masks (benchmarks/brain_mask.py: median
            # Dice 0.9711 against 0.9706, worst 0.9638 against 0.9647, 14 phantoms).
            "--metric", f"MeanSquares[{files['subject_mask']},{files['template_mask']},1,0,"
                        "Regular,0.25]",
            *mask_levels, "--masks", "[NA,NA]",
            "--transform", "Affine[0.25]",
            "--metric", f"MI[{files['subject']},{files['template']},1,32,Regular,0.1]",
            *image_levels, "--masks", f"[{files['metric_mask']},NA]",
        ], moving=None)


def divided_by_local_mean(image: sitk.Image, brain: sitk.Image, region: sitk.Image) -> sitk.Image:
    """`image` divided, inside the mask `region`, by the mean of its `brain` voxels near each
    voxel (Gaussian weights of LOCAL_MEAN_MM) relative to that mean's median: a bias field and
    the brightness of neighbouring tissue flattened, the image's scale kept. The masks are on
    the image's grid; the mean is the brain's alone, so that dark skull beside it does not
    brighten the brain's edge."""
    values = sitk.GetArrayFromImage(image)
    in_brain = sitk.GetArrayViewFromImage(brain) > 0.5
    inside = sitk.GetArrayViewFromImage(region) > 0.5
    sigma = LOCAL_MEAN_MM / np.array(image.GetSpacing()[::-1])  # the array's axes are reversed
    weights = ndimage.gaussian_filter(in_brain.astype(np.float32), sigma)
    local_mean = ndimage.gaussian_filter(np.where(in_brain, values, np.float32(0)), sigma)
    local_mean = local_mean[inside] / np.maximum(weights[inside], np.float32(1e-3))
    local_mean /= np.median(local_mean)
    values[inside] /= np.maximum(local_mean, np.float32(LEAST_LOCAL_MEAN))
    flattened = sitk.GetImageFromArray(values)
    flattened.CopyInformation(image)
    return flattened


@functools.lru_cache(maxsize=None)
def _resampled_template(kind: str, mm: float) -> sitk.Image:
    """The MNI152 map `kind` on an `mm` grid (linear), made once per process: every image of a
    process registers to the same one."""
    return _on_grid(mni152(kind), mm)


def _on_grid(img: nib.Nifti1Image, mm: float, *, nearest: bool = False) -> sitk.Image:
    """`img` on `mm` voxels, float32, as ants.resample_image puts it there (same origin and
    axes, the size rounded as ANTs does): the same voxels, but through SimpleITK, in a seventh
    of the time (ANTsPy copies the image several times and resamples on one thread)."""
    image = to_sitk(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine))
    size = [int(np.floor(n * spacing / mm + 0.5))
            for n, spacing in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(),
                         sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                         image.GetOrigin(), (mm,) * 3, image.GetDirection(), 0.0,
                         sitk.sitkFloat32)


def warp_to_subject(template_map: nib.Nifti1Image, reference, transforms,
                    interpolation: str = "linear", *, box=None) -> nib.Nifti1Image:
    """A template-space map on the grid of `reference`, the registered image (its path or
    image; only its header is read), or on the part `box` (slices) of that grid.
    interpolation: linear or nearestNeighbor.

    SimpleITK applies the ANTs transforms: the same voxels as ants.apply_transforms, in a
    third of the time and without importing ANTsPy."""
    if not isinstance(reference, nib.Nifti1Image):
        reference = nib.load(str(reference))
    shape, affine = reference.shape[:3], reference.affine
    if box is not None:
        shape = [part.stop - part.start for part in box]
        affine = box_affine(affine, [part.start for part in box])
    spacing, direction, origin = sitk_geometry(affine)
    moving = to_sitk(nib.Nifti1Image(np.asarray(template_map.dataobj, dtype=np.float32),
                                     template_map.affine))
    warped = sitk.Resample(moving, [int(n) for n in shape], _transform_chain(transforms),
                           _INTERPOLATORS[interpolation], origin, spacing, direction, 0.0,
                           sitk.sitkFloat32)
    return nib.Nifti1Image(sitk.GetArrayFromImage(warped).transpose(2, 1, 0), affine)


def to_template(points, transforms) -> np.ndarray:
    """Scanner RAS points (N x 3, mm) of the registered image in template (MNI) space.

    ITK transforms map points the opposite way to the images they warp, so the template ->
    subject transforms take subject points to the template; ITK's points are LPS.
    """
    flip = np.array([-1.0, -1.0, 1.0])
    chain = _transform_chain(transforms)
    moved = [chain.TransformPoint(tuple(point))
             for point in np.asarray(points, dtype=float).reshape(-1, 3) * flip]
    return np.array(moved, dtype=float).reshape(-1, 3) * flip


def _transform_chain(transforms) -> sitk.CompositeTransform:
    """The transforms in ants.apply_transforms' order: the last one acts on a point first, as
    in a composite transform."""
    chain = sitk.CompositeTransform(3)
    for path in transforms:
        chain.AddTransform(sitk.ReadTransform(str(path)))
    return chain
