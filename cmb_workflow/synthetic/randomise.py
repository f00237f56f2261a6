"""Domain randomisation of the demo model's training patches (docs/demo-model.md).

In the spirit of SynthSeg (Billot et al., Medical Image Analysis 2023): the network is never
shown one fixed look of the data. Each training phantom's anatomy is kept as maps on the model's
crop grid, and every patch is drawn from them with a new random appearance: tissue intensities
of either contrast sign (CSF brighter or darker than tissue, grey matter brighter or darker than
white), iron, vein and microbleed depths, microbleed profiles (hard-edged to blooming), a bias
field, a simulated acquisition (in-plane blur, thick slices resampled back to 1 mm as the
pipeline does), Rician noise of random level and texture, and a random gamma; then it is
normalised as the pipeline normalises a scan. Short dark tubes (vein segments, vein ends,
junctions) are drawn in as hard negatives. Everything follows from the random generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit

from .atlas import INNER_LAYER_EDGES_MM, LAYER_EDGE_WIDTH_MM, load_atlas
from .features import Lesion, draw_lesions, draw_veins, vein_edge_mm
from .grids import Grid, NativeGrid
from .phantoms import _index_to_template, _resample

MAP_NAMES = ("gm", "wm", "csf", "outside", "iron", "veins", "lesions")
# Brain voxels whose intensities stand for the whole brain when a patch is normalised.
BRAIN_SAMPLE_SIZE = 20_000
# Ranges of the random appearance (intensities relative to white matter).
GM_LEVEL = (0.6, 1.5)
CSF_LEVEL = (0.25, 2.5)  # log-uniform: darker or brighter than tissue
OUTSIDE_LEVEL = (0.02, 1.2)  # what a grown brain mask lets in: bone, dura, scalp
IRON_DARKENING = (0.0, 0.8)
VEIN_SCALE = (0.3, 1.5)
LESION_DEPTH = (0.5, 0.95)
LESION_BLUR_MM = (0.0, 0.8)  # blooming halo
LESION_POWER = (0.5, 2.0)  # log-uniform: > 1 sharpens the rim, < 1 widens it
BIAS_SD = (0.3, 0.25)  # linear and quadratic log-bias per 100 mm along each axis
NOISE_FRACTION = (0.01, 0.10)  # Rician sigma over white matter
NOISE_CORRELATION_MM = (0.0, 1.2)
BLUR_MM = (0.0, 0.7)
SLICE_THICKNESS_MM = (1.5, 3.5)
GAMMA_LOG_SD = 0.25
MAX_TUBES = 4
TUBE_RADIUS_MM = (0.4, 1.5)
TUBE_DEPTH = (0.3, 0.9)


@dataclass(frozen=True)
class Appearance:
    gm: float
    csf: float
    outside: float
    iron_darkening: float
    vein_scale: float
    lesion_depth: float
    lesion_blur_mm: float
    lesion_power: float
    bias: np.ndarray  # (3, 2): linear and quadratic log-bias per 100 mm, per axis
    noise_fraction: float
    noise_correlation_mm: float
    blur_mm: np.ndarray  # (3,)
    thick_axis: int | None
    thickness_mm: float
    gamma: float
    tubes: int


def random_appearance(rng) -> Appearance:
    def log_uniform(bounds):
        return float(np.exp(rng.uniform(*np.log(bounds))))

    return Appearance(
        gm=float(rng.uniform(*GM_LEVEL)), csf=log_uniform(CSF_LEVEL),
        outside=float(rng.uniform(*OUTSIDE_LEVEL)),
        iron_darkening=float(rng.uniform(*IRON_DARKENING)),
        vein_scale=float(rng.uniform(*VEIN_SCALE)), lesion_depth=float(rng.uniform(*LESION_DEPTH)),
        lesion_blur_mm=float(rng.uniform(*LESION_BLUR_MM)), lesion_power=log_uniform(LESION_POWER),
        bias=rng.normal(0.0, BIAS_SD, (3, 2)), noise_fraction=float(rng.uniform(*NOISE_FRACTION)),
        noise_correlation_mm=float(rng.uniform(*NOISE_CORRELATION_MM)) if rng.integers(2) else 0.0,
        blur_mm=rng.uniform(*BLUR_MM, 3),
        thick_axis=int(rng.integers(3)) if rng.integers(2) else None,
        thickness_mm=float(rng.uniform(*SLICE_THICKNESS_MM)),
        gamma=float(np.exp(rng.normal(0.0, GAMMA_LOG_SD))), tubes=int(rng.integers(MAX_TUBES + 1)))


def anatomy_maps(phantom, affine, shape) -> dict[str, np.ndarray]:
    """The phantom's anatomy on a 1 mm grid (`affine`: index -> world mm), float16 (MAP_NAMES):
    grey matter, white matter and CSF fractions (together the intracranial fraction), outside
    (the rest), iron load (0..1), veins (darkening as the phantom drew them), lesions (darkening
    of depth 1)."""
    atlas = load_atlas()
    to_template = _index_to_template(phantom.pose, affine, atlas)
    shape = tuple(int(n) for n in shape)

    def resampled(volume):
        return _resample(volume, to_template, shape, (1, 1, 1))

    edge = INNER_LAYER_EDGES_MM["csf"]
    intracranial = np.maximum(np.clip(0.5 - (atlas.envelope_distance - edge)
                                      / LAYER_EDGE_WIDTH_MM, 0.0, 1.0), atlas.brain)
    maps = {"gm": resampled(atlas.gm * intracranial), "wm": resampled(atlas.wm * intracranial),
            "csf": resampled((1.0 - atlas.gm - atlas.wm).clip(0.0, 1.0) * intracranial)}
    maps["outside"] = np.clip(1.0 - maps["gm"] - maps["wm"] - maps["csf"], 0.0, 1.0)
    maps["iron"] = phantom.iron_load(affine, shape)
    grid = NativeGrid(Grid((1.0, 1.0, 1.0)), shape, affine)
    maps["veins"] = np.zeros(shape, np.float32)
    draw_veins(maps["veins"], phantom.veins, phantom.pose, grid, phantom.vein_depths, (1, 1, 1))
    lesions = [Lesion(d["label"], np.array([d["x"], d["y"], d["z"]]), d["diameter_mm"],
                      d["location"]) for d in phantom.lesions]
    maps["lesions"] = np.zeros(shape, np.float32)
    draw_lesions(maps["lesions"], np.zeros(shape, np.int16), lesions, grid,
                 np.ones(len(lesions)), (1, 1, 1))
    return {name: maps[name].astype(np.float16) for name in MAP_NAMES}


def brain_sample(rng, mask) -> np.ndarray:
    """Flat indices of up to BRAIN_SAMPLE_SIZE brain voxels, sorted."""
    brain = np.flatnonzero(mask)
    return np.sort(rng.choice(brain, min(BRAIN_SAMPLE_SIZE, brain.size), replace=False))


def _clean_intensity(maps, look: Appearance):
    """Noise-free intensity before features and bias, float32, from maps (dict of arrays)."""
    image = maps["wm"].astype(np.float32)
    for name in ("gm", "csf", "outside"):
        image += getattr(look, name) * maps[name].astype(np.float32)
    image *= 1.0 - look.iron_darkening * maps["iron"].astype(np.float32)
    return image


def _log_bias(look: Appearance, coordinates_mm):
    """Log-bias at voxel coordinates (one array per axis, mm from the crop's centre)."""
    return sum(look.bias[axis, 0] * (u / 100.0) + look.bias[axis, 1] * (u / 100.0) ** 2
               for axis, u in enumerate(coordinates_mm))


def _rician(image, sigma, rng, correlation_mm):
    def channel():
        noise = rng.standard_normal(image.shape, dtype=np.float32)
        if correlation_mm:
            ndimage.gaussian_filter(noise, correlation_mm, output=noise)
            noise /= max(float(noise.std()), 1e-12)
        return sigma * noise

    return np.sqrt((image + channel()) ** 2 + channel() ** 2)


def dark_tubes(rng, look: Appearance, shape, allowed, avoid):
    """Darkening of look.tubes short dark tubes (vein segments and ends; half of them with a
    branch from their end: a junction) centred on `allowed` voxels, dropped where they would
    reach a voxel of `avoid` (near a microbleed)."""
    darkness = np.zeros(shape, np.float32)
    candidates = np.argwhere(allowed)
    if not look.tubes or not len(candidates):
        return darkness
    for _ in range(look.tubes):
        radius = rng.uniform(*TUBE_RADIUS_MM)
        reach = radius + 3 * vein_edge_mm(radius)
        start = candidates[rng.integers(len(candidates))].astype(np.float32)
        tube = np.zeros(shape, np.float32)
        for _branch in range(1 + int(rng.integers(2))):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            # Long against its width, so that no tube looks like a round spot in 3D.
            length = rng.uniform(4.0, 20.0) + 4 * radius
            end = start + length * direction
            # Only the voxels the tube can reach.
            low = np.clip(np.floor(np.minimum(start, end) - reach), 0, shape).astype(int)
            high = np.clip(np.ceil(np.maximum(start, end) + reach) + 1, 0, shape).astype(int)
            if np.all(high > low):
                box = tuple(slice(a, b) for a, b in zip(low, high))
                offsets = np.indices(high - low, np.float32).reshape(3, -1).T + (low - start)
                along = np.clip(offsets @ direction, 0.0, length)
                distance = np.linalg.norm(offsets - along[:, None] * direction, axis=1)
                profile = expit((radius - distance) / vein_edge_mm(radius)).reshape(high - low)
                np.maximum(tube[box], profile, out=tube[box])
            start = end
        if not np.any((tube > 0.05) & avoid):
            np.maximum(darkness, rng.uniform(*TUBE_DEPTH) * tube, out=darkness)
    return darkness


def render(maps, box, look: Appearance, rng, sample, config, crop_shape,
           avoid=None) -> np.ndarray:
    """The normalised image of `box` (a tuple of slices of the crop) in appearance `look`.

    maps: the subject's anatomy (dict of whole-crop arrays); sample: brain_sample indices, whose
    intensities normalise the patch as the whole brain normalises a scan; avoid: voxels near a
    microbleed, where no tube is drawn."""
    from ..preprocessing import normalize

    local = {name: maps[name][box] for name in MAP_NAMES}
    shape = local["wm"].shape
    image = _clean_intensity(local, look)
    lesions = local["lesions"].astype(np.float32)
    if look.lesion_blur_mm:
        lesions = ndimage.gaussian_filter(lesions, look.lesion_blur_mm)
    darkness = np.minimum(look.vein_scale * local["veins"].astype(np.float32), 0.97)
    np.maximum(darkness, look.lesion_depth * np.clip(lesions, 0.0, 1.0) ** look.lesion_power,
               out=darkness)
    if look.tubes:
        allowed = local["wm"] + local["gm"] > 0.5
        np.maximum(darkness, dark_tubes(rng, look, shape, allowed,
                                    np.zeros(shape, bool) if avoid is None else avoid[box]),
                   out=darkness)
    image *= 1.0 - darkness
    centre = np.asarray(crop_shape) / 2
    image *= np.exp(_log_bias(look, np.ogrid[tuple(slice(s.start - c, s.stop - c)
                                                   for s, c in zip(box, centre))]))

    image = ndimage.gaussian_filter(image, look.blur_mm)
    if look.thick_axis is not None:
        # A thick-slice acquisition: slice profile, sampled every thickness_mm, resampled back
        # to 1 mm (linear, as the pipeline's conform does); the noise lives on the thick grid.
        sigma = np.zeros(3)
        sigma[look.thick_axis] = look.thickness_mm / 2.355
        image = ndimage.gaussian_filter(image, sigma)
        zoom = np.ones(3)
        zoom[look.thick_axis] = max(2, round(shape[look.thick_axis] / look.thickness_mm)) \
            / shape[look.thick_axis]
        thick = ndimage.zoom(image, zoom, order=1, grid_mode=True, mode="nearest")
        thick = _rician(thick, look.noise_fraction, rng, look.noise_correlation_mm)
        image = ndimage.zoom(thick, np.asarray(shape) / thick.shape, order=1, grid_mode=True,
                             mode="nearest")
    else:
        image = _rician(image, look.noise_fraction, rng, look.noise_correlation_mm)

    sampled = {name: maps[name].reshape(-1)[sample] for name in MAP_NAMES}
    brain = _clean_intensity(sampled, look)
    brain *= np.exp(_log_bias(look, np.unravel_index(sample, crop_shape) - centre[:, None]))
    brain = _rician(brain, look.noise_fraction, rng, 0.0)
    image = normalize(image, None, config.normalization, config.percentile, config.clip_max,
                      brain=brain)
    return np.power(image, look.gamma, out=image)
