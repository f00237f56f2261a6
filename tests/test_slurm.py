"""`cmb-workflow run` through a real one-node SLURM cluster (tests/slurm_cluster.py)."""

import shutil

import pytest
import yaml
from helpers import assert_same_results, read_tsv

from cmb_workflow.cli import main

# Whole pipelines, registrations or full-size predictions: the full suite only.
pytestmark = pytest.mark.slow


def slurm_config(path, **slurm):
    settings = {"memory": "1000M", "predict_memory": "2500M", "gpu": False, **slurm}
    path.write_text(yaml.safe_dump({"slurm": settings}))
    return path


def test_run_through_slurm_matches_multiproc(study, h5_models, multiproc_run, slurm_cluster,
                                             tmp_path, caplog, monkeypatch):
    # As on CI: no login shell, so no LOGNAME (Nipype's SLURM plugin names jobs after it).
    monkeypatch.delenv("LOGNAME", raising=False)
    out = tmp_path / "cmb"
    before = slurm_cluster.completed_job_ids()
    caplog.set_level("INFO", logger="cmb_workflow")
    assert main(["run", str(study), str(out), "--models", str(h5_models), "--plugin", "SLURM",
                 "--config", str(slurm_config(tmp_path / "slurm.yml"))]) == 0
    assert_same_results(out, multiproc_run)

    ran = slurm_cluster.completed_job_ids() - before
    job_logs = {int(p.name[len("slurm-"):-len(".out")])
                for p in (out / "logs" / "slurm").glob("slurm-*.out")}
    assert job_logs == ran
    # Per image conform, register_template (the regions need it also with a supplied mask),
    # brain_mask, crop, normalize, lesions, mimics, regions, to_native, qc and report; one
    # prediction job for the batch of three. Handoff and write_derivatives run in the CLI's own
    # process.
    assert len(ran) == 3 * 11 + 1
    jobs = slurm_cluster.jobs()
    memory = {jobs[job]["JobName"].rsplit(".", 1)[0]: jobs[job]["MinMemoryNode"] for job in ran}
    assert memory.pop("predict.batch_0000.predict") == "2500M"
    assert set(memory.values()) == {"1000M"}
    # Nipype's status callback gives the progress lines under SLURM too.
    assert "sub-02_ses-1: normalize done" in caplog.text
    assert "sub-01, sub-02_ses-1, sub-03: predict done" in caplog.text
    assert "preprocessing: 3 of 3 images done" in caplog.text
    assert "prediction and results: 3 of 3 images done" in caplog.text


def test_gpu_request_the_cluster_cannot_meet_stops_the_run_with_one_line(
        study, h5_models, slurm_cluster, tmp_path, capsys):
    config = slurm_config(tmp_path / "gpu.yml", gpu=True)
    assert main(["run", str(study), str(tmp_path / "o"), "--models", str(h5_models),
                 "--plugin", "SLURM", "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--gres=gpu:1" in error and "slurm.gpu: false" in error
    assert not (tmp_path / "o").exists(), "nothing is written before the request is accepted"


def test_slurmgraph_run_waits_for_its_jobs_and_isolates_a_failure(
        study, h5_models, multiproc_run, slurm_cluster, tmp_path):
    # One good image and one that fails at its first job, whose dependent jobs then never start.
    good = "sub-03/anat/sub-03_swi.nii.gz"
    (tmp_path / "in" / good).parent.mkdir(parents=True)
    shutil.copyfile(study / good, tmp_path / "in" / good)
    broken = tmp_path / "in/sub-09/anat/sub-09_swi.nii.gz"
    broken.parent.mkdir(parents=True)
    broken.write_text("not an image\n")
    out = tmp_path / "cmb"
    before = slurm_cluster.completed_job_ids()
    assert main(["run", str(tmp_path / "in"), str(out), "--models", str(h5_models),
                 "--plugin", "SLURMGraph",
                 "--config", str(slurm_config(tmp_path / "slurm.yml"))]) == 1

    rows = {row["subject"]: row for row in read_tsv(out / "cmb_summary.tsv")}
    assert rows["03"]["status"] == "ok"
    assert rows["09"]["status"] == "failed" and "cannot be read as NIfTI" in rows["09"]["message"]
    assert_same_results(out / "sub-03", multiproc_run / "sub-03")
    ran = slurm_cluster.completed_job_ids() - before
    job_logs = {int(p.name[len("slurm-"):-len(".out")])
                for p in (out / "logs" / "slurm").glob("slurm-*.out")}
    # Every job of the run ran through SLURM, and no job of it is left in the queue.
    assert ran and ran <= job_logs
    assert not [job for job in slurm_cluster.jobs().values() if job["JobState"] == "PENDING"]
