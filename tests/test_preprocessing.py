"""Conform, crop and normalise: geometry and intensity conventions of the SHIVA models."""

import nibabel as nib
import numpy as np
import pytest
from helpers import grid_affine

from cmb_workflow.imageops import ImageError, conformed_grid, load_volume, resample
from cmb_workflow.interfaces.crop import crop_start, extract_box
from cmb_workflow.interfaces.normalize import normalize


@pytest.mark.parametrize("axcodes,rotation", [("RAS", (0, 0, 0)), ("LPS", (12, -5, 7)),
                                              ("PIR", (0, 20, 0))])
def test_conformed_grid_is_1mm_ras_and_keeps_world_positions(axcodes, rotation):
    shape = (40, 30, 12)
    affine = grid_affine((0.9, 1.1, 2.5), shape, axcodes=axcodes, rotation_deg=rotation)
    data = np.zeros(shape, np.float32)
    data[20, 15, 6] = 1000.0
    img = nib.Nifti1Image(data, affine)
    out_shape, out_affine = conformed_grid(img)
    assert np.allclose(out_affine[:3, :3], np.eye(3))
    conformed = resample(img, out_shape, out_affine, "linear").get_fdata()
    peak = np.unravel_index(conformed.argmax(), out_shape)
    world_peak = out_affine[:3, :3] @ peak + out_affine[:3, 3]
    assert np.linalg.norm(world_peak - affine[:3, :3] @ [20, 15, 6] - affine[:3, 3]) <= 1.5


def test_crop_is_centred_on_the_mask_and_moved_up_for_necks():
    mask = np.zeros((200, 240, 260), bool)
    mask[40:160, 30:210, 20:250] = True  # a mask reaching far down (neck)
    start = crop_start(mask, (160, 214, 176), top_margin=5)
    assert start[0] == 100 - 80 and start[1] == 120 - 107
    # The top slice (249) plus a 5-voxel margin stays inside the box.
    assert start[2] + 176 - 1 >= 249 + 5
    small = np.zeros((200, 240, 260), bool)
    small[60:140, 60:180, 60:140] = True
    assert crop_start(small, (160, 214, 176), 5)[2] == 100 - 88


def test_box_leaving_the_image_is_filled_with_zeros():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) + 1
    box = extract_box(data, np.array([-2, 1, 3]), (8, 3, 5))
    assert box.shape == (8, 3, 5)
    assert np.all(box[:2] == 0) and np.all(box[6:] == 0) and np.all(box[:, :, 3:] == 0)
    np.testing.assert_array_equal(box[2:6, :, :3], data[:, 1:4, 3:6])


def test_normalisation_conventions():
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1000, (20, 20, 20)).astype(np.float32)
    data[0, 0, 0] = np.nan
    data[0, 0, 1] = -50
    data[12, 12, 12] = 5000  # a bright outlier above 1.3 x p99 is clipped
    mask = np.zeros(data.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    p99 = np.percentile(np.nan_to_num(data)[mask], 99)
    shivai = normalize(data, mask, "shivai", 99, 1.3)
    assert shivai.min() == 0 and shivai.max() == pytest.approx(1.0)
    assert shivai[10, 10, 10] == pytest.approx(min(data[10, 10, 10] / p99, 1.3) / 1.3, rel=1e-5)
    minmax = normalize(data, mask, "minmax", 99, 1.3)
    assert minmax[mask].min() == 0 and minmax.max() == 1.0
    with pytest.raises(ValueError, match="no signal"):
        normalize(np.zeros_like(data), mask, "shivai", 99, 1.3)


def test_load_volume_takes_the_requested_echo_and_refuses_bad_shapes(tmp_path):
    echoes = np.stack([np.full((8, 8, 8), value, np.float32) for value in (1, 2, 3)], axis=-1)
    path = tmp_path / "multiecho.nii.gz"
    nib.save(nib.Nifti1Image(echoes, np.eye(4)), path)
    assert load_volume(path, echo=2).get_fdata().mean() == 2
    with pytest.raises(ImageError, match="echo 4 requested"):
        load_volume(path, echo=4)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 1), np.float32), np.eye(4)), flat)
    with pytest.raises(ImageError, match="single slice"):
        load_volume(flat)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti")
    with pytest.raises(ImageError, match="junk.nii.gz: cannot be read"):
        load_volume(junk)
