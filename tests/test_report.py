"""Reports: the model named on every page, QC against limits, count bands and lesion grades, MNI
coordinates, clinical display conventions, determinism, and layout in a real browser."""

import html
import json
import re
import shutil
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest

from cmb_workflow.demo import demo_model_descriptor
from cmb_workflow.interfaces.lesions import label_lesions
from cmb_workflow.interfaces.qc import QC_METRICS, quality_flags
from cmb_workflow.interfaces.report import SubjectReport, qc_rows
from cmb_workflow.configs import defaults
from cmb_workflow.reporting import cmb_count_band, model_summary, write_index
from cmb_workflow.runner import QC_COLUMNS, SUMMARY_COLUMNS

LIMITS = defaults()["qc"]
GOOD_QC = {"brain_volume_ml": 1400.0, "mask_fov_edge_fraction": 0.0,
           "brain_outside_crop_fraction": 0.0, "saturated_fraction": 0.01, "dark_fraction": 0.02,
           "n_clusters": 1, "largest_cluster_mm3": 6.0, "template_brain_dice": 0.9,
           "registration_error": ""}


@pytest.mark.parametrize("n, band", [(0, "0"), (1, "1"), (2, "2-4"), (4, "2-4"), (5, "5-9"),
                                     (9, "5-9"), (10, ">=10"), (250, ">=10"), ("3", "2-4")])
def test_cmb_count_band(n, band):
    assert cmb_count_band(n) == band


def test_lesions_are_definite_from_a_peak_of_0_9():
    probability = np.zeros((10, 10, 10), np.float32)
    probability[2, 2, 2] = 0.9
    probability[7, 7, 7:9] = [0.89, 0.7]
    _, rows = label_lesions(probability, np.eye(4), 0.5, 26, 1)
    assert [(row["max_prob"], row["confidence"]) for row in rows] == [(0.89, "possible"),
                                                                       (0.9, "definite")]


def test_qc_metrics_describe_every_qc_column_and_give_its_limit_unit_and_result():
    assert tuple(QC_METRICS) == QC_COLUMNS[4:-1]
    assert quality_flags(GOOD_QC, LIMITS) == []
    bad = {**GOOD_QC, "brain_volume_ml": 500.0, "dark_fraction": 0.3, "saturated_fraction": 0.2,
           "template_brain_dice": None}
    assert quality_flags(bad, LIMITS) == ["brain_volume_out_of_range",
                                          "unusual_intensity_histogram", "registration_failure"]
    rows = {row["label"]: row for row in qc_rows({**bad, "qc_flags": []}, LIMITS)}
    assert rows["Brain volume (native mask)"] == {
        "label": "Brain volume (native mask)", "value": "500.0 mL", "limit": "800 mL to 2200 mL",
        "passed": False, "flag": "brain_volume_out_of_range"}
    dark = rows["Brain voxels below a tenth of the ceiling"]
    assert (dark["value"], dark["limit"], dark["passed"]) == ("30.00 %", "≤ 25.00 %", False)
    dice = rows["Registered template brain vs. mask (Dice)"]
    assert (dice["value"], dice["limit"], dice["passed"]) == ("not measured", "≥ 0.75", False)
    assert rows["Template registration error"]["passed"] and rows["Lesions found"]["passed"]


def write_descriptor(folder, **fields):
    (folder / "fold0.h5").write_bytes(b"weights")
    path = folder / "model_info.json"
    path.write_text(json.dumps({"version": "7", "files": [{"name": "fold0.h5", "md5": "abc123"}],
                                **fields}))
    return path


def test_the_demo_model_and_models_marked_not_for_clinical_use_get_a_warning(tmp_path):
    demo = model_summary(demo_model_descriptor())
    assert demo["warning"].startswith("DEMO MODEL") and demo["version"] == "demo-4"
    assert [f["md5"] for f in demo["files"]] == ["aa43fd83ebaf038aa1033f455e37a4c3",
                                                 "1d157c78933218ab6c685439c98f1d42"]
    marked = model_summary(write_descriptor(tmp_path, description="Research model. Not for "
                                                                  "clinical use."))
    assert "NOT for clinical use" in marked["warning"]
    plain = model_summary(write_descriptor(tmp_path, name="SWI-CMB"))
    assert plain["warning"] is None and plain["name"] == "SWI-CMB"


def test_to_template_undoes_the_transforms_that_warp_the_template_onto_the_image(tmp_path):
    """A blob at a known template point, warped onto an image grid, lands where to_template
    takes back to that point."""
    import ants

    from cmb_workflow.registration import to_template, warp_to_subject

    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3,
        matrix=np.array([[0.95, 0.1, 0.0], [-0.05, 1.05, 0.0], [0.0, 0.0, 1.0]]),
        translation=(6.0, -4.0, 3.0))
    path = str(tmp_path / "template_to_subject_0GenericAffine.mat")
    ants.write_transform(transform, path)
    template = np.zeros((60, 60, 60), np.float32)
    template[40:43, 20:23, 30:33] = 1.0  # centred on voxel (41, 21, 31)
    template_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    template_affine[:3, 3] = -30.0
    reference = tmp_path / "subject.nii.gz"
    subject_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    subject_affine[:3, 3] = [-35.0, -32.0, -28.0]
    nib.save(nib.Nifti1Image(np.zeros((70, 70, 70), np.float32), subject_affine), reference)
    warped = warp_to_subject(nib.Nifti1Image(template, template_affine), reference, [path])
    data = warped.get_fdata()
    centre = np.indices(data.shape).reshape(3, -1) @ data.ravel() / data.sum()
    subject_point = subject_affine[:3, :3] @ centre + subject_affine[:3, 3]
    expected = template_affine[:3, :3] @ [41, 21, 31] + template_affine[:3, 3]
    np.testing.assert_allclose(to_template([subject_point], [path])[0], expected, atol=0.3)
