"""Microbleed Anatomical Rating Scale (MARS) regions: the bundled MNI152 atlas and the
winner-takes-all assignment of lesions to its regions.

The atlas (data/mars_atlas) is built by scripts/build_mars_atlas.py from nilearn's MNI152 2009
tissue maps and coordinate rules; see that script for how each region is defined.
"""

from __future__ import annotations

import functools
from importlib import resources

import nibabel as nib
import numpy as np

# Region -> MARS class, in the order of their atlas codes (right: 1.., left: LEFT_OFFSET + 1..).
REGIONS = {
    "frontal": "lobar", "parietal": "lobar", "temporal": "lobar", "occipital": "lobar",
    "insula": "lobar",
    "basal_ganglia": "deep", "thalamus": "deep", "internal_capsule": "deep",
    "external_capsule": "deep", "corpus_callosum": "deep", "deep_white_matter": "deep",
    "brainstem": "infratentorial", "cerebellum": "infratentorial",
}
MARS_CLASSES = ("lobar", "deep", "infratentorial")
# The lesion's centroid in MNI152 2009 space (mm), through the atlas' registration.
MNI_COLUMNS = ("x_mni", "y_mni", "z_mni")
# Columns the lesion table gains.
REGION_COLUMNS = ("region", "mars_class", "hemisphere", *MNI_COLUMNS)
LEFT_OFFSET = 100
ATLAS_FILE = "mars_mni152_2009.nii.gz"
# A lesion with no atlas voxel (outside the registered atlas' reach).
UNKNOWN = {"region": "unknown", "mars_class": "unknown", "hemisphere": "unknown"}


def region_codes() -> dict[int, dict]:
    """Atlas voxel value -> region, MARS class and hemisphere."""
    codes = {}
    for index, (region, mars_class) in enumerate(REGIONS.items(), start=1):
        for offset, hemisphere in ((0, "right"), (LEFT_OFFSET, "left")):
            codes[index + offset] = {"region": region, "mars_class": mars_class,
                                     "hemisphere": hemisphere}
    return codes


@functools.lru_cache(maxsize=1)
def mars_atlas() -> nib.Nifti1Image:
    """The bundled atlas in MNI152 2009 space (uint8 codes of region_codes())."""
    path = resources.files("cmb_workflow").joinpath("data", "mars_atlas", ATLAS_FILE)
    with resources.as_file(path) as file:
        img = nib.load(str(file))
        return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.uint8), img.affine)


def assign_regions(labels: np.ndarray, atlas: np.ndarray, centroids: dict) -> dict[int, dict]:
    """Lesion label -> region record: the atlas code covering most of the lesion's voxels; a
    tie goes to the code at the lesion's centroid voxel (centroids: label -> voxel index), then
    to the lowest code, so the answer never depends on voxel order."""
    codes = region_codes()
    # One pass over the voxels: counts[label, code].
    inside = labels > 0
    counts = np.zeros((int(labels.max(initial=0)) + 1, 256), np.int64)
    np.add.at(counts, (labels[inside], atlas[inside]), 1)
    counts[:, 0] = 0
    result = {}
    for label, centroid in centroids.items():
        if not counts[label].any():
            result[label] = dict(UNKNOWN)
            continue
        tied = np.flatnonzero(counts[label] == counts[label].max())
        at_centroid = int(atlas[tuple(centroid)])
        winner = at_centroid if at_centroid in tied else int(tied[0])
        result[label] = dict(codes[winner])
    return result


def mars_counts(rows) -> dict:
    """Microbleeds per MARS class and strictly_lobar (yes / no / n/a) of one image's lesions.

    Strictly lobar follows the Boston criteria v2.0: at least one lobar microbleed and none in
    the deep regions or the brainstem (cerebellar ones are allowed). n/a when a lesion has no
    region and none of the others rules it out.
    """
    counts = {f"n_{mars_class}": sum(row["mars_class"] == mars_class for row in rows)
              for mars_class in MARS_CLASSES}
    if counts["n_deep"] or any(row["region"] == "brainstem" for row in rows):
        strictly_lobar = "no"
    elif any(row["region"] == "unknown" for row in rows):
        strictly_lobar = "n/a"
    else:
        strictly_lobar = "yes" if counts["n_lobar"] else "no"
    return {**counts, "strictly_lobar": strictly_lobar}
