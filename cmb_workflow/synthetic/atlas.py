"""The phantom's anatomy in template space: MNI152 2009 tissue maps plus a head built around them.

Everything here is computed once per process (a few seconds) and shared by all phantoms. Arrays
live on a 1 mm grid aligned with MNI axes, extended below the template so a neck fits; template
mm -> array index is a plain translation (`Atlas.origin`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# The template stops at the medulla; extending it downwards leaves room for the neck.
PAD_BELOW_MM = 40
# Radial layers (mm): the CSF rim and inner table lie outside the brain envelope, the diploe,
# outer table and scalp outside the head envelope. Each value is the outer edge of that layer.
INNER_LAYER_EDGES_MM = {"csf": 2.5, "inner_table": 4.0}
OUTER_LAYER_EDGES_MM = {"diploe": 7.0, "outer_table": 8.5, "scalp": 14.5}
BRAIN_CLOSING_MM, HEAD_CLOSING_MM = 16.0, 44.0
LAYER_EDGE_WIDTH_MM = 1.5

# Deep nuclei as axis-aligned ellipsoids (centre, semi-axes in MNI mm; mirrored left/right),
# with the relative strength of their iron darkening on T2*/SWI.
DEEP_NUCLEI = {
    "globus_pallidus": ((19.0, -4.0, -1.0), (4.0, 9.0, 5.0), 1.0),
    "putamen": ((26.0, 2.0, 2.0), (5.5, 14.0, 9.0), 0.35),
    "caudate": ((13.0, 12.0, 11.0), (4.5, 9.0, 8.0), 0.25),
    "thalamus": ((11.0, -18.0, 6.0), (7.0, 11.0, 7.5), 0.15),
    "red_nucleus": ((5.0, -20.0, -9.0), (3.0, 3.5, 3.5), 0.9),
    "substantia_nigra": ((10.0, -18.0, -13.0), (3.0, 6.0, 3.0), 0.8),
    "dentate": ((15.0, -57.0, -35.0), (7.0, 8.0, 6.0), 0.7),
}
BASAL_GANGLIA_THALAMUS = ("globus_pallidus", "putamen", "caudate", "thalamus")

LOCATIONS = ("lobar", "deep", "infratentorial")
PERIVENTRICULAR_MM = 12.0


@dataclass(frozen=True)
class LesionSites:
    """Template-mm voxel centres where a lesion of one location class may be centred."""

    points: np.ndarray  # (N, 3) float32, template mm
    brain_depth: np.ndarray  # (N,) mm to the outside of the brain mask
    tissue_depth: np.ndarray  # (N,) mm to the nearest CSF / non-brain voxel


@dataclass(frozen=True)
class Atlas:
    origin: np.ndarray  # template mm of array index (0, 0, 0)
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # brain mask fraction (the ground-truth brain)
    envelope_distance: np.ndarray  # signed mm from the closed brain envelope, + outside
    head_distance: np.ndarray  # signed mm from the more closed head envelope, + outside
    neck: np.ndarray  # soft-tissue fraction below the skull
    iron: np.ndarray  # relative iron load, 0..1
    brain_centre: np.ndarray
    head_points: np.ndarray  # sparse points filling the head (for fields of view)
    brain_points: np.ndarray  # sparse points filling the brain
    surface_points: np.ndarray  # just under the brain envelope (pial vein seeds)
    deep_wm_points: np.ndarray  # centrum semiovale (medullary vein seeds)
    ventricle_centres: np.ndarray  # (2, 3) right then left lateral ventricle
    sites: dict  # location -> LesionSites

    def sample(self, volume, points_mm):
        """Trilinear values of a template volume at template-mm points (N, 3)."""
        return ndi.map_coordinates(volume, (np.asarray(points_mm) - self.origin).T, order=1,
                                   prefilter=False)


def _load_templates():
    from ..registration import mni152

    images = [mni152(kind) for kind in ("gm", "wm", "brain_mask")]
    return [np.asarray(img.dataobj) for img in images], images[0].affine[:3, 3]


def _soft_ellipsoid(origin, centre, semi_axes, edge_mm=1.5):
    """(array slices, fraction inside) of an axis-aligned ellipsoid with a linear edge ramp.

    Only the ellipsoid's bounding box is evaluated; `origin` is the template mm of index 0.
    """
    centre, semi_axes = np.asarray(centre), np.asarray(semi_axes)
    low = np.floor(centre - semi_axes - edge_mm - origin).astype(int)
    high = np.ceil(centre + semi_axes + edge_mm - origin).astype(int) + 1
    axes = [(np.arange(a, b, dtype=np.float32) + o - c) / r
            for a, b, o, c, r in zip(low, high, origin, centre, semi_axes)]
    radial = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2
                     + axes[2][None, None, :] ** 2)
    fraction = np.clip(0.5 - (radial - 1.0) * semi_axes.mean() / edge_mm, 0.0, 1.0)
    return tuple(slice(a, b) for a, b in zip(low, high)), fraction


def _nuclei_maps(shape, origin, names, weighted):
    """Max over both hemispheres' ellipsoids of `names`, each scaled by its iron weight if asked."""
    volume = np.zeros(shape, np.float32)
    for name in names:
        centre, semi_axes, iron_weight = DEEP_NUCLEI[name]
        for side in (1.0, -1.0):
            box, fraction = _soft_ellipsoid(origin, (side * centre[0], *centre[1:]), semi_axes)
            np.maximum(volume[box], fraction * (iron_weight if weighted else 1.0), out=volume[box])
    return volume


def _envelope_distance(brain, shape, closing_mm, step):
    """Signed distance (mm, + outside) to the brain closed by `closing_mm`, on a `step` mm grid.

    A small closing bridges sulci and the interhemispheric fissure so the inner skull follows
    the brain's outer shape; a large one also fills the notches between temporal lobes,
    brainstem and cerebellum, giving the smooth outer surface of the head.
    """
    pad = int(np.ceil(closing_mm / step)) + 2  # room for the dilation half of the closing
    coarse = np.pad(brain[::step, ::step, ::step] > 0.5, pad)
    closing_voxels = closing_mm / step
    dilated = ndi.distance_transform_edt(~coarse) <= closing_voxels
    closed = ndi.binary_fill_holes(ndi.distance_transform_edt(dilated) > closing_voxels)
    signed = step * (ndi.distance_transform_edt(~closed) - ndi.distance_transform_edt(closed))
    signed = ndi.gaussian_filter(signed.astype(np.float32), 2.0 / step)
    # Fine voxel i sits on coarse voxel i / step + pad.
    return ndi.affine_transform(signed, np.diag(np.full(3, 1.0 / step)), offset=np.full(3, pad),
                                output_shape=shape, order=1, mode="nearest", prefilter=False)


def _sparse_points(mask, origin, step):
    return (np.argwhere(mask[::step, ::step, ::step]) * step + origin).astype(np.float32)


def _lesion_sites(gm, wm, brain, origin):
    """Candidate lesion centres per location class, with the depths needed to fit a radius."""
    inside = brain > 0.5
    lo = np.argwhere(inside).min(0) - 2
    hi = np.argwhere(inside).max(0) + 3
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    gm, wm, inside = gm[box], wm[box], inside[box]
    box_origin = origin + lo
    x, y, z = _template_mm_axes(gm.shape, box_origin)

    tissue = inside & (gm + wm >= 0.5)
    brain_depth = ndi.distance_transform_edt(inside).astype(np.float32)
    tissue_depth = ndi.distance_transform_edt(tissue).astype(np.float32)
    cortex = tissue & (gm >= 0.5)
    # The template's grey matter map is blurred, so 2 mm beyond it is already well into the WM.
    juxtacortical = tissue & ndi.binary_dilation(cortex, iterations=2)

    cerebellum = (x / 46.0) ** 2 + ((y + 63.0) / 27.0) ** 2 + ((z + 40.0) / 20.0) ** 2 <= 1.0
    # Brainstem: a tube from the midbrain down to the medulla.
    top, bottom = np.array([0.0, -24.0, -8.0]), np.array([0.0, -42.0, -72.0])
    axis = (bottom - top) / np.linalg.norm(bottom - top)
    along = np.clip((x - top[0]) * axis[0] + (y - top[1]) * axis[1] + (z - top[2]) * axis[2],
                    0.0, np.linalg.norm(bottom - top))
    brainstem = ((x - top[0] - along * axis[0]) ** 2 + (y - top[1] - along * axis[1]) ** 2
                 + (z - top[2] - along * axis[2]) ** 2) <= 9.0**2
    infratentorial = tissue & (cerebellum | brainstem)

    basal_ganglia = _nuclei_maps(brain.shape, origin, BASAL_GANGLIA_THALAMUS, False)[box] > 0.5
    posterior_fossa = ndi.binary_dilation(cerebellum | brainstem, iterations=8) | (z < -45)
    # Deep white matter as in MARS: periventricular and central (capsules, corpus callosum);
    # subcortical white matter between it and the juxtacortical band is left unclassified.
    ventricles = inside & (gm + wm < 0.3) & (np.abs(x) < 30) & (y > -45) & (y < 30) & (z > -10)
    near_ventricles = ndi.distance_transform_edt(~ventricles) <= PERIVENTRICULAR_MM
    deep_wm = tissue & (wm >= 0.6) & near_ventricles & ~juxtacortical & ~posterior_fossa
    deep = tissue & (basal_ganglia | deep_wm)
    # Keep lobar sites clear of the other classes so a label never straddles two of them.
    near_nuclei = ndi.binary_dilation(basal_ganglia, iterations=3)
    lobar = juxtacortical & ~posterior_fossa & ~near_nuclei & ~deep

    sites = {}
    for location, region in zip(LOCATIONS, (lobar, deep, infratentorial)):
        index = np.nonzero(region)
        sites[location] = LesionSites(
            points=(np.stack(index, axis=1) + box_origin).astype(np.float32),
            brain_depth=brain_depth[index], tissue_depth=tissue_depth[index])
    return sites


def _template_mm_axes(shape, origin):
    """x, y, z template-mm coordinates as broadcastable 1D arrays."""
    return [(np.arange(n, dtype=np.float32) + o).reshape([-1 if k == axis else 1 for k in range(3)])
            for axis, (n, o) in enumerate(zip(shape, origin))]


def _neck(shape, origin, head_distance):
    """Soft-tissue fraction of an elliptic neck below the skull base."""
    x, y, z = _template_mm_axes(shape, origin)
    radial = np.sqrt((x / 52.0) ** 2 + ((y + 25.0) / 58.0) ** 2)
    section = np.clip(0.5 - (radial - 1.0) * 55.0 / 6.0, 0.0, 1.0)
    below_skull_base = np.clip((-35.0 - z) / 10.0, 0.0, 1.0)
    outside_skull = np.clip((head_distance - OUTER_LAYER_EDGES_MM["outer_table"]) / 2.0, 0.0, 1.0)
    return (section * below_skull_base * outside_skull).astype(np.float32)


def _ventricle_centres(inside, gm, wm, origin):
    """Centroids of the right and left lateral ventricle bodies (medullary veins drain there)."""
    csf = _sparse_points(inside & (gm + wm < 0.3), origin, 1)
    body = (csf[:, 1] > -40) & (csf[:, 1] < 25) & (csf[:, 2] > 0) & (csf[:, 2] < 35)
    return np.array([csf[body & (side * csf[:, 0] > 3) & (side * csf[:, 0] < 30)].mean(0)
                     for side in (1, -1)])


def _deep_wm_points(inside, wm, origin):
    """Centrum semiovale points, where medullary veins start."""
    points = _sparse_points(inside & (wm >= 0.9), origin, 2)
    x, y, z = np.abs(points[:, 0]), points[:, 1], points[:, 2]
    return points[(x > 12) & (x < 42) & (y > -55) & (y < 35) & (z > 12) & (z < 48)]


@functools.lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    (gm, wm, brain), template_origin = _load_templates()
    below = ((0, 0), (0, 0), (PAD_BELOW_MM, 0))
    # Replicating the lowest slices continues the medulla into a spinal cord.
    gm, wm = np.pad(gm, below, mode="edge"), np.pad(wm, below, mode="edge")
    envelope_source = np.pad(brain, below, mode="edge")
    brain = np.pad(brain, below)
    origin = template_origin - np.array([0.0, 0.0, PAD_BELOW_MM])
    shape = brain.shape

    # Probabilistic maps may overlap slightly; CSF takes what is left of the mask.
    tissue_sum = np.maximum(gm + wm, 1.0)
    gm, wm = gm / tissue_sum, wm / tissue_sum
    inside = brain > 0.5

    envelope_distance = _envelope_distance(envelope_source, shape, BRAIN_CLOSING_MM, step=2)
    head_distance = _envelope_distance(envelope_source, shape, HEAD_CLOSING_MM, step=4)
    neck = _neck(shape, origin, head_distance)
    head = (head_distance < OUTER_LAYER_EDGES_MM["scalp"]) | (neck > 0.5)
    z = _template_mm_axes(shape, origin)[2]
    surface = (envelope_distance > -3.0) & (envelope_distance < -1.0) & (z > -30)

    return Atlas(
        origin=origin, gm=gm, wm=wm, brain=brain, envelope_distance=envelope_distance,
        head_distance=head_distance, neck=neck, iron=_nuclei_maps(shape, origin, DEEP_NUCLEI, True),
        brain_centre=np.argwhere(inside).mean(0) + origin,
        head_points=_sparse_points(head, origin, 4),
        brain_points=_sparse_points(inside, origin, 3),
        surface_points=_sparse_points(surface, origin, 2),
        deep_wm_points=_deep_wm_points(inside, wm, origin),
        ventricle_centres=_ventricle_centres(inside, gm, wm, origin),
        sites=_lesion_sites(gm, wm, brain, origin),
    )
