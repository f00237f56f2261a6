"""`cmb-workflow run` end to end on a small BIDS tree, as a user runs it."""

import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from helpers import grid_affine, make_head, save

from cmb_workflow.cli import main

# prefix -> (relative path, shape, voxel size, axis codes, rotation, dtype, FOV centre, blobs)
SUBJECTS = {
    "sub-01": ("sub-01/anat/sub-01_swi.nii.gz", (340, 400, 75), (0.5, 0.5, 2.0), "LPS",
               (8, 0, -6), np.int16, (0, 5, 10), [(20, 30, 25), (-30, -10, 0)]),
    "sub-02_ses-1": ("sub-02/ses-1/anat/sub-02_ses-1_T2starw.nii.gz", (140, 176, 150),
                     (1.2, 1.1, 1.0), "PIR", (0, 0, 0), np.float32, (0, 5, 10), [(0, 0, 0)]),
    # The field of view stops 5 mm below the top of the brain.
    "sub-03": ("sub-03/anat/sub-03_swi.nii.gz", (160, 200, 150), (1.0, 1.0, 1.0), "RAS",
               (0, 0, 0), np.int16, (0, 0, -20), [(-15, 20, -10)]),
}


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    for prefix, (relative, shape, zooms, axcodes, rotation, dtype, centre, blobs) in SUBJECTS.items():
        affine = grid_affine(zooms, shape, axcodes=axcodes, rotation_deg=rotation, centre=centre)
        image, mask = make_head(shape, affine, blobs, dtype=dtype)
        save(image, root / relative)
        if prefix == "sub-02_ses-1":
            save(mask, root / relative.replace("_T2starw", "_desc-brain_mask"))
    # Truncated file: it must fail alone.
    broken = root / "sub-04/anat/sub-04_swi.nii.gz"
    broken.parent.mkdir(parents=True)
    broken.write_bytes((root / SUBJECTS["sub-03"][0]).read_bytes()[:5000])
    return root


@pytest.fixture(scope="module")
def h5_run(bids, h5_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "cmb"
    argv = ["run", str(bids), str(out), "--models", str(h5_models), "--plugin", "Linear"]
    return argv, out, main(argv)


def read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def digests(out):
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and "work" not in p.parts
            and "logs" not in p.parts}


def test_every_image_gets_native_maps_and_blobs_are_found(bids, h5_run):
    _, out, exit_code = h5_run
    assert exit_code == 1  # sub-04 failed, the others did not
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
    failed = rows["sub-04_swi.nii.gz"]
    assert failed["status"] == "failed"
    assert "sub-04_swi.nii.gz" in failed["message"] and "\n" not in failed["message"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "cmb-workflow"
    assert not list(out.rglob(".*.nii.gz*")), "temporary files left behind"


def test_rerun_recomputes_nothing_and_gives_identical_outputs(h5_run):
    argv, out, _ = h5_run
    before = digests(out)
    results = sorted((out / "work").rglob("result_*.pklz"))
    # Failed steps (sub-04) are retried by design; finished ones must not be.
    stamps = {p: p.stat().st_mtime_ns for p in results
              if "write_derivatives" not in p.parts and "sub_04" not in p.parts}
    assert any("predict" in p.parts for p in stamps)
    assert main(argv) == 1
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert digests(out) == before


def test_savedmodel_ensemble_under_multiproc_matches_h5(bids, h5_run, savedmodel_models,
                                                        tmp_path):
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
