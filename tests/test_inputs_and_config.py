"""Finding images in BIDS-like folders, and the configuration layers."""

from pathlib import Path

import pytest
import yaml

from cmb_workflow.bids import InputError, find_images, parse_entities
from cmb_workflow.configs import ConfigError, load_config, save_settings


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
    assert "overwrite" in rejected[0].reason and rejected[0].status == "failed"


def test_labels_with_path_characters_are_refused(tmp_path):
    with pytest.raises(InputError, match="letters and digits"):
        parse_entities("sub-../x_swi.nii.gz")
    with pytest.raises(InputError, match="only letters and digits"):
        find_images(tmp_path, participant_label=["../etc"])
    with pytest.raises(InputError, match="no image found in the expected layout"):
        find_images(tmp_path)


def test_config_layers_and_unknown_keys(tmp_path):
    user = tmp_path / "user.yml"
    user.write_text(yaml.safe_dump({"threshold": 0.3, "connectivity": 6}))
    config = load_config(user, {"threshold": 0.7, "nprocs": None})
    assert config.threshold == 0.7 and config.connectivity == 6
    assert config.final_dimensions == (160, 214, 176)
    user.write_text("tresholt: 0.3\n")
    with pytest.raises(ConfigError, match="unknown setting 'tresholt'"):
        load_config(user)
    user.write_text("slurm: {cpu: 2}\n")
    with pytest.raises(ConfigError, match="unknown setting 'slurm.cpu'"):
        load_config(user)


@pytest.mark.parametrize("plugin, problem", [("NoSuchOne", "Nipype has no such plugin"),
                                             ("SGEGraph", "returns before its jobs have run")])
def test_a_plugin_outside_the_usual_ones_is_looked_up_in_nipype(plugin, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(overrides={"plugin": plugin})
    assert load_config(overrides={"plugin": "SGE"}).plugin == "SGE"


@pytest.mark.parametrize("key, value, allowed", [
    ("connectivity", 5, "one of 6, 18, 26"),
    ("interpolation", "x", "one of bspline, welch, linear"),
    ("final_dimensions", [160, 214], "three positive whole numbers"),
    ("nprocs", -1, "a whole number at least 1 or null"),
    ("predict_batch_size", "8", "a whole number at least 1"),
    ("mask_input", "no", "true or false or null"),
    ("qc", 5, "a mapping of its settings"),
    ("percentile", 150, "a number above 0 and at most 100"),
    ("threshold", True, "a number at least 0 and at most 1"),
    ("participant_label", "01", "a list of labels"),
    ("qc.brain_volume_ml", [2200, 800], r"\[low, high\], two numbers with low <= high"),
    ("slurm.cpus", 0, "a whole number at least 1"),
    ("slurm.array_throttle", 0, "a whole number at least 1"),
    ("input_limits.max_fov_mm", "big", "a number at least 1"),
    ("report.orientation", "upside-down", "one of radiological, neurological"),
])
def test_every_bad_value_is_refused_at_load_with_key_value_and_what_is_allowed(
        tmp_path, key, value, allowed):
    section, _, name = key.rpartition(".")
    user = tmp_path / "user.yml"
    user.write_text(yaml.safe_dump({section: {name: value}} if section else {name: value}))
    with pytest.raises(ConfigError, match=rf"^{user}: {key} .+: expected {allowed}$"):
        load_config(user)


def test_relative_paths_resolve_against_the_working_folder_or_the_yaml_folder(tmp_path):
    user = tmp_path / "configs" / "user.yml"
    user.parent.mkdir()
    user.write_text("masks_dir: ../masks\nmodels: m/model_info.json\n")
    config = load_config(user, {"work_dir": "scratch"}, cwd=tmp_path / "elsewhere")
    assert config.masks_dir == str(tmp_path / "masks")
    assert config.models == str(tmp_path / "configs/m/model_info.json")
    assert config.work_dir == str(tmp_path / "elsewhere/scratch")


def test_saved_settings_read_back_as_the_same_settings(tmp_path):
    config = load_config(overrides={"threshold": 0.7, "participant_label": ["01", "02"],
                                    "plugin": "slurm-array",
                                    "slurm": {"cpus": 4, "task_command": "apptainer exec x.sif"
                                              " cmb-workflow"}})
    saved = save_settings(config, tmp_path / "settings.yml")
    assert "# probability strictly above this is lesion\nthreshold: 0.7\n" in saved.read_text()
    assert load_config(saved) == config


def test_a_flat_folder_gets_the_expected_layout_and_what_was_seen(tmp_path):
    touch(tmp_path / "patient1_swi.nii.gz")
    with pytest.raises(InputError, match=r"sub-<label>/\[ses-<label>/\]anat/.*seen but not "
                                         r"used: patient1_swi.nii.gz.*--input-type standard"):
        find_images(tmp_path)


def test_files_named_outside_bids_are_listed_as_skipped_with_the_reason(tmp_path):
    touch(tmp_path / "sub-01/anat/sub-01_swi.nii.gz")
    touch(tmp_path / "sub-02/anat/sub-02_acq-my scan_swi.nii.gz")
    touch(tmp_path / "sub-03/anat/sub-03_acq-\u00e9t\u00e9_swi.nii.gz")
    touch(tmp_path / "sub-03/anat/sub-03_acq-x y_T1w.nii.gz")  # not an image this tool reads
    jobs, rejected = find_images(tmp_path)
    assert [job.prefix for job in jobs] == ["sub-01"]
    assert [(Path(r.source).name, r.status) for r in rejected] == [
        ("sub-02_acq-my scan_swi.nii.gz", "skipped"), ("sub-03_acq-\u00e9t\u00e9_swi.nii.gz", "skipped")]
    assert all("letters and digits" in r.reason for r in rejected)
