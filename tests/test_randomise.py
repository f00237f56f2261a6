"""Domain randomisation of training patches: anatomy maps, appearances and rendering."""

from dataclasses import replace

import numpy as np
import pytest

from cmb_workflow.configs import load_config
from cmb_workflow.synthetic import make_phantom
from cmb_workflow.synthetic.randomise import (MAP_NAMES, anatomy_maps, brain_sample, dark_tubes,
                                              random_appearance, render)

BOX = 64


@pytest.fixture(scope="module")
def anatomy():
    """A 64 mm cube of one phantom's anatomy on a 1 mm grid, centred on its first microbleed."""
    phantom = make_phantom(7, grid=0, n_cmb=3, modality="swi")
    lesion = phantom.lesions[0]
    affine = np.eye(4)
    affine[:3, 3] = np.array([lesion["x"], lesion["y"], lesion["z"]]) - BOX / 2
    maps = anatomy_maps(phantom, affine, (BOX, BOX, BOX))
    mask = (maps["gm"].astype(np.float32) + maps["wm"] + maps["csf"]) > 0.5
    return maps, mask, lesion


def test_anatomy_maps_split_each_voxel_into_tissues_and_hold_the_microbleed(anatomy):
    maps, mask, lesion = anatomy
    assert set(maps) == set(MAP_NAMES) and all(m.dtype == np.float16 for m in maps.values())
    total = sum(maps[name].astype(np.float32) for name in ("gm", "wm", "csf", "outside"))
    np.testing.assert_allclose(total, 1.0, atol=0.01)
    centre = BOX // 2
    assert maps["lesions"][centre, centre, centre] > 0.9  # the bleed's core, darkening depth 1
    assert maps["lesions"][0, 0, 0] == 0
    assert maps["veins"].max() > 0.3  # veins as the phantom drew them


def test_appearances_cover_both_contrast_signs():
    rng = np.random.default_rng(0)
    looks = [random_appearance(rng) for _ in range(200)]
    assert min(look.csf for look in looks) < 0.5 < 1.5 < max(look.csf for look in looks)
    assert min(look.gm for look in looks) < 0.8 and max(look.gm for look in looks) > 1.2
    assert {look.thick_axis for look in looks} == {None, 0, 1, 2}


def test_render_is_reproducible_normalised_like_a_scan_and_keeps_the_bleed_dark(anatomy):
    maps, mask, _ = anatomy
    config = load_config()
    whole = (slice(0, BOX),) * 3
    sample = brain_sample(np.random.default_rng(0), mask)
    images = []
    for _ in range(2):
        rng = np.random.default_rng(3)
        look = random_appearance(rng)
        images.append(render(maps, whole, look, rng, sample, config, (BOX,) * 3))
    np.testing.assert_array_equal(images[0], images[1])
    image = images[0]
    assert image.shape == (BOX,) * 3 and image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    # Normalised by the brain's 99th percentile as the pipeline does (then gamma).
    brain_top = np.percentile(image[mask], 99) ** (1 / look.gamma)
    assert brain_top == pytest.approx(1 / config.clip_max, abs=0.1)
    centre = BOX // 2
    core = image[centre - 1:centre + 2, centre - 1:centre + 2, centre - 1:centre + 2].mean()
    assert core < np.median(image[mask])


def test_tubes_stay_away_from_microbleeds(anatomy):
    maps, mask, _ = anatomy
    near_bleed = maps["lesions"] > 0.01
    rng = np.random.default_rng(5)
    drawn = 0
    for _ in range(10):
        look = replace(random_appearance(rng), tubes=4)
        darkness = dark_tubes(rng, look, mask.shape, mask, near_bleed)
        assert not np.any((darkness > 0.05) & near_bleed)
        drawn += int(np.any(darkness > 0.2))
    assert drawn >= 5
