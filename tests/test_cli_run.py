"""`cmb-workflow run` end to end on a small BIDS tree, as a user runs it."""

import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from helpers import (SUBJECTS, grid_affine, make_head, read_tsv, result_digests, save,
                     write_study)

from cmb_workflow.cli import main
from cmb_workflow.networks import build_unet, keras_module, save_fold, write_descriptor

# Whole pipelines, registrations or full-size predictions: the full suite only.
pytestmark = pytest.mark.slow

# Images that must fail alone: subject -> (file that the reason names, words of the reason).
BAD_SUBJECTS = {
    "04": ("sub-04_swi.nii.gz", "cannot be read as NIfTI"),  # truncated
    "05": ("sub-05_swi.nii.gz", "cannot be read as NIfTI"),  # not a NIfTI at all
    "06": ("sub-06_swi.nii.gz", "is 2D"),
    "07": ("sub-07_swi.nii.gz", "is 5D"),
    "08": ("sub-08_swi.nii.gz", "all NaN"),
    "09": ("sub-09_swi.nii.gz", "constant"),
    "10": ("sub-10_desc-brain_mask.nii.gz", "empty"),
    "11": ("sub-11_desc-brain_mask.nii.gz", "overlap"),  # the mask lies 1 m away
}


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    root = write_study(tmp_path_factory.mktemp("study"))

    def bad(label, suffix="swi"):
        path = root / f"sub-{label}/anat/sub-{label}_{suffix}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    bad("04").write_bytes((root / SUBJECTS["sub-03"][0]).read_bytes()[:5000])
    bad("05").write_text("not an image\n")
    nib.save(nib.Nifti1Image(np.ones((64, 64), np.float32), np.eye(4)), bad("06"))
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16, 1, 2), np.float32), np.eye(4)), bad("07"))
    nib.save(nib.Nifti1Image(np.full((32, 32, 32), np.nan, np.float32), np.eye(4)), bad("08"))
    nib.save(nib.Nifti1Image(np.full((32, 32, 32), 100, np.int16), np.eye(4)), bad("09"))
    # Good small heads with unusable masks.
    shape = (48, 60, 48)
    affine = grid_affine((3.5, 3.5, 3.5), shape)
    for label in ("10", "11"):
        image, mask = make_head(shape, affine)
        save(image, bad(label))
        if label == "10":
            mask = nib.Nifti1Image(np.zeros(shape, np.uint8), affine)
        else:
            moved = affine.copy()
            moved[:3, 3] += 1000.0
            mask = nib.Nifti1Image(np.asarray(mask.dataobj), moved)
        save(mask, bad(label, "desc-brain_mask"))
    return root


@pytest.fixture(scope="module")
def h5_run(bids, h5_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "cmb"
    # MultiProc, the default plugin, on this study's 3 good and 8 bad images; Linear is run
    # by the resume and failing-batch tests.
    argv = ["run", str(bids), str(out), "--models", str(h5_models), "--plugin", "MultiProc",
            "--nprocs", "2"]
    return argv, out, main(argv)


def test_every_image_gets_native_maps_and_blobs_are_found(bids, h5_run):
    _, out, exit_code = h5_run
    assert exit_code == 1  # the bad subjects failed, the others did not
    for prefix, (relative, shape, *_rest, blobs) in SUBJECTS.items():
        source = nib.load(bids / relative)
        anat = out / relative.rsplit("/", 1)[0]
        probseg = nib.load(anat / f"{prefix}_desc-cmb_probseg.nii.gz")
        dseg = nib.load(anat / f"{prefix}_desc-cmb_dseg.nii.gz")
        mask = nib.load(anat / f"{prefix}_desc-brain_mask.nii.gz")
        for img in (probseg, dseg, mask):
            assert img.shape == source.shape
            np.testing.assert_allclose(img.affine, source.affine, atol=1e-4)
        probability = probseg.get_fdata()
        assert probseg.get_data_dtype() == np.float32
        assert 0 <= probability.min() and probability.max() <= 1
        rows = read_tsv(anat / f"{prefix}_desc-cmb_lesions.tsv")
        assert len(rows) == len(blobs), prefix
        found = np.array([[float(r[c]) for c in "xyz"] for r in rows])
        for blob in blobs:
            assert np.linalg.norm(found - blob, axis=1).min() < 2.0, (prefix, blob, found)
        # Native label numbers are those of the table.
        assert set(np.unique(dseg.get_fdata()).astype(int)) - {0} == {int(r["label"]) for r in rows}
        sidecar = json.loads((anat / f"{prefix}_desc-cmb_lesions.json").read_text())
        assert sidecar["x"]["Units"] == "mm"


def test_summary_and_dataset_description(h5_run):
    _, out, _ = h5_run
    rows = {row["source"].rsplit("/", 1)[1]: row for row in read_tsv(out / "cmb_summary.tsv")}
    assert rows["sub-01_swi.nii.gz"]["status"] == "ok"
    assert rows["sub-01_swi.nii.gz"]["n_cmb"] == "2"
    assert rows["sub-02_ses-1_T2starw.nii.gz"]["session"] == "1"
    assert sum(row["status"] == "failed" for row in rows.values()) == len(BAD_SUBJECTS)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "cmb-workflow"
    assert not list(out.rglob(".*.nii.gz*")), "temporary files left behind"


def test_workers_write_their_lines_to_the_run_log(h5_run):
    """MultiProc's workers (forked from a forkserver, worker_logging) write Nipype's lines of
    every step to the run's log, both graphs' steps."""
    _, out, _ = h5_run
    lines = [line for run_log in (out / "logs").glob("cmb-workflow_*.log")
             for line in run_log.read_text().splitlines()]
    for step in ("conform", "predict", "report"):
        assert any("[Node] Setting-up" in line and f".{step}\"" in line for line in lines), step


def test_lesion_regions_qc_and_summary_columns(h5_run):
    _, out, _ = h5_run
    rows = read_tsv(out / "sub-01/anat/sub-01_desc-cmb_lesions.tsv")
    assert all(row["mars_class"] in ("lobar", "deep", "infratentorial") for row in rows)
    assert all(row["hemisphere"] in ("left", "right") for row in rows)
    # The test heads' lesions are round, isolated dark blobs: microbleeds, not mimics.
    assert all(row["likely_mimic"] == "no" and float(row["mimic_score"]) < 0.5 for row in rows)
    sidecar = json.loads((out / "sub-01/anat/sub-01_desc-cmb_lesions.json").read_text())
    assert set(rows[0]) <= set(sidecar)
    summary = {row["subject"]: row for row in read_tsv(out / "cmb_summary.tsv")}
    ok = summary["01"]
    assert ok["n_likely_mimic"] == "0"
    assert int(ok["n_lobar"]) + int(ok["n_deep"]) + int(ok["n_infratentorial"]) == 2
    assert ok["strictly_lobar"] in ("yes", "no")
    assert "qc_flags" in ok and summary["04"]["qc_flags"] == ""
    # sub-03's field of view stops 5 mm below the top of the brain.
    assert "brain_cut_by_fov" in summary["03"]["qc_flags"]
    qc = {row["subject"]: row for row in read_tsv(out / "qc.tsv")}
    assert set(qc) == {"01", "02", "03"} and float(qc["01"]["template_brain_dice"]) > 0.75


def test_reports_render_in_headless_chromium(h5_run, tmp_path):
    _, out, _ = h5_run
    report = out / "sub-01_report.html"
    index = out / "index.html"
    text = report.read_text()
    # Overview, axial mosaic and one thumbnail per lesion, all embedded; the lesion table.
    assert text.count('<img src="data:image/png;base64,') == 2 + 2
    assert "<table" in text and "fold0.h5" in text and "cmb-workflow run" in text
    assert "sub-01_report.html" in index.read_text() and "sub-04_swi.nii.gz" in index.read_text()
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing; CI installs it (containers/install.sh)")
        pytest.skip("chromium is not installed")
    import matplotlib.image

    # Text alone covers about 1 % of a page; the report's figures (dark backgrounds) far more.
    for page, least_drawn in ((report, 0.08), (index, 0.03)):
        png = tmp_path / f"{page.stem}.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--screenshot={png}", "--window-size=1300,2400",
                        page.as_uri()], check=True, capture_output=True, timeout=120)
        pixels = matplotlib.image.imread(png)[..., :3]
        drawn = (pixels.min(axis=-1) < 0.9).mean()
        assert drawn > least_drawn, (page.name, drawn)
        shutil.copy(png, out / "logs" / png.name)  # to look at after the run


def test_rerun_recomputes_nothing_and_gives_identical_outputs(h5_run):
    argv, out, _ = h5_run
    before = result_digests(out)
    results = sorted((out / "work").rglob("result_*.pklz"))
    # Failed steps are retried by design, the last steps of a phase always run; finished ones
    # must not be.
    retried = {f"sub_{label}" for label in BAD_SUBJECTS} | {"write_derivatives", "handoff"}
    stamps = {p: p.stat().st_mtime_ns for p in results if not retried & set(p.parts)}
    assert any("predict" in p.parts for p in stamps)
    assert main(argv) == 1
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert result_digests(out) == before


def test_savedmodel_ensemble_matches_h5(bids, h5_run, savedmodel_models, tmp_path):
    _, h5_out, _ = h5_run
    out = tmp_path / "cmb"
    exit_code = main(["run", str(bids), str(out), "--models", str(savedmodel_models),
                      "--participant-label", "02", "--plugin", "MultiProc", "--nprocs", "2"])
    assert exit_code == 0
    name = "sub-02/ses-1/anat/sub-02_ses-1_desc-cmb_probseg.nii.gz"
    np.testing.assert_allclose(nib.load(out / name).get_fdata(),
                               nib.load(h5_out / name).get_fdata(), atol=1e-5)


def test_tampered_model_stops_the_run_with_one_line(bids, h5_models, tmp_path, capsys):
    info = json.loads(h5_models.read_text())
    info["files"][1]["md5"] = "f" * 32
    tampered = h5_models.parent / "model_info_bad.json"
    tampered.write_text(json.dumps(info))
    assert main(["run", str(bids), str(tmp_path / "o"), "--models", str(tampered)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "fold1.h5" in error and "does not match" in error


@pytest.mark.parametrize("label", sorted(BAD_SUBJECTS))
def test_a_bad_image_fails_alone_with_a_one_line_reason(h5_run, label):
    _, out, _ = h5_run
    named_file, words = BAD_SUBJECTS[label]
    row = next(row for row in read_tsv(out / "cmb_summary.tsv") if row["subject"] == label)
    assert row["status"] == "failed"
    assert named_file in row["message"] and words in row["message"], row["message"]
    assert "\n" not in row["message"]
    # The traceback is in the run's log.
    log = next((out / "logs").glob("cmb-workflow_*.log")).read_text()
    assert f"sub_{label}: crash details" in log
    assert not list(out.glob(f"sub-{label}/anat/*")), "a failed image left results"


def test_a_failing_prediction_batch_fails_each_of_its_images(tmp_path):
    # A real model that does not fit the data: it wants two channels, the images have one.
    K = keras_module("h5")
    model = build_unet(K, input_shape=(160, 214, 176, 2), base_filters=2, levels=2)
    models = tmp_path / "models"
    descriptor = write_descriptor(models, [save_fold(model, models, "fold0", "h5")],
                                  preprocessing="cmb-workflow-1")
    shape = (48, 60, 48)
    affine = grid_affine((3.5, 3.5, 3.5), shape)
    for label in ("1", "2"):
        save(make_head(shape, affine, seed=int(label))[0],
             tmp_path / f"in/sub-{label}/anat/sub-{label}_swi.nii.gz")
    assert main(["run", str(tmp_path / "in"), str(tmp_path / "out"), "--models", str(descriptor),
                 "--plugin", "Linear"]) == 1
    rows = read_tsv(tmp_path / "out/cmb_summary.tsv")
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert rows[0]["message"] == rows[1]["message"]
    assert "fold0.h5" in rows[0]["message"] and "\n" not in rows[0]["message"]
