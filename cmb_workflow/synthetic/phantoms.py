"""Synthetic SWI / T2*-GRE heads with known microbleeds, and a BIDS-like dataset of them.

A phantom is the MNI152 2009 brain (nilearn's bundled 1 mm maps) wrapped in CSF, skull and
scalp, posed at random in the scanner, and sampled directly on a native acquisition grid; veins,
iron-rich nuclei, bias field and Rician noise supply the false-positive bait of real scans.
Everything follows from the seed.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import __version__
from ..imageops import save_atomic, write_text_atomic
from .atlas import INNER_LAYER_EDGES_MM, LAYER_EDGE_WIDTH_MM, OUTER_LAYER_EDGES_MM, load_atlas
from .features import (draw_lesions, draw_veins, make_veins, place_lesions, subsamples_per_axis,
                       subvoxel_offsets)
from .grids import GRIDS, Grid, place_grid, random_pose, resolve_grid

LOGGER = logging.getLogger("cmb_workflow.phantoms")

MODALITIES = ("swi", "T2starw")
DTYPES = ("int16", "float32")
MAX_CMB = 15
NAME = "cmb-workflow phantoms"
TRUTH_PIPELINE = "phantom-truth"
BIDS_VERSION = "1.9.0"

# The template is 1 mm: sampling tissue more finely than that inside thick voxels adds nothing.
TISSUE_SAMPLE_MM = 1.0
# Veins and bleeds are analytic: sample thick voxels every 0.7 mm so thin veins and 2 mm
# bleeds never fall between samples.
FEATURE_SAMPLE_MM = 0.7


@dataclass(frozen=True)
class Contrast:
    """Tissue intensities relative to white matter; darkening strengths (0 none, 1 black)."""

    gm: float
    csf: float
    bone: float
    diploe: float
    scalp: float
    muscle: float
    iron: float  # darkening of the globus pallidus, the most iron-laden nucleus
    vein: tuple[float, float]
    lesion: tuple[float, float]


TISSUES = ("gm", "csf", "bone", "diploe", "scalp", "muscle")
CONTRASTS = {
    # SWI magnitude with phase weighting: GM a bit darker than WM, veins and iron strongly dark.
    "swi": Contrast(gm=0.82, csf=1.45, bone=0.08, diploe=0.35, scalp=1.0, muscle=0.45, iron=0.45,
                    vein=(0.45, 0.8), lesion=(0.75, 0.92)),
    # T2*-weighted GRE magnitude: T2-like grey/white contrast, veins only moderately dark.
    "T2starw": Contrast(gm=1.25, csf=2.0, bone=0.08, diploe=0.45, scalp=1.15, muscle=0.5, iron=0.28,
                        vein=(0.2, 0.45), lesion=(0.65, 0.88)),
}
TISSUE_JITTER = (0.92, 1.08)
IRON_JITTER = (0.7, 1.3)
BIAS_LINEAR_SD, BIAS_QUADRATIC_SD = 0.2, 0.15  # log-bias per 100 mm
NOISE_FRACTION = (0.02, 0.06)  # Rician sigma over white-matter signal
INT16_WM_LEVEL = (250.0, 1200.0)
FLOAT_WM_LEVEL = (0.5, 2000.0)  # log-uniform: float images come in arbitrary units



@dataclass(frozen=True)
class Style:
    """How a phantom looks beyond its modality. Rules and models are checked on a style they
    were not built around, so a figure never depends on one look of the data."""

    csf_excess_scale: float = 1.0  # CSF's brightness above white matter, scaled
    grey_white_sign: float = 1.0  # -1 mirrors grey matter's contrast to white matter
    noise_fraction: tuple[float, float] = NOISE_FRACTION
    noise_correlation_mm: float = 0.0  # 0: white noise; else Gaussian-coloured at this sigma
    bias_scale: float = 1.0
    vein_depth_scale: float = 1.0
    lesion_edge_scale: float = 1.0  # wider rims: more blooming


STYLES = {
    # The look the demo model was trained on.
    "standard": Style(),
    # Flatter CSF, mirrored grey/white contrast, coloured noise, stronger bias, darker veins and
    # blooming bleeds.
    "contrast-b": Style(csf_excess_scale=0.4, grey_white_sign=-1.0, noise_fraction=(0.03, 0.08),
                        noise_correlation_mm=0.8, bias_scale=2.0, vein_depth_scale=1.2,
                        lesion_edge_scale=1.8),
    # CSF darker than white matter (as on some phase-weighted SWI), weak grey/white contrast,
    # strong coloured noise, faint veins and hard-edged bleeds.
    "contrast-c": Style(csf_excess_scale=-0.6, grey_white_sign=0.4, noise_fraction=(0.05, 0.10),
                        noise_correlation_mm=1.2, bias_scale=1.5, vein_depth_scale=0.7,
                        lesion_edge_scale=0.5),
    # Very bright CSF (about twice white matter), grey matter brighter than white, white noise,
    # little bias, dark veins, slightly blooming bleeds. Added after demo-5 was trained; no
    # training recipe was chosen by looking at it.
    "contrast-d": Style(csf_excess_scale=2.2, grey_white_sign=-0.6, noise_fraction=(0.03, 0.07),
                        noise_correlation_mm=0.0, bias_scale=0.5, vein_depth_scale=1.3,
                        lesion_edge_scale=1.3),
}

# One independent random stream per aspect, so fixing e.g. the grid leaves the anatomy as is.
_STREAMS = ("choices", "pose", "grid", "contrast", "veins", "lesions", "noise")


@dataclass
class Phantom:
    """One synthetic subject on its native grid, with its ground truth."""

    image: nib.Nifti1Image
    cmb_mask: nib.Nifti1Image  # int16 labels 1..N matching `lesions`
    brain_mask: nib.Nifti1Image  # uint8 0/1
    lesions: list  # dicts: label, x, y, z (world mm), diameter_mm, location
    modality: str
    grid: dict  # the "grid" block of the lesions JSON
    seed: int
    pose: np.ndarray  # template (MNI152 mm) -> world mm, 4x4
    veins: list = ()  # features.Vein, template mm, as drawn
    vein_depths: tuple = ()  # darkening at each vein's core

    def arrays(self):
        """(image float32, lesion labels int16, brain mask uint8) on the native grid, e.g. for
        drawing training patches; `image.affine` maps their indices to world mm."""
        return (self.image.get_fdata(dtype=np.float32), np.asanyarray(self.cmb_mask.dataobj),
                np.asanyarray(self.brain_mask.dataobj))

    def iron_load(self, affine, shape) -> np.ndarray:
        """Relative iron load of the deep nuclei (0..1, globus pallidus 1), float32, on any grid
        (`affine`: voxel index -> world mm): where the phantom's iron darkening lies."""
        atlas = load_atlas()
        return _resample(atlas.iron, _index_to_template(self.pose, affine, atlas), shape, (1, 1, 1))

    def truth(self, source: str) -> dict:
        """The lesions JSON for this phantom saved at `source` (relative to the dataset root)."""
        return {"source": source, "modality": self.modality, "seed": self.seed, "grid": self.grid,
                "lesions": self.lesions}


def _nifti(data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _styled(contrast: Contrast, style: Style) -> Contrast:
    if style == STYLES["standard"]:
        return contrast  # exactly: the standard phantoms stay byte-identical
    return replace(contrast, gm=1.0 + style.grey_white_sign * (contrast.gm - 1.0),
                   csf=1.0 + style.csf_excess_scale * (contrast.csf - 1.0),
                   vein=tuple(min(0.95, d * style.vein_depth_scale) for d in contrast.vein))


def _template_image(atlas, contrast: Contrast, rng, bias_scale: float = 1.0):
    """Noise-free head intensity in template space (white matter = 1) with iron and bias."""
    relative = {"wm": 1.0, **{name: getattr(contrast, name) for name in TISSUES}}
    level = {name: value * rng.uniform(*TISSUE_JITTER) for name, value in relative.items()}
    # Cumulative fractions inside each layer's outer edge (intracranial, inner table, ...).
    cumulative = [atlas.brain]
    for distance, edges in ((atlas.envelope_distance, INNER_LAYER_EDGES_MM),
                            (atlas.head_distance, OUTER_LAYER_EDGES_MM)):
        for edge in edges.values():
            # In place: clip(0.5 - (distance - edge) / width, 0, 1), then at least the layer below.
            inside = distance * np.float32(-1.0 / LAYER_EDGE_WIDTH_MM)
            inside += np.float32(0.5 + edge / LAYER_EDGE_WIDTH_MM)
            np.clip(inside, 0.0, 1.0, out=inside)
            cumulative.append(np.maximum(inside, cumulative[-1], out=inside))
    intracranial, inner_table, diploe, outer_table, scalp = cumulative[1:]

    # Inside the skull: GM and WM fractions, CSF for the rest.
    image = atlas.gm * (level["gm"] - level["csf"])
    image += atlas.wm * (level["wm"] - level["csf"])
    image += level["csf"]
    image *= intracranial
    for outer, inner, value in ((inner_table, intracranial, level["bone"]),
                                (diploe, inner_table, level["diploe"]),
                                (outer_table, diploe, level["bone"]),
                                (scalp, outer_table, level["scalp"])):
        image += (outer - inner) * value
    image += np.minimum(atlas.neck, 1.0 - scalp) * level["muscle"]
    image *= 1.0 - contrast.iron * rng.uniform(*IRON_JITTER) * atlas.iron

    # Smooth multiplicative bias: a separable exp-quadratic across the head.
    for axis, size in enumerate(image.shape):
        u = (np.arange(size) + atlas.origin[axis] - atlas.brain_centre[axis]) / 100.0
        log_bias = bias_scale * (rng.normal(0, BIAS_LINEAR_SD) * u
                                 + rng.normal(0, BIAS_QUADRATIC_SD) * u**2)
        shape = [-1 if k == axis else 1 for k in range(3)]
        image *= np.exp(log_bias).astype(np.float32).reshape(shape)
    return image


def _index_to_template(pose, affine, atlas):
    """Voxel index of a grid (`affine`: index -> world mm) -> template array index."""
    index_to_template = np.linalg.inv(pose) @ affine
    index_to_template[:3, 3] -= atlas.origin
    return index_to_template


def _resample(volume, index_to_template, shape, subsamples):
    """Average of trilinear samples of a template volume at sub-positions of each voxel of a
    grid of `shape`.

    SimpleITK does the sampling (about 5x faster than scipy's affine_transform, on one thread).
    Its image axes run opposite to numpy's, so both index frames are reversed around the map.
    """
    reverse = np.eye(3)[::-1]
    matrix, offset = index_to_template[:3, :3], index_to_template[:3, 3]
    source = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in shape[::-1]])
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetNumberOfThreads(1)
    positions = subvoxel_offsets(subsamples)
    total = None
    for position in positions:
        transform = sitk.AffineTransform(3)
        transform.SetMatrix((reverse @ matrix @ reverse).ravel().tolist())
        transform.SetTranslation((reverse @ (offset + matrix @ position)).tolist())
        resampler.SetTransform(transform)
        sample = sitk.GetArrayFromImage(resampler.Execute(source))
        total = sample if total is None else np.add(total, sample, out=total)
    total /= len(positions)
    return total


def _add_rician_noise(image, sigma, rng, correlation_voxels=None):
    """|signal + complex Gaussian noise|, in place on a float32 array; with
    correlation_voxels (per axis), each noise channel is Gaussian-coloured to the same sigma."""

    def channel(out=None):
        noise = rng.standard_normal(image.shape, dtype=np.float32, out=out)
        if correlation_voxels is not None:
            ndimage.gaussian_filter(noise, correlation_voxels, output=noise)
            noise /= max(float(noise.std()), 1e-12)
        noise *= sigma
        return noise

    noise = channel()
    image += noise
    image *= image
    channel(out=noise)
    noise *= noise
    image += noise
    np.sqrt(image, out=image)


def make_phantom(seed: int, *, modality: str | None = None, grid=None, n_cmb: int | None = None,
                 dtype: str | None = None, style: str = "standard") -> Phantom:
    """One synthetic subject, in memory (see Phantom; Phantom.arrays() for training patches).

    `style`: a name in STYLES, the look of the image. Unset options are drawn from the seed; `grid` is a Grid, the label or index of a predefined
    grid (GRIDS), or None for a random one. n_cmb is the number requested (0..15 at random if
    None); fewer are made only when the field of view leaves no room for them.
    """
    streams = dict(zip(_STREAMS, (np.random.default_rng(s)
                                  for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))
    choices = streams["choices"]
    drawn = (MODALITIES[choices.integers(len(MODALITIES))], int(choices.integers(len(GRIDS))),
             int(choices.integers(0, MAX_CMB + 1)), DTYPES[choices.integers(len(DTYPES))])
    modality = drawn[0] if modality is None else modality
    spec: Grid = resolve_grid(drawn[1] if grid is None else grid)
    n_cmb = drawn[2] if n_cmb is None else int(n_cmb)
    dtype = drawn[3] if dtype is None else dtype
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if n_cmb < 0:
        raise ValueError(f"n_cmb must be >= 0, got {n_cmb}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {tuple(STYLES)}, got {style!r}")

    atlas = load_atlas()
    look = STYLES[style]
    contrast = _styled(CONTRASTS[modality], look)
    pose = random_pose(streams["pose"], atlas.brain_centre)
    native = place_grid(streams["grid"], spec, pose, atlas)
    index_to_template = _index_to_template(pose, native.affine, atlas)

    tissue_subsamples = subsamples_per_axis(native.voxel_size, TISSUE_SAMPLE_MM)
    image = _resample(_template_image(atlas, contrast, streams["contrast"], look.bias_scale),
                      index_to_template,
                      native.shape, tissue_subsamples)
    brain = (_resample(atlas.brain, index_to_template, native.shape, (1, 1, 1))
             >= 0.5).astype(np.uint8)

    darkness = np.zeros(native.shape, np.float32)
    labels = np.zeros(native.shape, np.int16)
    feature_subsamples = subsamples_per_axis(native.voxel_size, FEATURE_SAMPLE_MM)
    veins = make_veins(streams["veins"], atlas)
    vein_depths = streams["veins"].uniform(*contrast.vein, len(veins))
    draw_veins(darkness, veins, pose, native, vein_depths, feature_subsamples)
    lesions = place_lesions(streams["lesions"], n_cmb, atlas, pose, native)
    draw_lesions(darkness, labels, lesions, native,
                 streams["lesions"].uniform(*contrast.lesion, len(lesions)), feature_subsamples,
                 look.lesion_edge_scale)
    np.subtract(1.0, darkness, out=darkness)
    image *= darkness
    del darkness

    noise = streams["noise"]
    if dtype == "int16":
        wm_level = noise.uniform(*INT16_WM_LEVEL)
    else:
        wm_level = np.exp(noise.uniform(*np.log(FLOAT_WM_LEVEL)))
    image *= wm_level
    correlation = (look.noise_correlation_mm / np.asarray(native.voxel_size)
                   if look.noise_correlation_mm else None)
    _add_rician_noise(image, wm_level * noise.uniform(*look.noise_fraction), noise, correlation)
    if dtype == "int16":
        image = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)

    grid_info = {
        "shape": list(native.shape),
        "voxel_size_mm": list(spec.voxel_size),
        "axcodes": "".join(nib.aff2axcodes(native.affine)),
        "oblique": spec.oblique,
        "fov_cut": spec.fov_cut,
        "dtype": dtype,
        "label": spec.label,
        "style": style,
    }
    return Phantom(image=_nifti(image, native.affine), cmb_mask=_nifti(labels, native.affine),
                   brain_mask=_nifti(brain, native.affine),
                   lesions=[lesion.as_dict() for lesion in lesions], modality=modality,
                   grid=grid_info, seed=int(seed), pose=pose, veins=veins,
                   vein_depths=tuple(vein_depths))


def subject_plan(n_subjects: int, seed: int = 0, *, modalities=MODALITIES,
                 grids=None) -> list[dict]:
    """Label, seed, modality and grid of each subject of a dataset, without generating anything.

    Subject i gets grids[i % len(grids)], so any len(grids) consecutive subjects cover every
    grid; modalities alternate along the grids and shift by one on each pass through them, so
    len(modalities) * len(grids) subjects see every grid in every modality.
    """
    grids = [resolve_grid(g) for g in (GRIDS if grids is None else grids)]
    modalities = tuple(modalities)
    unknown = set(modalities) - set(MODALITIES)
    if unknown or not modalities or not grids:
        raise ValueError(f"need modalities among {MODALITIES} and at least one grid")
    if n_subjects < 0:
        raise ValueError(f"n_subjects must be >= 0, got {n_subjects}")
    return [{
        "label": f"ph{index:03d}",
        "seed": int(np.random.SeedSequence([seed, index]).generate_state(1)[0]),
        "modality": modalities[(index % len(grids) + index // len(grids)) % len(modalities)],
        "grid": grids[index % len(grids)],
    } for index in range(n_subjects)]


def _write_json(data, path):
    write_text_atomic(json.dumps(data, indent=2) + "\n", path)


def make_phantom_dataset(out_dir, n_subjects: int, seed: int = 0, *, modalities=MODALITIES,
                         grids=None, n_cmb: int | None = None,
                         dtype: str | None = None, style: str = "standard") -> list[dict]:
    """Write a BIDS-like raw dataset of phantoms plus their truth under
    derivatives/phantom-truth; return one dict per subject (ids, counts and written paths).

    Files are written under temporary names and renamed into place; subjects of an earlier run
    beyond n_subjects are left alone, but participants.tsv lists only this run's subjects."""
    root = Path(out_dir)
    truth_root = root / "derivatives" / TRUTH_PIPELINE
    generated_by = [{"Name": NAME, "Version": __version__}]
    _write_json({"Name": NAME, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
                 "GeneratedBy": generated_by,
                 "HowToAcknowledge": "Synthetic data built on the MNI152 2009 template."},
                root / "dataset_description.json")
    _write_json({"Name": f"{NAME} ground truth", "BIDSVersion": BIDS_VERSION,
                 "DatasetType": "derivative", "GeneratedBy": generated_by},
                truth_root / "dataset_description.json")

    subjects = []
    for entry in subject_plan(n_subjects, seed, modalities=modalities, grids=grids):
        subject = f"sub-{entry['label']}"
        phantom = make_phantom(entry["seed"], modality=entry["modality"], grid=entry["grid"],
                               n_cmb=n_cmb, dtype=dtype, style=style)
        source = f"{subject}/anat/{subject}_{phantom.modality}.nii.gz"
        truth_prefix = truth_root / subject / "anat" / subject
        paths = {
            "image": root / source,
            "cmb_mask": Path(f"{truth_prefix}_desc-cmb_mask.nii.gz"),
            "brain_mask": Path(f"{truth_prefix}_desc-brain_mask.nii.gz"),
            "lesions": Path(f"{truth_prefix}_desc-cmb_lesions.json"),
        }
        save_atomic(phantom.image, paths["image"])
        save_atomic(phantom.cmb_mask, paths["cmb_mask"])
        save_atomic(phantom.brain_mask, paths["brain_mask"])
        _write_json(phantom.truth(source), paths["lesions"])
        LOGGER.info("%s: %s on %s, %d microbleeds", subject, phantom.modality,
                    phantom.grid["label"], len(phantom.lesions))
        subjects.append({"participant_id": subject, "modality": phantom.modality,
                         "n_cmb": len(phantom.lesions), "seed": entry["seed"],
                         "grid": phantom.grid["label"], **paths})

    rows = ["participant_id\tmodality\tn_cmb"]
    rows += [f"{s['participant_id']}\t{s['modality']}\t{s['n_cmb']}" for s in subjects]
    write_text_atomic("\n".join(rows) + "\n", root / "participants.tsv")
    return subjects


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cmb-workflow phantoms`."""
    parser.add_argument("output_dir", metavar="OUT", type=Path,
                        help="folder to write the BIDS-like phantom dataset to")
    parser.add_argument("--n-subjects", type=_non_negative_int, default=len(GRIDS) * 2,
                        help="number of subjects (default: %(default)s, every grid in both "
                             "modalities)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="dataset seed; the same seed writes byte-identical files")
    parser.add_argument("--modality", choices=(*MODALITIES, "both"), default="both",
                        help="contrast of the phantoms (default: both, alternating)")
    parser.add_argument("--grid", action="append", choices=[g.label for g in GRIDS],
                        help="acquisition grid label; repeat to cycle through several "
                             "(default: all predefined grids)")
    parser.add_argument("--style", choices=tuple(STYLES), default="standard",
                        help="appearance: tissue contrasts, noise texture, bias, veins and "
                             "bleed rims (default: %(default)s)")


def run_from_args(args: argparse.Namespace) -> int:
    modalities = MODALITIES if args.modality == "both" else (args.modality,)
    subjects = make_phantom_dataset(args.output_dir, args.n_subjects, args.seed,
                                    modalities=modalities, grids=args.grid, style=args.style)
    for subject in subjects:
        print(f"{subject['participant_id']}\t{subject['modality']}\t{subject['grid']}\t"
              f"{subject['n_cmb']} CMB")
    print(f"wrote {len(subjects)} phantoms to {args.output_dir}")
    return 0
