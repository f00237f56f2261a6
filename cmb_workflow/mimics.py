"""How much a detected lesion looks like a microbleed mimic rather than a microbleed.

A microbleed is small, round, isolated and dark all round. Its commonest mimics are veins (a
dark tube that goes on beyond the candidate), partial-volume edges (dark against one side only,
typically where bright CSF meets tissue) and iron-dark nuclei (a large dark region the candidate
is only part of). Each lesion is measured on the image the model saw, in a patch around it;
nothing here depends on the model. Where a detection sits on a compact dark blob, the lesion
measured is that blob, freed of the thinner veins touching it: a detection may mark only part
of a bleed, and a bleed may lie against a vein. The rule that combines the measures is in `mimic_score` and
docs/mimics.md.
"""

from __future__ import annotations

import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage
from skimage.filters import frangi

# Half-width of the patch measured around each lesion; distances further than this read as it.
PATCH_RADIUS_MM = 15.0
# The surroundings a lesion's darkness is judged against: this far from its voxels.
SHELL_MM = (1.0, 4.0)
# The dark structure a lesion belongs to: connected voxels darker than halfway between its
# darkest voxel and its surroundings (or the brain's median, if brighter).
HALF_DEPTH = 0.5
# A dark structure reaching this far beyond the lesion on both sides of its axis, more than its
# own width, is a tube.
CONTINUES_MM = 3.0
# CSF is the brain's bright fluid on SWI and T2*-GRE: this much above the median brain voxel,
# in pieces of at least CSF_MIN_VOXELS.
CSF_EXCESS = 0.25
CSF_MIN_VOXELS = 20
# Frangi scales: the calibres of the veins a microbleed is confused with.
VESSEL_SIGMAS_MM = (0.5, 1.0, 1.5, 2.0)
VESSEL_REACH_MM = 3 * VESSEL_SIGMAS_MM[-1]
# Ramps of the rule: (feature value at score 0, at score 1).
ELONGATION_RAMP = (2.0, 4.0)
SPHERICITY_RAMP = (0.4, 0.2)  # a sheet along a surface (sulcal or ventricular edge, pial vein)
ONE_SIDED_RAMP = (0.6, 0.9)
CONTRAST_RAMP = (0.10, 0.0)
# The dark structure's volume in the patch: a 10 mm microbleed, rim included, stays under the
# ramp's start; a deep nucleus or a vein tree does not.
LARGE_DARK_RAMP_MM3 = (1000.0, 2500.0)
# The widest microbleed, blooming included.
MAX_BLEED_MM = 10.0
LIKELY_MIMIC_MIN_SCORE = 0.5

FEATURE_COLUMNS = ("contrast", "elongation", "sphericity", "vesselness", "tube_continues",
                   "one_sided", "dark_volume_mm3", "dist_csf_mm", "dist_surface_mm")
MIMIC_COLUMNS = (*FEATURE_COLUMNS, "mimic_score", "likely_mimic")

_YES_NO = {"yes": "yes", "no": "no"}
MIMIC_SIDECAR = {
    "contrast": {"Description": "How much darker the lesion's darkest voxel is than its "
                                "surroundings (1-4 mm away, in the brain), relative to them"},
    "elongation": {"Description": "sqrt of the largest over the middle inertia eigenvalue of "
                                  "the dark structure the lesion belongs to, which is its "
                                  "own blob where it has one (1: round)"},
    "sphericity": {"Description": "sqrt of the smallest over the largest inertia eigenvalue of "
                                  "that dark structure (1: a sphere)"},
    "vesselness": {"Description": "Median Frangi vesselness (dark tubes, 0.5-2 mm scales) over "
                                  "the lesion's voxels"},
    "tube_continues": {"Description": "The dark structure reaches beyond the lesion on both "
                                      "sides of its long axis, by its own radius across that "
                                      f"axis plus {CONTINUES_MM:g} mm",
                       "Levels": _YES_NO},
    "one_sided": {"Description": "1 - (the lesion's contrast on its flattest sides) / (on its "
                                 "strongest), over 26 directions (10th and 90th percentiles): "
                                 "near 1 for an edge or a tube through it, near 0 when it is "
                                 "dark all round"},
    "dark_volume_mm3": {"Description": "Volume of that dark structure within "
                                       f"{PATCH_RADIUS_MM:g} mm of the lesion", "Units": "mm^3"},
    "dist_csf_mm": {"Description": "Distance to bright CSF (brain voxels "
                                   f"{CSF_EXCESS:.0%} above the median), at most "
                                   f"{PATCH_RADIUS_MM:g}", "Units": "mm"},
    "dist_surface_mm": {"Description": "Distance to the brain mask's edge, at most "
                                       f"{PATCH_RADIUS_MM:g}", "Units": "mm"},
    "mimic_score": {"Description": "How much the lesion looks like a microbleed mimic (vein, "
                                   "edge, dark nucleus), 0-1; the rule is in docs/mimics.md. "
                                   "An aid to the reader, not a diagnosis"},
    "likely_mimic": {"Description": f"mimic_score at least {LIKELY_MIMIC_MIN_SCORE}",
                     "Levels": _YES_NO},
}

# 26 directions for the sectors of a lesion's surroundings.
_DIRECTIONS = np.array([d for d in np.ndindex(3, 3, 3) if d != (1, 1, 1)], dtype=float) - 1
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)


def lesion_features(image: np.ndarray, labels: np.ndarray, brain: np.ndarray,
                    affine: np.ndarray) -> dict[int, dict]:
    """Label -> the FEATURE_COLUMNS of that lesion, measured on `image` (the model's input grid).

    `labels`: lesions 1..N on that grid; `brain`: the brain mask there."""
    spacing = voxel_sizes(affine)
    tissue_median = float(np.median(image[brain])) if brain.any() else float(np.median(image))
    reach = np.ceil(PATCH_RADIUS_MM / spacing).astype(int)
    features = {}
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        patch = tuple(slice(max(s.start - r, 0), min(s.stop + r, n))
                      for s, r, n in zip(box, reach, labels.shape))
        features[label] = _features(image[patch].astype(np.float32), labels[patch] == label,
                                    brain[patch], spacing, tissue_median)
    return features


def _features(image, detection, brain, spacing, tissue_median) -> dict:
    shell_in_brain, surroundings = _surroundings(image, detection, brain, spacing)
    darkest = float(image[detection].min())
    # Against the brain's typical tissue where the surroundings are darker than that, so a spot
    # in a dark nucleus belongs to the whole nucleus.
    reference = max(surroundings, tissue_median)
    dark = _dark_structure(image, detection, brain,
                           darkest + HALF_DEPTH * (reference - darkest)) \
        if reference > darkest else detection
    lesion = _own_blob(dark, detection, spacing)
    if lesion is None:
        lesion = detection
    else:
        # The bleed the detection marks, whole: judged against the tissue around it, not
        # against the veins that touch it, and as its own shape, not with theirs.
        shell_in_brain, surroundings = _surroundings(image, lesion, brain & ~dark, spacing)
        darkest = float(image[lesion].min())
        dark = lesion
    core = float(image[lesion].mean())
    depth = surroundings - darkest

    coordinates = np.argwhere(lesion) * spacing
    centre = coordinates.mean(axis=0)
    dark_points = np.argwhere(dark) * spacing
    eigenvalues, axes = _inertia(dark_points, spacing)
    along = (dark_points - centre) @ axes[:, 0]
    lesion_along = (coordinates - centre) @ axes[:, 0]
    # Beyond the lesion by more than the structure's own radius across its axis (that of a
    # ball with its spread), so a small detection inside a large round bleed is not a tube.
    beyond = min(along.max() - lesion_along.max(), lesion_along.min() - along.min()) \
        - np.sqrt(5 * eigenvalues[1])

    vesselness = _vesselness(image, lesion, spacing)
    csf = _csf(image, brain, tissue_median)
    return {
        "contrast": round(depth / surroundings, 3) if surroundings > 0 else 0.0,
        "elongation": round(float(np.sqrt(eigenvalues[0] / eigenvalues[1])), 2),
        "sphericity": round(float(np.sqrt(eigenvalues[2] / eigenvalues[0])), 2),
        "vesselness": round(vesselness, 3),
        "tube_continues": "yes" if beyond >= CONTINUES_MM else "no",
        "one_sided": round(_one_sided(image, shell_in_brain, core, centre, spacing), 3),
        "dark_volume_mm3": round(float(dark.sum() * np.prod(spacing)), 1),
        "dist_csf_mm": _distance_to(csf, lesion, spacing),
        "dist_surface_mm": _distance_to(~brain, lesion, spacing),
    }


def _vesselness(image, lesion, spacing) -> float:
    """Median Frangi vesselness over the lesion, computed in the smallest box that holds the
    filters' reach around it (the filter is most of this module's cost)."""
    reach = np.ceil(VESSEL_REACH_MM / spacing).astype(int)
    box = tuple(slice(max(s.start - r, 0), s.stop + r)
                for s, r in zip(ndimage.find_objects(lesion.astype(np.int8))[0], reach))
    response = frangi(image[box], sigmas=[s / float(spacing.mean()) for s in VESSEL_SIGMAS_MM],
                      black_ridges=True)
    return float(np.median(response[lesion[box]]))


def _surroundings(image, lesion, brain, spacing):
    """The shell SHELL_MM around the lesion (in the brain, unless none of it is) and its median."""
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    shell = (distance > SHELL_MM[0]) & (distance <= SHELL_MM[1])
    shell_in_brain = shell & brain if (shell & brain).any() else shell
    return shell_in_brain, float(np.median(image[shell_in_brain]))


def _own_blob(dark, detection, spacing):
    """The compact dark blob the detection sits on, without the thinner dark structures that
    touch it (veins), or None if there is none.

    The dark structure is opened with a ball one voxel narrower than the widest it gets within
    a microbleed's radius of the detection: a bleed wider than the vein it touches survives,
    the vein does not, and a vein on its own stays a vein. The result is the blob if it is
    shaped like a microbleed (scores 0 on elongation, flatness and volume) and holds at least
    half of the detection, give or take a voxel."""
    width = ndimage.distance_transform_edt(dark, sampling=spacing)
    near = ndimage.distance_transform_edt(~detection, sampling=spacing) <= MAX_BLEED_MM / 2
    radius = width[near & dark].max() - spacing.max()
    if radius > 0:
        opened = dark & (ndimage.distance_transform_edt(~(width > radius), sampling=spacing)
                         <= radius)
    else:
        opened = dark
    components, _ = ndimage.label(opened, np.ones((3, 3, 3), bool))
    touching = components[ndimage.binary_dilation(detection, np.ones((3, 3, 3), bool))]
    touching = touching[touching > 0]
    if not len(touching):
        return None
    blob = components == np.bincount(touching).argmax()
    grown = ndimage.binary_dilation(blob, np.ones((3, 3, 3), bool))
    eigenvalues, _ = _inertia(np.argwhere(blob) * spacing, spacing)
    compact = (np.sqrt(eigenvalues[0] / eigenvalues[1]) <= ELONGATION_RAMP[0]
               and np.sqrt(eigenvalues[2] / eigenvalues[0]) >= SPHERICITY_RAMP[0]
               and blob.sum() * np.prod(spacing) <= LARGE_DARK_RAMP_MM3[0])
    return blob if compact and 2 * grown[detection].sum() >= detection.sum() else None


def _dark_structure(image, lesion, brain, level):
    """The brain voxels darker than `level` connected to the lesion (the lesion included).

    Only the brain's: beyond the mask lie zeros (a masked model input) or dark skull, which
    would join a bleed under the cortex to a region larger than any nucleus."""
    components, _ = ndimage.label(((image < level) & brain) | lesion, np.ones((3, 3, 3), bool))
    return np.isin(components, np.unique(components[lesion]))


def _inertia(points_mm, spacing):
    """Eigenvalues (descending) and axes of the points' spread; each voxel counts as a uniform
    box, so a single voxel is round rather than a point."""
    spread = np.cov(points_mm.T) if len(points_mm) > 1 else np.zeros((3, 3))
    spread = spread + np.diag(spacing ** 2 / 12)
    eigenvalues, axes = np.linalg.eigh(spread)
    return eigenvalues[::-1], axes[:, ::-1]


def _one_sided(image, shell, core, centre_mm, spacing) -> float:
    """1 when some side of the surroundings is no brighter than the lesion (an edge or a tube
    through it), 0 when the lesion is darker than its surroundings all round."""
    offsets = np.argwhere(shell) * spacing - centre_mm
    sector = np.argmax(offsets @ _DIRECTIONS.T, axis=1)
    values = image[shell]
    contrasts = np.array([np.median(values[sector == k]) - core
                          for k in range(len(_DIRECTIONS)) if np.count_nonzero(sector == k) >= 2])
    if not len(contrasts) or np.percentile(contrasts, 90) <= 0:
        return 1.0
    return float(np.clip(1 - np.percentile(contrasts, 10) / np.percentile(contrasts, 90), 0, 1))


def _csf(image, brain, tissue_median):
    bright = brain & (image > tissue_median * (1 + CSF_EXCESS))
    components, count = ndimage.label(bright)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return sizes[components] >= CSF_MIN_VOXELS


def _distance_to(target, lesion, spacing) -> float:
    """The distance from the lesion's voxels to the nearest `target` voxel, in mm, at most
    PATCH_RADIUS_MM (the patch's edge)."""
    if not target.any():
        return PATCH_RADIUS_MM
    distance = ndimage.distance_transform_edt(~target, sampling=spacing)
    return round(float(min(distance[lesion].min(), PATCH_RADIUS_MM)), 1)


def _ramp(value: float, ramp: tuple[float, float]) -> float:
    low, high = ramp
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def mimic_score(features: dict) -> float:
    """The score of the lesion's most mimic-like trait, each trait scaled to [0, 1]: a dark
    tube that goes on beyond it on both sides (1), elongation, flatness, darkness on one side
    only, too little contrast against its surroundings, and belonging to a dark region larger
    than any microbleed."""
    return round(max(
        1.0 if features["tube_continues"] == "yes" else 0.0,
        _ramp(features["elongation"], ELONGATION_RAMP),
        _ramp(features["sphericity"], SPHERICITY_RAMP),
        _ramp(features["one_sided"], ONE_SIDED_RAMP),
        _ramp(features["contrast"], CONTRAST_RAMP),
        _ramp(features["dark_volume_mm3"], LARGE_DARK_RAMP_MM3),
    ), 3)


def score_lesions(rows: list[dict], image, labels, brain, affine) -> list[dict]:
    """The lesion rows with the mimic features, mimic_score and likely_mimic added."""
    features = lesion_features(image, labels, brain, affine)
    scored = []
    for row in rows:
        measured = features[row["label"]]
        score = mimic_score(measured)
        scored.append({**row, **measured, "mimic_score": score,
                       "likely_mimic": "yes" if score >= LIKELY_MIMIC_MIN_SCORE else "no"})
    return scored
