"""Finding images in BIDS-like folders, and the configuration layers."""

import pytest
import yaml

from cmb_workflow.bids import InputError, find_images, parse_entities
from cmb_workflow.configs import ConfigError, load_config


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_bids_discovery_with_sessions_runs_echoes_and_masks(tmp_path):
    touch(tmp_path / "sub-01/anat/sub-01_swi.nii.gz")
    touch(tmp_path / "sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    touch(tmp_path / "sub-02/ses-1/anat/sub-02_ses-1_run-1_T2starw.nii.gz")
    touch(tmp_path / "sub-02/ses-1/anat/sub-02_ses-1_run-2_T2starw.nii.gz")
    touch(tmp_path / "sub-03/anat/sub-03_echo-1_swi.nii.gz")
    touch(tmp_path / "sub-03/anat/sub-03_echo-2_swi.nii.gz")
    touch(tmp_path / "sub-03/anat/sub-03_T1w.nii.gz")
    touch(tmp_path / "derivatives/x/sub-01/anat/sub-01_swi.nii.gz")
    masks = tmp_path / "masks"
    touch(masks / "sub-02/ses-1/anat/sub-02_ses-1_run-2_desc-brain_mask.nii.gz")
    jobs, rejected = find_images(tmp_path, masks_dir=masks)
    by_prefix = {job.prefix: job for job in jobs}
    assert sorted(by_prefix) == ["sub-01", "sub-02_ses-1_run-1", "sub-02_ses-1_run-2", "sub-03"]
    assert not rejected
    assert by_prefix["sub-01"].mask.name == "sub-01_desc-brain_mask.nii.gz"
    assert by_prefix["sub-02_ses-1_run-1"].mask is None
    assert by_prefix["sub-02_ses-1_run-2"].mask.parent.is_relative_to(masks)
    assert by_prefix["sub-03"].source.name == "sub-03_echo-1_swi.nii.gz"
    assert by_prefix["sub-02_ses-1_run-2"].relative_prefix == "sub-02/ses-1/anat/sub-02_ses-1_run-2"
    only, _ = find_images(tmp_path, participant_label=["sub-02"], session_label=["1"])
    assert {job.entity["sub"] for job in only} == {"02"}


def test_standard_layout_and_clashing_outputs(tmp_path):
    touch(tmp_path / "std/patient_7/swi/scan.nii.gz")
    jobs, _ = find_images(tmp_path / "std", input_type="standard")
    assert [job.prefix for job in jobs] == ["sub-patient7"]
    touch(tmp_path / "bids/sub-01/anat/sub-01_swi.nii.gz")
    touch(tmp_path / "bids/sub-01/anat/sub-01_T2starw.nii.gz")
    jobs, rejected = find_images(tmp_path / "bids")
    assert len(jobs) == 1 and len(rejected) == 1
    assert "overwrite" in rejected[0][1]


def test_labels_with_path_characters_are_refused(tmp_path):
    with pytest.raises(InputError, match="letters and digits"):
        parse_entities("sub-../x_swi.nii.gz")
    with pytest.raises(InputError, match="only letters and digits"):
        find_images(tmp_path, participant_label=["../etc"])
    with pytest.raises(InputError, match="no \\*_swi"):
        find_images(tmp_path)


def test_config_layers_and_unknown_keys(tmp_path):
    user = tmp_path / "user.yml"
    user.write_text(yaml.safe_dump({"threshold": 0.3, "connectivity": 6}))
    config = load_config(user, {"threshold": 0.7, "nprocs": None})
    assert config["threshold"] == 0.7 and config["connectivity"] == 6
    assert config["final_dimensions"] == [160, 214, 176]
    user.write_text("tresholt: 0.3\n")
    with pytest.raises(ConfigError, match="unknown setting 'tresholt'"):
        load_config(user)
