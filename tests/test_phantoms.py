"""Phantom generator: ground truth agrees with the images, on every kind of grid, reproducibly."""

import argparse
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from cmb_workflow.synthetic import (GRIDS, MODALITIES, Grid, add_arguments, make_phantom,
                                    make_phantom_dataset, run_from_args, subject_plan)
from cmb_workflow.synthetic.atlas import DEEP_NUCLEI, load_atlas
from cmb_workflow.synthetic.grids import MAX_VOXELS, place_grid, random_pose

# Coarse voxels keep the tests fast while covering anisotropy, obliquity, axis orders and cuts.
SMALL_GRIDS = (
    Grid((2.0, 2.0, 4.0), "LPS", oblique=True),
    Grid((1.5, 3.0, 1.5), "PIR"),
    Grid((2.0, 2.0, 2.0), "RAS", fov_cut="top"),
    Grid((2.5, 2.5, 2.5), "ILA", oblique=True, fov_cut="bottom"),
)


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom(10 + i, grid=grid, n_cmb=15) for i, grid in enumerate(SMALL_GRIDS)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    return root, make_phantom_dataset(root, 2, seed=7, grids=SMALL_GRIDS[:2], n_cmb=4)


def lesion_centres(phantom):
    return np.array([[lesion[k] for k in "xyz"] for lesion in phantom.lesions])


def world_to_index(affine, points):
    return (np.asarray(points) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def assert_visibly_dark(image, labels, lesions):
    """Median inside each lesion over the median of a shell 2-3 voxels around it."""
    ratios = []
    for lesion in lesions:
        core = labels == lesion["label"]
        shell = ndi.binary_dilation(core, iterations=3) & ~ndi.binary_dilation(core) & (labels == 0)
        ratios.append(np.median(image[core]) / np.median(image[shell]))
    # Partial volume in thick voxels dims the 2 mm bleeds, but none vanish.
    assert max(ratios) < 0.9
    assert np.median(ratios) < 0.7


def test_mask_labels_agree_with_listed_centres(phantoms):
    for phantom in phantoms:
        _, labels, _ = phantom.arrays()
        affine = phantom.image.affine
        listed = [lesion["label"] for lesion in phantom.lesions]
        assert len(listed) == 15
        assert listed == list(range(1, 16))
        assert np.unique(labels[labels > 0]).tolist() == listed
        centres = lesion_centres(phantom)
        masses = np.array(ndi.center_of_mass(np.ones(labels.shape), labels, listed))
        diagonal = np.linalg.norm(phantom.grid["voxel_size_mm"])
        assert np.all(np.linalg.norm(masses @ affine[:3, :3].T + affine[:3, 3] - centres, axis=1)
                      <= diagonal)
        # Even the smallest bleed on the thickest slices labels the voxel holding its centre.
        centre_voxels = np.rint(world_to_index(affine, centres)).astype(int)
        assert labels[tuple(centre_voxels.T)].tolist() == listed


def test_lesions_lie_in_brain_tissue_and_apart(phantoms):
    atlas = load_atlas()
    for phantom in phantoms:
        _, labels, brain = phantom.arrays()
        assert np.all(brain[labels > 0] == 1)
        template = (lesion_centres(phantom) - phantom.pose[:3, 3]) @ np.linalg.inv(
            phantom.pose[:3, :3]).T
        assert np.all(atlas.sample(atlas.gm + atlas.wm, template) >= 0.5)  # not CSF/ventricle
        radii = np.array([lesion["diameter_mm"] / 2 for lesion in phantom.lesions])
        gaps = (np.linalg.norm(lesion_centres(phantom)[:, None] - lesion_centres(phantom)[None],
                               axis=-1) - radii[:, None] - radii[None])
        assert np.all(gaps[~np.eye(len(radii), dtype=bool)] > 0)
        assert all(2.0 <= 2 * r <= 10.0 for r in radii)
    locations = {lesion["location"] for phantom in phantoms for lesion in phantom.lesions}
    assert locations == {"lobar", "deep", "infratentorial"}


def test_lesions_are_darker_than_their_surroundings(phantoms):
    for phantom in phantoms:
        image, labels, _ = phantom.arrays()
        assert_visibly_dark(image, labels, phantom.lesions)


def test_iron_load_lies_on_the_dark_nuclei(phantoms):
    """The iron map marks where the image is darkened: the pallidi, on every pose and grid."""
    centre = DEEP_NUCLEI["globus_pallidus"][0]
    for phantom in phantoms:
        image, labels, brain = phantom.arrays()
        iron = phantom.iron_load(phantom.image.affine, image.shape)
        assert iron.shape == image.shape and iron.dtype == np.float32 and iron.max() <= 1
        pallidi = (iron > 0.9) & (labels == 0)
        # The white matter beside them, which the pallidum (the most iron-laden) is darker than.
        beside = (ndi.binary_dilation(pallidi, iterations=4) & (brain == 1) & (iron == 0)
                  & (labels == 0))
        assert pallidi.any() and np.median(image[pallidi]) < 0.85 * np.median(image[beside])
        # Both pallidum centres, mapped through the pose, fall where the map is highest.
        for side in (1.0, -1.0):
            world = phantom.pose @ [side * centre[0], *centre[1:], 1.0]
            voxel = tuple(np.rint(world_to_index(phantom.image.affine, world[:3])).astype(int))
            assert iron[voxel] > 0.8


def test_grid_geometry_and_headers(phantoms):
    for phantom, grid in zip(phantoms, SMALL_GRIDS):
        image = phantom.image
        assert phantom.grid["label"] == grid.label
        assert phantom.grid["axcodes"] == grid.axcodes == "".join(nib.aff2axcodes(image.affine))
        assert phantom.grid["shape"] == list(image.shape)
        assert np.allclose(image.header.get_zooms(), grid.voxel_size)
        directions = image.affine[:3, :3] / np.array(grid.voxel_size)
        axis_aligned = np.allclose(np.abs(directions), np.round(np.abs(directions)))
        assert axis_aligned != grid.oblique
        for img in (image, phantom.cmb_mask, phantom.brain_mask):
            assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
            assert np.allclose(img.get_qform(), image.affine, atol=1e-4)
            assert np.array_equal(img.affine, image.affine)
        assert image.get_data_dtype() == np.dtype(phantom.grid["dtype"])
        assert phantom.cmb_mask.get_data_dtype() == np.int16
        assert phantom.brain_mask.get_data_dtype() == np.uint8
        assert np.unique(phantom.brain_mask.dataobj).tolist() == [0, 1]


def test_fov_cut_removes_part_of_the_brain_but_no_listed_lesion(phantoms):
    for phantom, grid in zip(phantoms, SMALL_GRIDS):
        if grid.fov_cut is None:
            continue
        _, labels, brain = phantom.arrays()
        affine = phantom.image.affine
        # The slab axis is the voxel axis closest to the scanner's S-I axis.
        axis = int(np.argmax(np.abs(affine[2, :3])))
        superior_end = 0 if affine[2, axis] < 0 else -1
        cut_end = superior_end if grid.fov_cut == "top" else -1 - superior_end
        assert brain.take(cut_end, axis=axis).sum() > 100
        assert brain.take(-1 - cut_end, axis=axis).sum() == 0
        uncut = make_phantom(phantom.seed, grid=Grid(grid.voxel_size, grid.axcodes, grid.oblique),
                             n_cmb=0)
        assert brain.sum() < 0.95 * np.asanyarray(uncut.brain_mask.dataobj).sum()
        index = world_to_index(affine, lesion_centres(phantom))
        assert np.all((index >= 0) & (index <= np.array(labels.shape) - 1))


def test_predefined_grids_stay_modest_and_are_unique():
    atlas = load_atlas()
    assert len({grid.label for grid in GRIDS}) == len(GRIDS)
    rng = np.random.default_rng(0)
    for grid in GRIDS:
        for _ in range(3):
            native = place_grid(rng, grid, random_pose(rng, atlas.brain_centre), atlas)
            assert np.prod(native.shape) <= MAX_VOXELS


def test_same_seed_gives_identical_files(dataset, tmp_path):
    root, _ = dataset
    make_phantom_dataset(tmp_path, 2, seed=7, grids=SMALL_GRIDS[:2], n_cmb=4)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in files:
        assert (root / name).read_bytes() == (tmp_path / name).read_bytes(), name
    other_seed = make_phantom(subject_plan(1, seed=8)[0]["seed"], modality="swi",
                              grid=SMALL_GRIDS[0], n_cmb=4)
    first = nib.load(root / "sub-ph000" / "anat" / "sub-ph000_swi.nii.gz")
    assert first.shape != other_seed.image.shape or not np.array_equal(
        first.dataobj, other_seed.image.dataobj)


def test_dataset_layout_follows_the_contract(dataset):
    root, subjects = dataset
    raw = json.loads((root / "dataset_description.json").read_text())
    assert (raw["Name"], raw["BIDSVersion"], raw["DatasetType"]) == (
        "cmb-workflow phantoms", "1.9.0", "raw")
    truth_root = root / "derivatives" / "phantom-truth"
    derived = json.loads((truth_root / "dataset_description.json").read_text())
    assert derived["DatasetType"] == "derivative"
    assert derived["GeneratedBy"][0]["Name"] == "cmb-workflow phantoms"

    rows = [line.split("\t") for line in (root / "participants.tsv").read_text().splitlines()]
    assert rows[0] == ["participant_id", "modality", "n_cmb"]
    assert [row[0] for row in rows[1:]] == ["sub-ph000", "sub-ph001"]
    assert [row[1] for row in rows[1:]] == ["swi", "T2starw"]

    for subject, row in zip(subjects, rows[1:]):
        sub = subject["participant_id"]
        anat = truth_root / sub / "anat"
        truth = json.loads((anat / f"{sub}_desc-cmb_lesions.json").read_text())
        assert truth["source"] == f"{sub}/anat/{sub}_{row[1]}.nii.gz"
        assert truth["modality"] == row[1] and int(row[2]) == len(truth["lesions"]) == 4
        assert set(truth["grid"]) == {"shape", "voxel_size_mm", "axcodes", "oblique", "fov_cut",
                                      "dtype", "label", "style"}
        image = nib.load(root / truth["source"])
        cmb = nib.load(anat / f"{sub}_desc-cmb_mask.nii.gz")
        brain = nib.load(anat / f"{sub}_desc-brain_mask.nii.gz")
        assert image.shape == cmb.shape == brain.shape == tuple(truth["grid"]["shape"])
        assert np.array_equal(image.affine, cmb.affine) and np.array_equal(image.affine,
                                                                           brain.affine)
        assert cmb.get_data_dtype() == np.int16 and brain.get_data_dtype() == np.uint8
        labels = np.asanyarray(cmb.dataobj)
        assert np.unique(labels[labels > 0]).tolist() == [
            lesion["label"] for lesion in truth["lesions"]]
        assert {"label", "x", "y", "z", "diameter_mm", "location"} == set(truth["lesions"][0])
        assert subject["image"] == root / truth["source"]
    # Nothing half-written is left behind.
    assert not [p for p in root.rglob(".*")]


def test_subject_plan_covers_every_grid_in_both_modalities():
    plan = subject_plan(2 * len(GRIDS), seed=3)
    assert {entry["grid"] for entry in plan[:len(GRIDS)]} == set(GRIDS)
    assert {(entry["grid"], entry["modality"]) for entry in plan} == {
        (grid, modality) for grid in GRIDS for modality in MODALITIES}
    assert all(entry["label"].isalnum() for entry in plan)
    assert len({entry["seed"] for entry in plan}) == len(plan)
    assert subject_plan(3, seed=3) == plan[:3]


def test_cli_writes_the_requested_phantoms(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--n-subjects", "1", "--seed", "5",
                              "--modality", "T2starw", "--grid", "1.0x1.0x3.0 oblique"])
    assert run_from_args(args) == 0
    truth_path = (tmp_path / "derivatives" / "phantom-truth" / "sub-ph000" / "anat"
                  / "sub-ph000_desc-cmb_lesions.json")
    truth = json.loads(truth_path.read_text())
    assert truth["modality"] == "T2starw"
    assert truth["grid"]["label"] == "1.0x1.0x3.0 oblique"
    assert truth["grid"]["fov_cut"] == "bottom"
    image = nib.load(tmp_path / truth["source"]).get_fdata()
    labels = np.asanyarray(nib.load(truth_path.with_name("sub-ph000_desc-cmb_mask.nii.gz")).dataobj)
    assert truth["lesions"]
    assert_visibly_dark(image, labels, truth["lesions"])
    assert "sub-ph000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--modality", "flair"])


def test_a_style_changes_the_look_and_nothing_else():
    grid = SMALL_GRIDS[2]
    standard = make_phantom(3, grid=grid, modality="swi", n_cmb=6)
    other = make_phantom(3, grid=grid, modality="swi", n_cmb=6, style="contrast-b")
    assert other.lesions == standard.lesions and other.grid["style"] == "contrast-b"
    assert np.array_equal(other.brain_mask.get_fdata(), standard.brain_mask.get_fdata())
    image, reference = other.image.get_fdata(), standard.image.get_fdata()
    brain = standard.brain_mask.get_fdata() > 0
    # Mirrored grey/white contrast: the two looks disagree inside the brain, not just in noise.
    assert np.corrcoef(image[brain], reference[brain])[0, 1] < 0.9
    again = make_phantom(3, grid=grid, modality="swi", n_cmb=6, style="contrast-b")
    assert np.array_equal(again.image.get_fdata(), image)


def test_every_style_keeps_tissues_positive_and_contrast_c_has_dark_csf():
    from cmb_workflow.synthetic.phantoms import CONTRASTS, STYLES, _styled

    for style in STYLES.values():
        for contrast in CONTRASTS.values():
            styled = _styled(contrast, style)
            assert styled.gm > 0 and styled.csf > 0
    assert all(_styled(contrast, STYLES["contrast-c"]).csf < 1.0  # white matter is 1
               for contrast in CONTRASTS.values())


def test_invalid_requests_are_refused():
    with pytest.raises(ValueError, match="modality"):
        make_phantom(0, modality="flair")
    with pytest.raises(ValueError, match="unknown grid"):
        make_phantom(0, grid="3x3x3")
    with pytest.raises(ValueError, match="style"):
        make_phantom(0, style="glossy")
    with pytest.raises(ValueError, match="axcodes"):
        Grid((1, 1, 1), "RRS")
