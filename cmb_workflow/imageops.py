"""Image helpers shared by the interfaces: loading, grids, resampling, atomic writes.

World coordinates always come from nibabel's affine (scanner RAS, mm). SimpleITK does the
interpolation between grids (multi-threaded; SHiVAi's own conform uses nibabel, see
preprocessing.py); images are handed to it with geometry derived from that same affine so no
qform/sform ambiguity creeps in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

INTERPOLATORS = {
    "welch": sitk.sitkWelchWindowedSinc,
    "bspline": sitk.sitkBSpline,
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
}

# Images in the work folder are written uncompressed: gzip shrinks a noisy float image by only
# ~15 % and costs about a second per image each way; masks and labels (mostly zeros) stay gzipped.
WORK_IMAGE_SUFFIX = ".nii"

# ITK works in LPS; nibabel in RAS.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


class ImageError(ValueError):
    """An input image that cannot be processed; the message names the file and the problem."""


# A qform within this of the sform (mm, and unitless for the rotation part) is the same
# geometry written with the quaternion's float32 rounding.
QFORM_AGREEMENT = 1e-3


def load_volume(path, *, echo: int = 1, limits=None,
                prefer_qform: bool = False) -> nib.Nifti1Image:
    """Load a NIfTI as a 3D float32 image; for 4D (multi-echo) images take echo `echo` (1-based).

    limits (configs.InputLimits): refuse, before reading the voxels, an image whose field of
    view, voxel size or voxel count no head needs. prefer_qform: use the qform's own numbers
    where it agrees with the sform (as SHiVAi reads headers; where they disagree, the sform)."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        header_geometry(img, path)
        if limits is not None:
            check_size(img, path, limits)
        dtype = img.get_data_dtype()
        if dtype.names or dtype.kind == "c":
            kind = "complex" if dtype.kind == "c" else "RGB / multi-field"
            raise ImageError(f"{path}: holds {kind} voxels ({dtype}); give the magnitude image, "
                             "one real value per voxel")
        data = np.asanyarray(img.dataobj)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(f"{path}: not enough memory to read {np.prod(img.shape)} voxels "
                         f"of {img.get_data_dtype()}") from exc
    except Exception as exc:  # nibabel raises many types for truncated/foreign files
        raise ImageError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    shape = data.shape
    if data.ndim == 4:
        if not 1 <= echo <= shape[3]:
            raise ImageError(f"{path}: has {shape[3]} volumes, echo {echo} requested")
        data = data[..., echo - 1]
    elif data.ndim != 3:
        raise ImageError(f"{path}: is {data.ndim}D {shape}; a 3D volume (or 4D multi-echo) is needed")
    if min(data.shape) < 2:
        raise ImageError(f"{path}: is a single slice {shape}; a 3D volume is needed")
    data = data.astype(np.float32)
    affine = img.affine
    if prefer_qform and int(img.header.get("qform_code", 0)) > 0:
        qform = img.get_qform()
        if np.allclose(qform, affine, rtol=0, atol=QFORM_AGREEMENT):
            affine = qform
    return nib.Nifti1Image(data, affine)


def header_geometry(img, path) -> np.ndarray:
    """The affine that places `img` in scanner space; refused when it cannot do so."""
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise ImageError(f"{path}: has a non-finite affine (NaN or infinite entries): cannot be "
                         "placed in scanner space")
    header = img.header
    # Without an sform the affine is built from pixdim, which nibabel turns from 0 into 1 mm
    # when it loads the header: read the file's own values.
    if "sform_code" in header and int(header["sform_code"]) == 0:
        header_file = (img.file_map.get("header") or img.file_map["image"]).filename
        with nib.openers.ImageOpener(header_file) as raw:
            pixdim = type(header).from_fileobj(raw, check=False)["pixdim"][1:4]
        pixdim = np.asarray(pixdim, dtype=float)
        if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
            raise ImageError(f"{path}: has no usable geometry: no sform, and voxel sizes "
                             f"(pixdim) {pixdim.tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise ImageError(f"{path}: has a degenerate affine (voxel axes "
                         f"{np.round(affine[:3, :3], 3).tolist()}): cannot be placed in "
                         "scanner space")
    return affine


def check_size(img, path, limits) -> None:
    """Refuse a field of view, voxel size or voxel count no head scan has (configs.InputLimits).

    Images of fewer than 3 dimensions are left to load_volume's own message."""
    if len(img.shape) < 3:
        return
    shape = np.array(img.shape[:3])
    voxel = nib.affines.voxel_sizes(img.affine)
    fov = shape * voxel
    if voxel.max() > limits.max_voxel_size_mm:
        raise ImageError(f"{path}: voxels of {np.round(voxel, 2).tolist()} mm; a head scan has "
                         f"none above {limits.max_voxel_size_mm:g} mm "
                         "(setting input_limits.max_voxel_size_mm)")
    if fov.max() > limits.max_fov_mm:
        raise ImageError(f"{path}: field of view {np.round(fov).tolist()} mm; a head scan needs "
                         f"none above {limits.max_fov_mm:g} mm (setting input_limits.max_fov_mm)")
    if np.prod(shape) > limits.max_voxels:
        raise ImageError(f"{path}: {int(np.prod(shape))} voxels per volume; at most "
                         f"{limits.max_voxels} are accepted (setting input_limits.max_voxels)")


def to_sitk(img: nib.Nifti1Image) -> sitk.Image:
    """A SimpleITK image with the same voxels and the same world geometry as `img`."""
    data = np.asarray(img.dataobj)
    # SimpleITK indexes arrays as [z, y, x].
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    spacing, direction, origin = sitk_geometry(img.affine)
    out.SetSpacing(spacing)
    out.SetDirection(direction)
    out.SetOrigin(origin)
    return out


def sitk_geometry(affine: np.ndarray) -> tuple[list, list, list]:
    """SimpleITK's spacing, direction and origin (LPS world) of a NIfTI affine."""
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = _RAS_TO_LPS @ (linear / spacing)
    return ([float(s) for s in spacing], [float(d) for d in direction.ravel()],
            [float(o) for o in _RAS_TO_LPS @ affine[:3, 3]])


def resample(img: nib.Nifti1Image, shape, affine, interpolation: str, *, clamp: bool = False,
             dtype=np.float32) -> nib.Nifti1Image:
    """Resample `img` onto the grid (shape, affine); zero outside the source field of view."""
    spacing, direction, origin = sitk_geometry(affine)
    resampled = sitk.Resample(to_sitk(img), [int(n) for n in shape], sitk.Transform(),
                              INTERPOLATORS[interpolation], origin, spacing, direction, 0.0,
                              sitk.sitkFloat32)
    # A view, copied once below (in NIfTI's own axis order, which nibabel writes fastest).
    data = sitk.GetArrayViewFromImage(resampled).transpose(2, 1, 0)
    if clamp:
        # Sinc and B-spline kernels ring at edges; keep the input's intensity range as SHiVAi does.
        source_data = np.asarray(img.dataobj)
        return nib.Nifti1Image(np.clip(data, source_data.min(), source_data.max()).astype(
            dtype, copy=False), affine)
    return nib.Nifti1Image(data.astype(dtype), affine)


def read_mask(path) -> np.ndarray:
    """The mask stored at `path` as a boolean array: every non-zero voxel is inside."""
    return np.asarray(nib.load(path).dataobj) > 0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected part of a binary mask (all False if it is empty)."""
    # SimpleITK labels on all cores and sorts the parts by size: about a third of scipy's
    # label + bincount time on a 256^3 grid, the same part.
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask_to_sitk(mask), False))
    return sitk.GetArrayFromImage(labels) == 1


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background part that does not reach the array's edge (6-connected)
    filled: scipy's binary_fill_holes, on all cores, in half its time."""
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(mask_to_sitk(mask), False, 1)) > 0


def mask_to_sitk(mask: np.ndarray) -> sitk.Image:
    """A binary array as a SimpleITK image in the array's own axis order (no geometry: for
    voxel-wise work whose result goes straight back to an array)."""
    return sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))


def nifti_zeros(shape, dtype) -> np.ndarray:
    """Zeros in NIfTI's own axis order (Fortran), for a volume that will be saved: nibabel
    writes a C-ordered array through a transposed copy, about 0.1 s per 256^3 grid."""
    return np.zeros(tuple(shape), dtype=dtype, order="F")


def centre_of_mass(mask: np.ndarray) -> np.ndarray:
    """A non-empty 3D mask's centre of mass in voxel coordinates: ndimage.center_of_mass's
    sums, from the mask's projections on each axis (whole numbers, so exactly the same) instead
    of a float copy of the grid per axis (0.16 -> 0.03 s on a 256^3 grid)."""
    count = np.count_nonzero(mask)
    return np.array([np.dot(np.arange(length), mask.sum(axis=tuple({0, 1, 2} - {axis}))) / count
                     for axis, length in enumerate(mask.shape)])


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The slices of `mask`'s nonzero part grown by `margin` voxels, within the array (the whole
    array when the mask is empty)."""
    box = []
    for axis, size in enumerate(mask.shape):
        # Projections onto each axis: a fraction of argwhere's time on a mostly empty grid.
        filled = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not filled.size:
            return tuple(slice(0, n) for n in mask.shape)
        box.append(slice(max(int(filled[0]) - margin, 0), min(int(filled[-1]) + 1 + margin, size)))
    return tuple(box)


def conformed_grid(img: nib.Nifti1Image, voxel_size: float = 1.0):
    """An axis-aligned RAS grid of `voxel_size` mm covering the image's whole field of view.

    Its affine is a pure scaling plus translation in scanner coordinates, so world positions
    (and lesion coordinates computed on it) are those of the input.
    """
    shape = np.array(img.shape[:3])
    # Corners of the field of view: voxel centres ± half a voxel.
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
    world = nib.affines.apply_affine(img.affine, corners.T)
    low = np.floor(world.min(axis=0) / voxel_size) * voxel_size
    high = np.ceil(world.max(axis=0) / voxel_size) * voxel_size
    out_shape = tuple(int(n) for n in np.round((high - low) / voxel_size))
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = low + voxel_size / 2
    return out_shape, affine


def save_atomic(img: nib.Nifti1Image, path) -> Path:
    """Write a NIfTI under a temporary name in the target folder, then rename it into place."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with _temporary_sibling(path, suffix) as tmp:
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        nib.save(img, tmp)
    return path


def write_text_atomic(text: str, path) -> Path:
    path = Path(path)
    with _temporary_sibling(path, path.suffix) as tmp:
        Path(tmp).write_text(text)
    return path


def copy_atomic(source, path) -> Path:
    path = Path(path)
    with _temporary_sibling(path, "".join(path.suffixes)) as tmp:
        shutil.copyfile(source, tmp)
    return path


def remove_stale_temporaries(path) -> None:
    """Delete temporary siblings of `path` that a killed writer left behind."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink()


@contextlib.contextmanager
def _temporary_sibling(path: Path, suffix: str):
    """Yield a temporary file name beside `path`; rename it onto `path` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        os.unlink(tmp)
        raise
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
