"""Heads with microbleeds drawn by code sharing nothing with cmb_workflow.synthetic (by hand).

    python benchmarks/independent_heads.py OUT [--heads 8] [--seed 9001] [--look a|b|c]
    cmb-workflow run OUT OUT/derivatives/cmb-workflow
    cmb-workflow evaluate --truth OUT/derivatives/truth --results OUT/derivatives/cmb-workflow

A second generator for checking a model on images it was not built around (issue 23): the
anatomy is nilearn's MNI152 grey / white matter maps (CSF: the brain mask's rest), given
SWI-like intensities per head; veins are random walks blurred into dark tubes; microbleeds are
drawn on the native grid itself, with 27 sub-voxel samples per voxel, as hard-edged spheres or
Gaussian (blooming) blobs; then a multiplicative bias field and Rician noise. Each head has its
own pose (3-15 degrees), grid (0.45x0.45x1.8 to 1x1x2.5 mm, thick slices included) and axis
orientation. Looks:
  a: bright CSF (1.5-2.2 x white matter), white noise 3-6 % of white matter;
  b: bright CSF, noise 6-10 % coloured by a 1 mm Gaussian;
  c: dark CSF (0.5-0.8 x white matter), noise as b.
Writes OUT as a BIDS-like folder (sub-indNN/anat/sub-indNN_swi.nii.gz) and the truth as
derivatives/truth/sub-indNN/anat/sub-indNN_desc-cmb_lesions.json (centres in world mm,
diameters), which `cmb-workflow evaluate` reads. The same seed writes the same heads.
"""

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cmb_workflow.imageops import write_text_atomic
from cmb_workflow.registration import mni152

# (voxel size mm, axis signs): thick slices, and orientations other than RAS.
GRIDS = [((0.5, 0.5, 2.0), (-1, 1, 1)), ((0.9, 0.9, 0.9), (1, 1, 1)),
         ((0.6, 0.6, 1.5), (-1, -1, 1)), ((1.0, 1.0, 2.5), (1, -1, 1)),
         ((0.8, 0.8, 1.2), (-1, 1, 1)), ((0.45, 0.45, 1.8), (1, 1, 1)),
         ((1.0, 1.0, 1.0), (1, 1, 1)), ((0.7, 0.7, 1.4), (-1, 1, 1))]
FIELD_OF_VIEW_MM = np.array([220.0, 230.0, 160.0])
MICROBLEEDS_PER_HEAD = 8
DIAMETER_MM = (2.0, 9.0)
VEINS_PER_HEAD = 25
LOOKS = {"a": {"csf": (1.5, 2.2), "noise": (0.03, 0.06), "noise_mm": 0.0},
         "b": {"csf": (1.5, 2.2), "noise": (0.06, 0.10), "noise_mm": 1.0},
         "c": {"csf": (0.5, 0.8), "noise": (0.06, 0.10), "noise_mm": 1.0}}


def template_maps():
    """The MNI152 maps, as the template registration loads them (nilearn's, bundled)."""
    t1 = mni152("t1")
    grey, white = (np.asarray(mni152(kind).dataobj) for kind in ("gm", "wm"))
    brain = np.asarray(mni152("brain_mask").dataobj) > 0.5
    csf = np.clip(1.0 - grey - white, 0, 1) * brain
    scalp = np.clip(np.asarray(t1.dataobj) / np.asarray(t1.dataobj).max(), 0, 1)
    return t1.affine, grey, white, csf, brain, scalp


def dark_veins(rng, shape, starts):
    """Random walks from parenchyma voxels, blurred into tubes 0.4-1 mm in radius, each
    darkening its core by 30-60 %."""
    darkening = np.zeros(shape, np.float32)
    for _ in range(VEINS_PER_HEAD):
        point = starts[rng.integers(len(starts))].astype(float)
        heading = rng.normal(size=3)
        path = []
        for _ in range(int(rng.uniform(15, 50))):
            heading += rng.normal(scale=0.25, size=3)
            heading /= np.linalg.norm(heading)
            point = point + heading
            path.append(np.round(point).astype(int))
        path = np.array(path)
        path = path[np.all((path >= 0) & (path < np.array(shape)), axis=1)]
        line = np.zeros(shape, np.float32)
        line[tuple(path.T)] = 1.0
        radius = rng.uniform(0.4, 1.0)
        tube = np.clip(ndimage.gaussian_filter(line, radius) * 2 * np.pi * radius ** 2, 0, 1)
        np.maximum(darkening, tube * rng.uniform(0.3, 0.6), out=darkening)
    return darkening


def draw_microbleed(darkening, affine, centre, diameter, depth, blooming):
    """Darkening of one microbleed on the native grid, averaged over 3x3x3 points per voxel."""
    zooms = nib.affines.voxel_sizes(affine)
    reach = diameter / 2 + (diameter / 2 if blooming else 1.5)
    middle = nib.affines.apply_affine(np.linalg.inv(affine), centre)
    low = np.maximum(np.floor(middle - reach / zooms).astype(int) - 1, 0)
    high = np.minimum(np.ceil(middle + reach / zooms).astype(int) + 2, darkening.shape)
    if np.any(high <= low):
        return
    indices = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)],
                                   indexing="ij"), axis=-1).astype(float)
    profile = np.zeros(indices.shape[:3])
    offsets = (np.arange(3) + 0.5) / 3 - 0.5
    for offset in np.stack(np.meshgrid(offsets, offsets, offsets), -1).reshape(-1, 3):
        distance = np.linalg.norm(nib.affines.apply_affine(affine, indices + offset) - centre,
                                  axis=-1)
        if blooming:
            profile += np.exp(-0.5 * (distance / (diameter / 2.8)) ** 2)
        else:
            profile += np.clip((diameter / 2 + 0.35 - distance) / 0.7, 0, 1)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    np.maximum(darkening[box], profile / len(offsets) ** 3 * depth, out=darkening[box])


def make_head(rng, maps, grid, look):
    """(image, lesion records) of one head."""
    template_affine, grey, white, csf, brain, scalp = maps
    (zooms, signs), style = grid, LOOKS[look]
    parenchyma = np.argwhere(ndimage.binary_erosion(brain, iterations=4) & (grey + white > 0.6))
    tissue = white + grey * rng.uniform(1.05, 1.35) + csf * rng.uniform(*style["csf"])
    tissue = np.where(brain, tissue, 0.25 * scalp)
    tissue *= 1 - dark_veins(rng, tissue.shape, parenchyma) * brain
    tissue = ndimage.gaussian_filter(tissue, 0.6)

    rotation = Rotation.from_rotvec(rng.normal(size=3) / np.sqrt(3)
                                    * np.deg2rad(rng.uniform(3, 15))).as_matrix()
    shape = np.round(FIELD_OF_VIEW_MM / zooms).astype(int)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(np.array(zooms) * signs)
    affine[:3, 3] = (np.array([0.0, -18.0, 15.0]) + rng.uniform(-10, 10, 3)
                     - affine[:3, :3] @ ((shape - 1) / 2))
    to_template = np.linalg.inv(template_affine) @ affine
    image = ndimage.affine_transform(tissue, to_template[:3, :3], to_template[:3, 3],
                                     output_shape=tuple(shape), order=1)

    centres = []
    while len(centres) < MICROBLEEDS_PER_HEAD:
        candidate = parenchyma[rng.integers(len(parenchyma))]
        if all(np.linalg.norm(candidate - other) > 15 for other in centres):
            centres.append(candidate)
    darkening = np.zeros(image.shape, np.float32)
    lesions = []
    for label, voxel in enumerate(centres, start=1):
        centre = nib.affines.apply_affine(template_affine, voxel + rng.uniform(-0.5, 0.5, 3))
        diameter = float(rng.uniform(*DIAMETER_MM))
        blooming = bool(rng.random() < 0.5)
        draw_microbleed(darkening, affine, centre, diameter, rng.uniform(0.55, 0.9), blooming)
        lesions.append({"label": label, **dict(zip("xyz", np.round(centre, 2).tolist())),
                        "diameter_mm": round(diameter, 2),
                        "profile": "gaussian" if blooming else "hard"})
    image *= 1 - darkening

    axes = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    bias = np.exp(axes @ rng.normal(scale=0.12, size=3)
                  + axes ** 2 @ rng.normal(scale=0.08, size=3))
    sigma = rng.uniform(*style["noise"])
    noise = rng.normal(0, sigma, (2, *shape))
    if style["noise_mm"]:
        noise = np.stack([ndimage.gaussian_filter(part, style["noise_mm"] / np.array(zooms))
                          for part in noise])
        noise *= sigma / noise.std()
    image = np.hypot(image * bias + noise[0], noise[1]) * 800
    return nib.Nifti1Image(image.astype(np.int16), affine), lesions


def write_json(data, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(data, indent=1), path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=9001)
    parser.add_argument("--look", choices=sorted(LOOKS), default="a")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    maps = template_maps()
    write_json({"Name": f"independent heads, look {args.look}, seed {args.seed}",
                "BIDSVersion": "1.8.0"}, args.out / "dataset_description.json")
    truth = args.out / "derivatives" / "truth"
    write_json({"Name": "microbleeds as drawn", "BIDSVersion": "1.8.0",
                "DatasetType": "derivative"}, truth / "dataset_description.json")
    for number in range(args.heads):
        subject = f"sub-ind{number:02d}"
        image, lesions = make_head(rng, maps, GRIDS[number % len(GRIDS)], args.look)
        image.set_qform(image.affine, 1)
        image.set_sform(image.affine, 1)
        (args.out / subject / "anat").mkdir(parents=True, exist_ok=True)
        nib.save(image, args.out / subject / "anat" / f"{subject}_swi.nii.gz")
        write_json({"lesions": lesions},
                   truth / subject / "anat" / f"{subject}_desc-cmb_lesions.json")
        print(subject, "x".join(f"{z:g}" for z in GRIDS[number % len(GRIDS)][0]),
              [lesion["diameter_mm"] for lesion in lesions], flush=True)


if __name__ == "__main__":
    main()
