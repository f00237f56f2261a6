"""Conform, crop and normalise: geometry and intensity conventions of the SHIVA models; the
threshold of the intensity mask that starts the template registration."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import grid_affine, make_head

from cmb_workflow.imageops import ImageError, conformed_grid, load_volume, resample
from cmb_workflow.interfaces.lesions import label_lesions
from cmb_workflow.preprocessing import (_cubic_along_axes, _input_axes, clean_mask, conform,
                                        correct_affine, crop_start, deface, extract_box,
                                        mask_onto_grid, normalize)
from cmb_workflow.registration import (divided_by_local_mean, intensity_brain_mask,
                                       otsu_threshold)


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
    start = crop_start(mask, (160, 214, 176), 5, "cmb-workflow-1")
    assert start[0] == 100 - 80 and start[1] == 120 - 107
    # The top slice (249) plus a 5-voxel margin stays inside the box.
    assert start[2] + 176 - 1 >= 249 + 5
    small = np.zeros((200, 240, 260), bool)
    small[60:140, 60:180, 60:140] = True
    assert crop_start(small, (160, 214, 176), 5, "cmb-workflow-1")[2] == 100 - 88


def test_crop_centre_is_scipys_centre_of_mass_rounded_up():
    from scipy import ndimage

    rng = np.random.default_rng(5)
    for shape in [(61, 70, 53), (80, 64, 90)]:
        mask = ndimage.gaussian_filter(rng.random(shape), 3) > 0.5
        expected = np.ceil(ndimage.center_of_mass(mask)).astype(int) - np.array([40, 30, 20])
        start = crop_start(mask, (80, 60, 40), 0, "shivai")
        np.testing.assert_array_equal(start[:2], expected[:2])


def test_box_leaving_the_image_is_filled_with_zeros():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) + 1
    box = extract_box(data, np.array([-2, 1, 3]), (8, 3, 5))
    assert box.shape == (8, 3, 5)
    assert np.all(box[:2] == 0) and np.all(box[6:] == 0) and np.all(box[:, :, 3:] == 0)
    np.testing.assert_array_equal(box[2:6, :, :3], data[:, 1:4, 3:6])
    assert box.flags.f_contiguous  # NIfTI's order: saved without a transposed copy


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


# SHiVAi's conventions (preprocessing.py, docs/shivai.md), each with a hand-computed answer.

def test_shivai_conform_keeps_an_oblique_anisotropic_scans_rotation_and_centre():
    shape = (64, 60, 20)
    affine = grid_affine((0.8, 0.8, 3.0), shape, rotation_deg=(6, -4, 9))
    # A linear ramp along world x: cubic splines reproduce it exactly inside the image.
    ijk = np.indices(shape).reshape(3, -1)
    world_x = (affine[:3, :3] @ ijk + affine[:3, 3:4])[0].reshape(shape)
    out = conform(nib.Nifti1Image(world_x.astype(np.float32) + 1000, affine), "shivai")
    assert out.shape == (256, 256, 256)
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    # Up to the float32 rounding of a stored affine, as SHiVAi's saved intermediate has it.
    np.testing.assert_allclose(out.affine[:3, :3], rotation, atol=1e-6)  # tilted, 1 mm
    # nibabel's rescale_affine: the input's centre voxel (shape - 1) // 2 is the output's 127.
    centre = affine[:3, :3] @ ((np.array(shape) - 1) // 2) + affine[:3, 3]
    np.testing.assert_allclose(out.affine[:3, :3] @ [127, 127, 127] + out.affine[:3, 3], centre,
                               atol=1e-5)
    inside = (124, 130, 128)
    expected = out.affine[0, :3] @ inside + out.affine[0, 3] + 1000
    assert np.asarray(out.dataobj)[inside] == pytest.approx(expected, abs=1e-2)
    assert out.get_data_dtype() == np.float32


def test_shivai_conform_copies_a_scan_that_is_already_1mm():
    shape = (40, 50, 30)
    affine = grid_affine((1.0, 1.0, 1.0), shape, axcodes="LPS")
    data = np.random.default_rng(1).uniform(0, 500, shape).astype(np.float32)
    out = conform(nib.Nifti1Image(data, affine), "shivai")
    # LPS -> RAS flips x and y; the reoriented centre voxel (19, 24, 14) lands on 127, so the
    # reoriented voxel 0 on 127 - (19, 24, 14): a pure copy.
    copied = np.asarray(out.dataobj)[108:148, 103:153, 113:143]
    np.testing.assert_array_equal(copied, data[::-1, ::-1, :])
    # Outside the field of view: the input's minimum, as SHiVAi clamps to the input's range.
    outside = np.ones(out.shape, bool)
    outside[108:148, 103:153, 113:143] = False
    assert np.all(np.asarray(out.dataobj)[outside] == data.min())
    assert np.asarray(out.dataobj).flags.f_contiguous  # NIfTI's order: saved without a copy


def test_cubic_conform_along_parallel_axes_is_scipys_affine_transform():
    """The one-axis-at-a-time path gives affine_transform's voxels, its edges included (a box
    reaching past the input on every side, flipped and permuted axes, thick and thin voxels)."""
    from scipy import ndimage

    data = np.random.default_rng(2).uniform(0, 500, (23, 31, 9)).astype(np.float32)
    rotation = np.array([[0.0, -0.5, 0.0], [0.0, 0.0, 0.5], [0.5, 0.0, 0.0]])
    offset, out_shape = np.array([30.7, -3.3, -2.6]), (30, 70, 80)
    axes = _input_axes(rotation, data.shape)
    assert axes == [2, 0, 1]
    expected = ndimage.affine_transform(data, rotation, offset, out_shape, order=3,
                                        mode="constant", cval=0.0)
    separable = _cubic_along_axes(data, rotation, offset, out_shape, axes)
    assert separable.dtype == np.float32 and np.count_nonzero(expected) > 1000
    np.testing.assert_allclose(separable, expected, rtol=1e-6, atol=1e-9)
    assert _input_axes(rotation + 1e-3 * np.eye(3), data.shape) is None  # axes not parallel
    # An oblique scan's grid: parallel up to the affine's rounding.
    assert _input_axes(rotation + 3e-17, data.shape) == axes


def test_shivai_affine_check_straightens_a_slightly_skewed_affine_and_refuses_a_sheared_one():
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[0, 1] = 1e-4  # deviation 1e-4: projected onto the nearest rotation
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine)
    straight = correct_affine(img, "x.nii").affine
    unit = straight[:3, :3] / np.linalg.norm(straight[:3, :3], axis=0)
    np.testing.assert_allclose(unit @ unit.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(straight[:3, :3], axis=0), [1, 1, 2], atol=1e-9)
    affine[0, 1] = 0.1
    with pytest.raises(ImageError, match="x.nii: the affine's voxel axes are not perpendicular"):
        correct_affine(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), "x.nii")


def test_shivai_mask_is_nearest_neighbour_then_strictly_above_one_half():
    reference = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    values = np.zeros((4, 4, 4), np.float32)
    values[1, 1, 1], values[2, 2, 2] = 0.5, 0.51
    coarse = nib.Nifti1Image(values, np.diag([2.0, 2.0, 2.0, 1.0]))
    mask = mask_onto_grid(coarse, reference, "shivai")
    # Voxel (4, 4, 4) of the 1 mm grid is at 4 mm: nearest coarse voxel (2, 2, 2). Voxels 3..5
    # round to it (half-way 3 and 5 round to the even 2 and 2, as scipy does).
    assert mask[4, 4, 4] and not mask[2, 2, 2]
    assert not mask_onto_grid(coarse, reference, "shivai")[2, 2, 2]  # 0.5 is not above 0.5


def test_shivai_mask_cleaning_drops_small_far_parts_only():
    values = np.zeros((60, 60, 60), np.float32)
    values[10:30, 10:30, 10:30] = 1  # the brain: 8000 voxels
    values[40:44, 40:44, 40:44] = 1  # 64 voxels (<= 100 mm³), far away: dropped
    values[33:35, 10:12, 10:12] = 1  # 8 voxels, within 5 voxels of the brain: kept
    values[10:12, 34:36, 10:12] = 1  # 8 voxels, half of them 6 voxels away: that half dropped
    mask = clean_mask(values, (1.0, 1.0, 1.0))
    assert mask.sum() == 8000 + 8 + 4
    assert mask[10, 34, 10] and not mask[10, 35, 10]
    # One part, however small, stays: the rule applies only between parts.
    single = np.zeros((20, 20, 20), np.float32)
    single[5:8, 5:8, 5:8] = 0.9
    assert clean_mask(single, (1.0, 1.0, 1.0)).sum() == 27


@pytest.mark.parametrize("convention, top, expected_start_z", [
    # centre of mass z = ceil((lo + top) / 2); box start = centre - 88; end = start + 176.
    ("shivai", 200, 112 - 88),              # 200 < end 200? end = 24 + 176 = 200 <= top: moved
    ("shivai", 199, 112 - 88),              # top 199 inside the box (end exclusive): kept
    ("cmb-workflow-1", 199, 199 + 5 - 175),  # fewer than 5 voxels above: moved to keep 5
])
def test_crop_box_moves_up_only_when_the_mask_top_leaves_it(convention, top, expected_start_z):
    mask = np.zeros((200, 240, 300), bool)
    mask[60:140, 60:180, 24:top + 1] = True
    centre_z = int(np.ceil((24 + top) / 2))
    start = crop_start(mask, (160, 214, 176), 5, convention)
    if convention == "shivai" and top == 200:
        # end = centre_z - 88 + 176 = 200 <= top 200: moved so that it ends at top + 5.
        assert centre_z - 88 + 176 == 200
        assert start[2] == 200 + 5 - 176
    else:
        assert start[2] == expected_start_z if convention != "shivai" else centre_z - 88


def test_crop_box_starting_below_a_neck_heavy_grid_is_moved_and_zero_padded():
    # The field of view starts at the chin: the box starts below the grid and must still move.
    mask = np.zeros((180, 220, 120), bool)
    mask[40:140, 20:200, 0:110] = True
    start = crop_start(mask, (160, 214, 176), 5, "shivai")
    # centre z = ceil(54.5) = 55, start -33, end 143 > 120 (grid end): the top (109) is inside
    # the grid's end, so SHiVAi does not move it.
    assert list(start) == [90 - 80, 110 - 107, 55 - 88]
    data = np.arange(np.prod(mask.shape), dtype=np.float32).reshape(mask.shape)
    box = extract_box(data, start, (160, 214, 176))
    np.testing.assert_array_equal(box[:, :, 33:33 + 120], data[10:170, 3:217, :])
    assert not box[:, :, :33].any() and not box[:, :, 153:].any()
    tall = np.zeros((180, 220, 400), bool)
    tall[40:140, 20:200, 0:300] = True  # centre 150, end 238 <= top 299: moved by 299-238+5
    assert crop_start(tall, (160, 214, 176), 5, "shivai")[2] == 150 - 88 + 299 - 238 + 5


def test_defacing_zeroes_the_face_and_keeps_the_brain():
    shape = (96, 110, 96)
    affine = grid_affine((2.0, 2.0, 2.0), shape)
    head, brain = make_head(shape, affine, dtype=np.float32)
    brain_mask = np.asarray(brain.dataobj) > 0
    defaced = np.asarray(deface(head, brain_mask).dataobj)
    original = np.asarray(head.dataobj)
    assert np.array_equal(defaced[brain_mask], original[brain_mask])
    removed = (original != 0) & (defaced == 0)
    assert removed.any()
    # What is removed lies in front of and below the brain (the face), never above it.
    ijk = np.argwhere(removed)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    assert world[:, 2].max() < affine[2, 3] + affine[2, 2] * np.argwhere(brain_mask)[:, 2].max()
    assert np.median(world[:, 1]) > 0  # anterior


def test_a_lesion_mostly_outside_the_brain_is_dropped():
    probability = np.zeros((20, 20, 20), np.float32)
    probability[2:12, 5, 5] = 0.9   # 10 voxels, 3 outside the brain: dropped
    probability[2:12, 9, 9] = 0.9   # 10 voxels, 2 outside: kept (SHiVAi: more than 25 %)
    brain = np.zeros(probability.shape, bool)
    brain[5:, :, :] = True
    brain[4, 9, 9] = True
    _labels, rows = label_lesions(probability, np.eye(4), 0.5, 26, 1, 0.0, brain)
    assert [row["y"] for row in rows] == [9.0]


@pytest.mark.parametrize("extra_zeros", [0, 3_000_000])
def test_otsu_threshold_is_itks_with_the_grids_zeros_counted(extra_zeros):
    # Dark and bright tissue, noisy; the zeros stand for a grid's air beyond the field of view.
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.normal(200, 40, 400_000), rng.normal(600, 60, 600_000)])
    values = values.astype(np.float32)
    whole = np.concatenate([values, np.zeros(extra_zeros, np.float32)])
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(whole.reshape(1, 1, -1)))
    threshold = otsu_threshold(values, extra_zeros=extra_zeros)
    assert threshold == otsu.GetThreshold()
    assert 250 < threshold < 550


@pytest.mark.parametrize("value", [0.0, 5.0])
def test_an_image_of_one_value_has_no_head_to_register(value):
    img = nib.Nifti1Image(np.full((40, 40, 40), value, np.float32), np.eye(4))
    assert otsu_threshold(np.asarray(img.dataobj)) == value
    with pytest.raises(ImageError, match="no head found"):
        intensity_brain_mask(img)


def test_registration_sees_the_image_without_its_bias_inside_the_metric_mask():
    """A twofold bias across a head-sized ball of one tissue (2 mm voxels, 140 mm across) is
    flattened; the dark skull around it, inside the metric's mask, does not brighten the brain's
    edge; outside the mask the image is left as it is; the scale is kept."""
    grid = np.indices((90, 90, 90)).astype(np.float32)
    bias = 1.0 + grid[0] / 89.0  # 1 on one side, 2 on the other
    radius = np.linalg.norm(grid - 44.5, axis=0)
    brain, region = radius < 35, radius < 40
    image = np.where(brain, 300, np.where(region, 20, 40)) * np.where(region, bias, 1)

    def on_grid(array):
        itk = sitk.GetImageFromArray(array.astype(np.float32))
        itk.SetSpacing((2.0, 2.0, 2.0))
        return itk

    flat = sitk.GetArrayFromImage(divided_by_local_mean(on_grid(image), on_grid(brain),
                                                        on_grid(region)))
    assert flat[brain].max() / flat[brain].min() < 1.2
    assert np.median(flat[brain]) == pytest.approx(np.median(image[brain]), rel=0.01)
    assert flat[region & ~brain].max() < 0.1 * flat[brain].min()
    assert (flat[~region] == 40).all()
