"""Acquisition grids and head poses: where a phantom's voxels sit in scanner space.

Three frames are involved: template mm (MNI, where the anatomy is defined), world mm (scanner
RAS, defined by the image affine) and native voxel indices. The pose maps template -> world;
the native affine maps index -> world.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.affines import apply_affine
from scipy.spatial.transform import Rotation

# Voxel axis direction per orientation letter: (world axis, sign).
AXIS_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0),
              "I": (2, -1.0)}
FOV_CUTS = (None, "top", "bottom")
MAX_VOXELS = 25_000_000

MAX_ROTATION_DEG = 15.0
MAX_TRANSLATION_MM = 15.0
SCALE_RANGE = (0.9, 1.1)
OBLIQUE_ANGLE_DEG = (8.0, 25.0)
FOV_MARGIN_MM = (2.0, 8.0)
# How much of the brain a cut field of view loses (mm along the slab axis).
TOP_CUT_MM = (10.0, 30.0)
BOTTOM_CUT_MM = (25.0, 45.0)
# Lowest template level (mm) an uncut field of view reaches into the neck.
FOV_FLOOR_MM = -90.0


@dataclass(frozen=True)
class Grid:
    """An acquisition grid: voxel size per stored axis, axis order/flips, obliquity, FOV cut."""

    voxel_size: tuple[float, float, float]
    axcodes: str = "RAS"
    oblique: bool = False
    fov_cut: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "voxel_size", tuple(float(v) for v in self.voxel_size))
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size must be 3 positive numbers, got {self.voxel_size}")
        world_axes = sorted(AXIS_CODES.get(code, (None,))[0] for code in self.axcodes)
        if len(self.axcodes) != 3 or world_axes != [0, 1, 2]:
            raise ValueError(f"axcodes must name each of R/L, A/P, S/I once, got {self.axcodes!r}")
        if self.fov_cut not in FOV_CUTS:
            raise ValueError(f"fov_cut must be one of {FOV_CUTS}, got {self.fov_cut!r}")

    @property
    def label(self) -> str:
        sizes = "x".join(repr(round(v, 3)) for v in self.voxel_size)
        return sizes + (" oblique" if self.oblique else "")


# Subject i of a dataset uses GRIDS[i % len(GRIDS)]; labels are unique so they can name a grid.
GRIDS = (
    Grid((1.0, 1.0, 1.0), "RAS"),
    Grid((0.5, 0.5, 2.0), "LPS"),
    Grid((0.9, 0.9, 1.5), "LAS", oblique=True),
    Grid((1.0, 1.0, 1.2), "PIR"),
    Grid((0.8, 0.8, 0.8), "LPI", fov_cut="top"),
    Grid((1.0, 1.0, 3.0), "RPI", oblique=True, fov_cut="bottom"),
    Grid((0.7, 0.7, 1.4), "SLA"),
)


def resolve_grid(grid) -> Grid:
    """A Grid from a Grid, a predefined grid's label or its index in GRIDS."""
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, (int, np.integer)):
        return GRIDS[grid]
    by_label = {g.label: g for g in GRIDS}
    if grid not in by_label:
        raise ValueError(f"unknown grid {grid!r}; predefined grids: {sorted(by_label)}")
    return by_label[grid]


@dataclass(frozen=True)
class NativeGrid:
    """A grid placed in scanner space for one subject."""

    spec: Grid
    shape: tuple[int, int, int]
    affine: np.ndarray  # index -> world mm

    @property
    def voxel_size(self) -> np.ndarray:
        return np.asarray(self.spec.voxel_size)

    def world_to_index(self, points_world):
        points_world = np.asarray(points_world, dtype=float)
        # Not apply_affine(inv(affine)): it rounds differently (last bits of most coordinates),
        # which could change the phantoms generated from a seed.
        return (points_world - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T


def random_pose(rng, brain_centre) -> np.ndarray:
    """Template mm -> world mm: scale and rotate about the brain centre, then translate."""
    rotation = Rotation.from_euler(
        "xyz", rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3), degrees=True).as_matrix()
    scale = rng.uniform(*SCALE_RANGE)
    translation = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    pose = np.eye(4)
    pose[:3, :3] = scale * rotation
    pose[:3, 3] = translation - pose[:3, :3] @ brain_centre
    return pose


def _axis_directions(rng, spec: Grid) -> np.ndarray:
    """Unit world direction of each voxel axis (columns), tilted when the grid is oblique."""
    directions = np.zeros((3, 3))
    for column, code in enumerate(spec.axcodes):
        world_axis, sign = AXIS_CODES[code]
        directions[world_axis, column] = sign
    if spec.oblique:
        axis = rng.normal(size=3)
        angle = np.deg2rad(rng.uniform(*OBLIQUE_ANGLE_DEG)) * rng.choice([-1.0, 1.0])
        tilt = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
        directions = tilt @ directions
    return directions


def place_grid(rng, spec: Grid, pose, atlas) -> NativeGrid:
    """Fit the grid's field of view around the posed head, cutting it if the grid asks to."""
    directions = _axis_directions(rng, spec)
    voxel_size = np.asarray(spec.voxel_size)
    head = atlas.head_points[atlas.head_points[:, 2] >= FOV_FLOOR_MM]
    # Coordinates along each voxel axis (mm); directions is orthonormal.
    along = apply_affine(pose, head) @ directions
    low = along.min(0) - rng.uniform(*FOV_MARGIN_MM, 3)
    high = along.max(0) + rng.uniform(*FOV_MARGIN_MM, 3)

    if spec.fov_cut is not None:
        # Cut along the voxel axis closest to the scanner's S-I axis, as a slab boundary would.
        slab_axis = int(np.argmax(np.abs(directions[2])))
        superior = np.sign(directions[2, slab_axis])
        height = superior * (apply_affine(pose, atlas.brain_points) @ directions[:, slab_axis])
        if spec.fov_cut == "top":
            limit = height.max() - rng.uniform(*TOP_CUT_MM)
            keep_below = True
        else:
            limit = height.min() + rng.uniform(*BOTTOM_CUT_MM)
            keep_below = False
        if (superior > 0) == keep_below:
            high[slab_axis] = superior * limit
        else:
            low[slab_axis] = superior * limit

    shape = tuple(int(n) for n in np.ceil((high - low) / voxel_size))
    if np.prod(shape, dtype=np.int64) > MAX_VOXELS:
        raise ValueError(f"grid {spec.label} needs {shape} voxels (over {MAX_VOXELS}); "
                         "use larger voxels")
    affine = np.eye(4)
    affine[:3, :3] = directions * voxel_size
    affine[:3, 3] = directions @ (low + voxel_size / 2)
    return NativeGrid(spec=spec, shape=shape, affine=affine)
