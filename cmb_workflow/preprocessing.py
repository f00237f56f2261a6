"""The image preparation a model was trained with, step by step, as plain functions (the
interfaces wrap them; the brain-mask model and the demo's training call them too).

Two conventions, named by a model's descriptor (`preprocessing`):

- ``shivai`` (default): the SHIVA-CMB models' authors' pipeline, SHiVAi 0.5.9, reimplemented
  from its behaviour (docs/shivai.md): nibabel's conform to a 256³ 1 mm grid that keeps the
  scan's own rotation, masks by nearest neighbour then SHiVAi's small-cluster rule, Quickshear
  defacing, SHiVAi's crop box, the model fed the unmasked crop.
- ``cmb-workflow-1``: this project's first chain, which the demo model was trained with: an
  untilted 1 mm grid over the whole field of view (SimpleITK), masks by linear interpolation,
  the box moved up to keep 5 voxels above the brain, the model fed the masked crop.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel import processing
from scipy import ndimage, sparse

from .imageops import (ImageError, bounding_box, centre_of_mass, conformed_grid, nifti_zeros,
                       resample)

# SHiVAi's conform: a 256³ grid of 1 mm; a scan whose voxels are already 1 mm is copied
# (order 0) rather than interpolated. Its tolerance is 0; 1e-5 mm absorbs float32 rounding of
# an oblique affine's column lengths.
SHIVAI_GRID_SHAPE = (256, 256, 256)
SHIVAI_VOXEL_SIZE = 1.0
SHIVAI_COPY_TOLERANCE_MM = 1e-5
# SHiVAi's affine check: a rotation part this far from orthonormal is projected onto the nearest
# rotation; from AFFINE_REFUSED_DEVIATION on, SHiVAi would discard the orientation, which would
# misplace every map this tool writes back to the scan, so the image is refused instead.
AFFINE_CORRECTED_DEVIATION = 5e-5
AFFINE_REFUSED_DEVIATION = 0.005
# SHiVAi's brain-mask cleaning: above 0.5; when the mask has several parts, the parts of at most
# 100 mm³ are dropped unless they lie within 5 voxels (a box) of a larger part.
MASK_THRESHOLD = 0.5
MASK_MIN_PART_MM3 = 100.0
MASK_PART_REACH_VOXELS = 5
# Quickshear's distance, in voxels, between its shearing plane and the brain (SHiVAi's default).
DEFACE_BUFFER = 10
# Resampling terms this small against the largest are rounding of a grid-parallel affine.
PARALLEL_AXES_TOLERANCE = 1e-9


def as_stored(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image with its affine as a NIfTI header stores it (float32). SHiVAi resamples images
    it has saved after its affine check, and which samples fall just inside or outside the field
    of view depends on those roundings."""
    affine = np.eye(4)
    affine[:3] = img.affine[:3].astype(np.float32)
    return nib.Nifti1Image(np.asarray(img.dataobj), affine)


def correct_affine(img: nib.Nifti1Image, source) -> nib.Nifti1Image:
    """The image with its affine's rotation part made orthonormal where it is slightly off (as
    SHiVAi does, by polar decomposition); refused where it is far off."""
    rotation, translation = nib.affines.to_matvec(img.affine)
    sizes = nib.affines.voxel_sizes(img.affine)
    unit = rotation / sizes
    deviation = np.abs(unit @ unit.T - np.eye(3)).max()
    if deviation < AFFINE_CORRECTED_DEVIATION:
        return img
    if deviation >= AFFINE_REFUSED_DEVIATION:
        raise ImageError(f"{source}: the affine's voxel axes are not perpendicular (deviation "
                         f"{deviation:.4f}); fix the header's sform")
    left, _singular, right = np.linalg.svd(unit)
    affine = nib.affines.from_matvec((left @ right) * sizes, translation)
    return nib.Nifti1Image(np.asarray(img.dataobj), affine)


def conform(img: nib.Nifti1Image, convention: str, *, source="", interpolation="bspline"):
    """The image on its convention's 1 mm RAS grid, float32, within the input's value range.

    img: 3D float32 with finite values (imageops.load_volume, NaN set to 0)."""
    if convention == "cmb-workflow-1":
        shape, affine = conformed_grid(img)
        return resample(img, shape, affine, interpolation, clamp=True)
    img = as_stored(correct_affine(img, source))
    data = np.asarray(img.dataobj)
    copy = np.allclose(nib.affines.voxel_sizes(img.affine), SHIVAI_VOXEL_SIZE,
                       rtol=0, atol=SHIVAI_COPY_TOLERANCE_MM)
    resampled, affine = _nibabel_conform(img, order=0 if copy else 3)
    # Cubic splines overshoot at edges; SHiVAi keeps the input's range.
    out = np.clip(resampled.astype(np.float32, copy=False), data.min(), data.max())
    return nib.Nifti1Image(out, affine)


def _nibabel_conform(img: nib.Nifti1Image, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of nibabel.processing.conform(img) onto SHiVAi's grid (RAS, cval 0), with
    the same voxels, interpolated only where the image's field of view reaches: the rest of the
    256³ grid (often more than half of it) lies outside, where nibabel computes nothing but 0."""
    data = np.asarray(img.dataobj)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                                nib.orientations.axcodes2ornt("RAS"))
    reoriented = img.as_reoriented(transform)
    affine = processing.rescale_affine(reoriented.affine, reoriented.shape,
                                       (SHIVAI_VOXEL_SIZE,) * 3, SHIVAI_GRID_SHAPE)
    # As nibabel.processing.resample_from_to maps output voxels to input voxels.
    rotation, translation = nib.affines.to_matvec(np.linalg.inv(img.affine) @ affine)
    # The output voxels whose input coordinates can lie within the input (a voxel of slack
    # beyond each face): every other one is outside, 0.
    corners = np.array(np.meshgrid(*[(-2.0, n + 1.0) for n in data.shape],
                                   indexing="ij")).reshape(3, -1)
    reached = np.linalg.inv(rotation) @ (corners - translation[:, None])
    start = np.clip(np.floor(reached.min(axis=1)).astype(int) - 1, 0, SHIVAI_GRID_SHAPE)
    stop = np.clip(np.ceil(reached.max(axis=1)).astype(int) + 2, 0, SHIVAI_GRID_SHAPE)
    out = nifti_zeros(SHIVAI_GRID_SHAPE, data.dtype)
    if np.all(stop > start):
        offset, box_shape = translation + rotation @ start, tuple(stop - start)
        axis_of = _input_axes(rotation, data.shape) if order == 3 else None
        out[tuple(slice(a, b) for a, b in zip(start, stop))] = ndimage.affine_transform(
            data, rotation, offset, box_shape, order=order, mode="constant", cval=0.0) \
            if axis_of is None else _cubic_along_axes(data, rotation, offset, box_shape, axis_of)
    return out, affine


def _input_axes(rotation: np.ndarray, in_shape) -> list[int] | None:
    """For each output axis, the one input axis it moves along, when the grids' axes are
    parallel (no output axis mixes input axes) and every input axis is long enough for
    _cubic_along_axes' boundary rule; else None.

    SHiVAi's grid keeps an oblique scan's rotation, so its axes are the scan's up to the
    affine's rounding (terms of 1e-17 here): those terms move a coordinate by 1e-14 voxel at
    most, which changes nothing but, in theory, whether a voxel exactly on the field of view's
    outermost face is read."""
    nonzero = np.abs(rotation) > PARALLEL_AXES_TOLERANCE * np.abs(rotation).max()
    if not (np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)) \
            or min(in_shape) < 4:
        return None
    return [int(np.flatnonzero(nonzero[:, axis])[0]) for axis in range(3)]


def _cubic_along_axes(data, rotation, offset, out_shape, axis_of) -> np.ndarray:
    """ndimage.affine_transform(data, rotation, offset, out_shape, order=3, mode="constant",
    cval=0) for grids with parallel axes, one axis at a time: 4 spline taps per voxel and axis,
    as a sparse matrix product, instead of 4³ per voxel (several times faster). The same B-spline
    coefficients, weights and boundary rule (mirrored coefficients; coordinates outside
    [0, n - 1] give 0); only the order of float64 additions differs (and _input_axes' rounding
    terms), so values agree to a float32 rounding step."""
    values = ndimage.spline_filter(data, order=3, output=np.float64, mode="constant")
    # Axes that shrink the most go first, so that later passes work on fewer voxels.
    for out_axis in sorted(range(3), key=lambda a: out_shape[a] / data.shape[axis_of[a]]):
        axis, length = axis_of[out_axis], data.shape[axis_of[out_axis]]
        coordinate = rotation[axis, out_axis] * np.arange(out_shape[out_axis]) + offset[axis]
        first = np.floor(coordinate)
        t = coordinate - first
        weights = np.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4,
                            -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1, t ** 3], axis=1) / 6
        weights[(coordinate < 0) | (coordinate > length - 1)] = 0.0
        taps = np.abs(first.astype(int)[:, None] - 1 + np.arange(4))  # mirrored at both ends
        taps = np.where(taps > length - 1, 2 * (length - 1) - taps, taps)
        taps = np.clip(taps, 0, length - 1)  # only where the weights are 0: far outside
        spline = sparse.csr_matrix((weights.ravel(), taps.ravel(),
                                    np.arange(0, weights.size + 1, 4)),
                                   shape=(len(coordinate), length))
        moved = np.moveaxis(values, axis, 0)
        values = np.moveaxis((spline @ moved.reshape(length, -1)).reshape(
            (len(coordinate),) + moved.shape[1:]), 0, axis)
    return values.transpose(axis_of).astype(data.dtype)


def mask_onto_grid(mask_img: nib.Nifti1Image, reference: nib.Nifti1Image,
                   convention: str) -> np.ndarray:
    """A mask on any grid (probabilities or binary) as a boolean mask on the reference grid."""
    if convention == "cmb-workflow-1":
        # Linear then threshold keeps mask edges smooth when coming from a coarser grid.
        inside = (np.asarray(mask_img.dataobj) >= MASK_THRESHOLD).astype(np.float32)
        moved = resample(nib.Nifti1Image(inside, mask_img.affine), reference.shape,
                         reference.affine, "linear")
        return np.asarray(moved.dataobj) >= MASK_THRESHOLD
    moved = processing.resample_from_to(as_stored(mask_img), (reference.shape, reference.affine),
                                        order=0)
    return clean_mask(np.asarray(moved.dataobj), nib.affines.voxel_sizes(reference.affine))


def clean_mask(values: np.ndarray, voxel_sizes) -> np.ndarray:
    """SHiVAi's brain-mask cleaning: values above 0.5; if there are several 26-connected
    parts, the parts of at most MASK_MIN_PART_MM3 are dropped unless they lie within
    MASK_PART_REACH_VOXELS (a box) of a larger part."""
    mask = values > MASK_THRESHOLD
    # Parts, sizes and reach all lie within the mask's box (the reach beyond it meets no mask):
    # labelling the box alone gives the same result in a fraction of the 256^3 grid's time.
    box = bounding_box(mask, 0)
    parts, count = ndimage.label(mask[box], ndimage.generate_binary_structure(3, 3))
    if count <= 1:
        return mask
    sizes = np.bincount(parts.ravel())[1:]
    large = np.flatnonzero(sizes > MASK_MIN_PART_MM3 / np.prod(voxel_sizes)) + 1
    if not len(large):
        raise ImageError(f"no part of the brain mask is larger than {MASK_MIN_PART_MM3:g} mm³")
    reach = np.isin(parts, large).astype(np.uint8)
    reach = ndimage.maximum_filter(reach, size=2 * MASK_PART_REACH_VOXELS + 1, mode="constant")
    cleaned = np.zeros_like(mask)
    cleaned[box] = mask[box] & (reach > 0)
    return cleaned


def deface(img: nib.Nifti1Image, mask: np.ndarray) -> nib.Nifti1Image:
    """The image with the face sheared off by Quickshear (the library SHiVAi runs)."""
    from quickshear import quickshear

    mask_img = nib.Nifti1Image(mask.astype(np.float32), img.affine)
    with np.errstate(divide="ignore", invalid="ignore"):
        try:
            defaced = quickshear(img, mask_img, buff=DEFACE_BUFFER)
        except (IndexError, ValueError) as exc:
            raise ImageError(f"Quickshear found no shearing plane ({exc})") from exc
    return nib.Nifti1Image(np.asarray(defaced.dataobj, dtype=np.float32), img.affine)


def crop_start(mask: np.ndarray, dimensions, top_margin: int, convention: str) -> np.ndarray:
    """The box's first voxel (may be negative): centred on the mask's centre of mass rounded
    up, moved up when a mask reaching into the neck would leave the top of the brain out.

    shivai: moved only when the mask's top lies outside the box (or beyond the grid's end), to
    end `top_margin` voxels above it, end exclusive; cmb-workflow-1: moved whenever fewer than
    `top_margin` voxels lie above it, to keep that many."""
    dimensions = np.asarray(dimensions)
    centre = np.ceil(centre_of_mass(mask)).astype(int)
    start = centre - dimensions // 2
    top = int(np.nonzero(mask.any(axis=(0, 1)))[0].max())
    if convention == "cmb-workflow-1":
        start[2] = max(start[2], top + top_margin - dimensions[2] + 1)
        return start
    end = min(start[2] + dimensions[2], mask.shape[2])
    if end <= top:
        start[2] += top - end + top_margin
    return start


def extract_box(data: np.ndarray, start, dimensions) -> np.ndarray:
    """data[start:start+dimensions] with zeros where the box leaves the array."""
    out = nifti_zeros(dimensions, data.dtype)
    source, target = [], []
    for begin, size, length in zip(start, dimensions, data.shape):
        lo, hi = max(begin, 0), min(begin + size, length)
        source.append(slice(lo, max(hi, lo)))
        target.append(slice(lo - begin, max(hi, lo) - begin))
    out[tuple(target)] = data[tuple(source)]
    return out


def box_affine(affine: np.ndarray, start) -> np.ndarray:
    """The affine of a box starting at voxel `start`: every voxel keeps its world position."""
    moved = np.array(affine, dtype=float)
    moved[:3, 3] = nib.affines.apply_affine(affine, start)
    return moved


def normalize(data: np.ndarray, mask: np.ndarray | None, method: str, percentile: float,
              clip_max: float, brain: np.ndarray | None = None) -> np.ndarray:
    """shivai: divide by the brain's percentile, clip at clip_max, divide by clip_max;
    minmax: brain minimum to the percentile mapped to [0, 1]. NaN and negatives are 0 first.
    `brain`: the brain's intensities, when `data` is only part of the image (a training patch);
    else data[mask]."""
    data = np.nan_to_num(data.astype(np.float32), nan=0.0)
    data[data < 0] = 0
    if brain is None:
        brain = data[mask]
    else:
        brain = np.maximum(np.nan_to_num(brain.astype(np.float32), nan=0.0), 0)
    top = np.percentile(brain, percentile) if brain.size else 0.0
    if method == "shivai":
        if top <= 0:
            raise ValueError("brain voxels have no signal (percentile is 0)")
        return (np.minimum(data / top, clip_max) / clip_max).astype(np.float32)
    bottom = brain.min() if brain.size else 0.0
    if top <= bottom:
        raise ValueError("brain intensities are constant")
    return np.clip((data - bottom) / (top - bottom), 0.0, 1.0).astype(np.float32)
