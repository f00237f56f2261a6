"""Microbleeds and veins: placed in template space, drawn analytically on the native grid.

Both are drawn as soft dark spheres around points (one point per microbleed, densely spaced
points along each vein), evaluated only in a small box of native voxels around each point, with
extra samples inside thick voxels so partial volume dims thin structures as a scanner would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.affines import apply_affine
from scipy.interpolate import make_interp_spline
from scipy.special import expit

from .atlas import LOCATIONS

LOCATION_PROBABILITIES = (0.5, 0.3, 0.2)  # lobar, deep, infratentorial
DIAMETER_RANGE_MM = (2.0, 10.0)
# Free space kept between two microbleeds' edges, so their soft rims never merge.
LESION_GAP_MM = 2.0
CANDIDATES_PER_TRY = 64
# Profiles are evaluated out to radius + PROFILE_REACH edge widths (4.7 % of the core darkening).
PROFILE_REACH = 3.0
# Profile evaluations per chunk when drawing: bounds the temporary arrays (~100 MB).
CHUNK_EVALUATIONS = 2_000_000

# Named deep veins as control points in template mm (right side; mirrored for the left).
DEEP_VEINS = {
    "internal_cerebral": ((12.0, 6.0, 17.0), (4.0, -2.0, 17.0), (2.5, -20.0, 15.0),
                          (2.0, -35.0, 10.0), (0.5, -45.0, 5.0)),
    "basal_rosenthal": ((20.0, 2.0, -14.0), (18.0, -15.0, -10.0), (12.0, -30.0, -4.0),
                        (5.0, -42.0, 3.0), (0.5, -46.0, 5.0)),
}


@dataclass(frozen=True)
class Lesion:
    label: int
    centre: np.ndarray  # world mm
    diameter_mm: float
    location: str

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2

    def as_dict(self) -> dict:
        x, y, z = (round(float(v), 3) for v in self.centre)
        return {"label": self.label, "x": x, "y": y, "z": z,
                "diameter_mm": round(float(self.diameter_mm), 3), "location": self.location}


@dataclass(frozen=True)
class Vein:
    points: np.ndarray  # (K, 3) template mm along the centre line
    radius_mm: float


def lesion_edge_mm(radius_mm):
    """Width of the soft (blooming) rim: larger bleeds bloom more."""
    return 0.2 + 0.12 * radius_mm


def vein_edge_mm(radius_mm):
    return 0.1 + 0.25 * radius_mm


def place_lesions(rng, n_cmb, atlas, pose, native) -> list[Lesion]:
    """Up to n_cmb non-overlapping microbleeds lying wholly in brain tissue and in the FOV.

    A location class that has no room left (e.g. infratentorial when the FOV cuts the bottom)
    hands its lesion to the other classes; a lesion that fits nowhere is dropped.
    """
    scale = np.cbrt(np.linalg.det(pose[:3, :3]))
    lesions: list[Lesion] = []
    diameters = np.exp(rng.uniform(*np.log(DIAMETER_RANGE_MM), n_cmb))
    locations = rng.choice(len(LOCATIONS), size=n_cmb, p=LOCATION_PROBABILITIES)
    for diameter, first_choice in zip(diameters, locations):
        radius = diameter / 2
        for location in np.roll(LOCATIONS, -first_choice):
            centre = _find_site(rng, atlas.sites[location], radius, scale, pose, native, lesions)
            if centre is not None:
                lesions.append(Lesion(len(lesions) + 1, centre, float(diameter), str(location)))
                break
    return lesions


def _find_site(rng, sites, radius, scale, pose, native, placed, tries=8):
    radius_template = radius / scale
    # The jitter below moves a centre by up to 0.87 mm, hence the extra margins.
    fits = np.flatnonzero((sites.brain_depth >= radius_template + 2.0)
                          & (sites.tissue_depth >= 0.5 * radius_template + 1.0))
    if fits.size == 0:
        return None
    reach = radius / native.voxel_size
    others = np.array([lesion.centre for lesion in placed]).reshape(-1, 3)
    other_radii = np.array([lesion.radius_mm for lesion in placed])
    for _ in range(tries):
        picks = fits[rng.integers(0, fits.size, CANDIDATES_PER_TRY)]
        template = sites.points[picks] + rng.uniform(-0.5, 0.5, (CANDIDATES_PER_TRY, 3))
        world = apply_affine(pose, template)
        index = native.world_to_index(world)
        in_fov = np.all((index - reach >= 0) & (index + reach <= np.array(native.shape) - 1), 1)
        gaps = np.linalg.norm(world[:, None] - others[None], axis=-1) - other_radii - radius
        apart = np.all(gaps >= LESION_GAP_MM, axis=1)
        good = np.flatnonzero(in_fov & apart)
        if good.size:
            return world[good[0]]
    return None


def _smooth_curve(control_points, spacing_mm=1.0):
    control_points = np.asarray(control_points, dtype=float)
    knots = _arc_length(control_points)
    spline = make_interp_spline(knots, control_points, k=min(3, len(control_points) - 1))
    return spline(np.arange(0.0, knots[-1], spacing_mm))


def _arc_length(points):
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])


def _pial_veins(rng, atlas, count):
    """Veins wandering over the brain surface, kept at a fixed depth under its envelope."""
    starts = atlas.surface_points[rng.integers(0, len(atlas.surface_points), count)]
    lengths = rng.uniform(30.0, 110.0, count)
    depth = rng.uniform(-2.5, -1.0, count)
    direction = rng.normal(size=(count, 3))
    position = starts.astype(float)
    steps = int(lengths.max())
    path = np.empty((steps + 1, count, 3))
    path[0] = position
    probes = np.concatenate([np.zeros((1, 3)), np.eye(3), -np.eye(3)])
    for step in range(steps):
        probed = (position[None] + probes[:, None]).reshape(-1, 3)
        values = atlas.sample(atlas.envelope_distance, probed).reshape(len(probes), count)
        normal = (values[1:4] - values[4:7]).T
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-6)
        direction = direction + rng.normal(scale=0.15, size=direction.shape)
        direction -= np.sum(direction * normal, axis=1, keepdims=True) * normal
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-6)
        position = position + direction - 0.5 * (values[0] - depth)[:, None] * normal
        path[step + 1] = position
    radii = rng.uniform(0.5, 1.3, count)
    return [Vein(path[: int(length) + 1, v], float(radius))
            for v, (length, radius) in enumerate(zip(lengths, radii))]


def _medullary_veins(rng, atlas, count):
    """Thin straight-ish veins running through deep white matter towards the lateral ventricles."""
    starts = atlas.deep_wm_points[rng.integers(0, len(atlas.deep_wm_points), count)]
    veins = []
    for start, radius in zip(starts, rng.uniform(0.4, 0.8, count)):
        ventricle = atlas.ventricle_centres[0 if start[0] >= 0 else 1]
        end = start + rng.uniform(0.5, 0.8) * (ventricle - start)
        bend = (start + end) / 2 + rng.normal(scale=3.0, size=3)
        veins.append(Vein(_smooth_curve([start, bend, end]), float(radius)))
    return veins


def _deep_veins(rng):
    veins = []
    for control_points in DEEP_VEINS.values():
        for side in (1.0, -1.0):
            points = np.array(control_points) * [side, 1.0, 1.0]
            points += rng.normal(scale=1.0, size=points.shape)
            veins.append(Vein(_smooth_curve(points), float(rng.uniform(0.7, 1.3))))
    return veins


def make_veins(rng, atlas) -> list[Vein]:
    return (_pial_veins(rng, atlas, int(rng.integers(25, 45)))
            + _medullary_veins(rng, atlas, int(rng.integers(30, 60)))
            + _deep_veins(rng))


def subsamples_per_axis(voxel_size, sample_mm):
    """Samples per voxel along each axis so thick axes are sampled every `sample_mm` or finer."""
    voxel_size = np.asarray(voxel_size)
    return np.where(voxel_size > 1.0, np.ceil(voxel_size / sample_mm), 1).astype(int)


def subvoxel_offsets(subsamples):
    """(S, 3) sample positions inside a voxel, in voxel units from its centre."""
    return _index_grid([(np.arange(n) + 0.5) / n - 0.5 for n in subsamples])


def _index_grid(axes):
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _near_voxels(points_index, reach_mm, native, subsamples):
    """In-FOV voxels within `reach_mm` (box) of each point, with the distances (mm) from the
    point to their sub-samples (M, S) and to their centres (M,)."""
    voxel_size = native.voxel_size
    half = np.ceil(reach_mm / voxel_size).astype(int)
    box = _index_grid([np.arange(-h, h + 1) for h in half])
    sub = subvoxel_offsets(subsamples)
    voxels = np.rint(points_index).astype(int)[:, None, :] + box[None]
    offsets = voxels - points_index[:, None, :]
    inside = np.all((voxels >= 0) & (voxels < np.array(native.shape)), axis=-1)
    voxels, offsets_mm = voxels[inside], (offsets[inside] * voxel_size).astype(np.float32)
    sub_mm = (sub * voxel_size).astype(np.float32)
    # |offset + sub|^2 expanded, so the (M, S) distances come from one matrix product.
    centre_squared = np.sum(offsets_mm**2, axis=1)
    squared = centre_squared[:, None] + 2 * offsets_mm @ sub_mm.T + np.sum(sub_mm**2, axis=1)
    return voxels, np.sqrt(np.maximum(squared, 0.0)), np.sqrt(centre_squared)


def _darken(darkness, voxels, values):
    """darkness = max(darkness, values) at voxels; max so overlapping samples don't add up."""
    np.maximum.at(darkness.reshape(-1), np.ravel_multi_index(voxels.T, darkness.shape), values)


def draw_veins(darkness, veins, pose, native, depths, subsamples):
    """Darken the native grid along each vein (world radius, `depths` = darkening at the core)."""
    for vein, depth in zip(veins, depths):
        radius, edge = vein.radius_mm, vein_edge_mm(vein.radius_mm)
        # Samples every half radius: the nearest one is then within a quarter radius of the
        # true distance to the centre line, invisible in the profile.
        world = apply_affine(pose, vein.points)
        arc = _arc_length(world)
        dense = np.arange(0.0, arc[-1], radius / 2)
        points_index = native.world_to_index(
            np.stack([np.interp(dense, arc, world[:, k]) for k in range(3)], axis=1))
        reach = radius + PROFILE_REACH * edge
        per_point = np.prod(2 * np.ceil(reach / native.voxel_size) + 1) * np.prod(subsamples)
        chunk = max(1, int(CHUNK_EVALUATIONS // per_point))
        for start in range(0, len(points_index), chunk):
            voxels, distances, _ = _near_voxels(points_index[start:start + chunk], reach, native,
                                                subsamples)
            _darken(darkness, voxels, depth * expit((radius - distances) / edge).mean(axis=1))


def draw_lesions(darkness, labels, lesions, native, depths, subsamples, edge_scale=1.0):
    """Darken each microbleed and write its label: voxels whose centre lies within the radius,
    plus always the voxel holding the centre, so even a 2 mm bleed on 3 mm slices is labelled.
    Parts outside the grid are left out."""
    for lesion, depth in zip(lesions, depths):
        radius, edge = lesion.radius_mm, edge_scale * lesion_edge_mm(lesion.radius_mm)
        centre_index = native.world_to_index(lesion.centre[None])
        reach = radius + PROFILE_REACH * edge
        voxels, distances, centre_distances = _near_voxels(centre_index, reach, native, subsamples)
        _darken(darkness, voxels, depth * expit((radius - distances) / edge).mean(axis=1))
        core = voxels[centre_distances <= radius]
        labels[tuple(core.T)] = lesion.label
        centre_voxel = np.rint(centre_index[0]).astype(int)
        if np.all((centre_voxel >= 0) & (centre_voxel < labels.shape)):  # a grid may cut a bleed
            labels[tuple(centre_voxel)] = lesion.label

