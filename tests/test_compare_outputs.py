"""scripts/compare_outputs.py: what it sets aside between runs, and what it reports."""

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import compare_outputs


def write_outputs(root, *, voxel=0.0, affine_shift=0.0, volume="12.5", extra_key=False):
    """A miniature output folder, with everything that legitimately differs per run."""
    anat = root / "results" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[0, 3] += affine_shift
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = 0.75 + voxel
    nib.save(nib.Nifti1Image(data, affine), anat / "sub-01_desc-cmb_probseg.nii.gz")
    source = root / "phantoms" / "sub-01_swi.nii.gz"
    (root / "results" / "cmb_summary.tsv").write_text(
        f"subject\tsource\ttotal_volume_mm3\n01\t{source}\t{volume}\n")
    sidecar = {"Sources": [str(source)], "n_cmb": 1, **({"new": 1} if extra_key else {})}
    (anat / "sub-01_desc-cmb_qc.json").write_text(json.dumps(sidecar))
    (root / "results" / "sub-01_report.html").write_text(
        "<p>/opt/checkout/cmb_workflow/data/demo_model/model_info.json</p>\n"
        f"<h2>Command line</h2><pre>cmb-workflow demo {root} --seed 4</pre>\n")
    for folder in ("logs", "work"):
        (root / "results" / folder).mkdir()
        (root / "results" / folder / f"{root.name}.log").write_text(f"{root.name} took 3 s\n")


def compare(tmp_path, capsys, **changes):
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b", **changes)
    status = compare_outputs.main([str(tmp_path / "a"), str(tmp_path / "b")])
    return status, capsys.readouterr().out


def test_runs_in_other_folders_and_checkouts_compare_the_same(tmp_path, capsys):
    status, printed = compare(tmp_path, capsys)
    assert status == 0, printed
    assert printed.splitlines()[-1] == "0 of 4 files differ"


@pytest.mark.parametrize("changes, verdict", [
    ({"voxel": 0.25}, "anat/sub-01_desc-cmb_probseg.nii.gz: 1 voxels differ, by up to 0.25"),
    ({"affine_shift": 0.5}, "anat/sub-01_desc-cmb_probseg.nii.gz: affine differs by up to 0.5"),
    ({"volume": "12.6"}, "cmb_summary.tsv: line 2, columns total_volume_mm3"),
    ({"extra_key": True}, "anat/sub-01_desc-cmb_qc.json: key /new in one file only"),
])
def test_any_difference_is_reported_and_fails(tmp_path, capsys, changes, verdict):
    status, printed = compare(tmp_path, capsys, **changes)
    assert status == 1
    different = [line for line in printed.splitlines() if line.startswith("DIFFERENT")]
    assert len(different) == 1 and different[0].endswith(verdict), printed


def test_a_file_in_one_folder_only_is_a_difference(tmp_path, capsys):
    write_outputs(tmp_path / "a")
    write_outputs(tmp_path / "b")
    (tmp_path / "b" / "results" / "new.tsv").write_text("n\n")
    assert compare_outputs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert f"DIFFERENT  results/new.tsv: only in {tmp_path / 'b'}" in capsys.readouterr().out
