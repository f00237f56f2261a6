"""The summary files are rebuilt from every image's recorded row: runs sharing OUT add to them."""

from pathlib import Path

from helpers import read_tsv

from cmb_workflow.bids import ImageJob, Rejected
from cmb_workflow.configs import Settings, results_digest
from cmb_workflow.demo import demo_model_descriptor
from cmb_workflow.summary import read_rows, record_rows, rejected_key, summarize


def job(label: str) -> ImageJob:
    return ImageJob(Path(f"/in/sub-{label}/anat/sub-{label}_swi.nii.gz"), "swi",
                    (("sub", label),))


def test_rows_of_several_runs_make_one_summary_in_image_order_and_summarize_is_idempotent(
        tmp_path):
    model = demo_model_descriptor()
    no_crashes = tmp_path / "crash"
    # A first run: sub-03, and a file it could not use.
    skipped = Rejected("/in/sub-02/anat/sub-02_acq-a b_swi.nii.gz", "bad name", "skipped")
    record_rows(tmp_path, [job("03")], [skipped], no_crashes, {}, {}, model, "d")
    # A second run, sharing OUT: sub-01; then sub-03 again, which replaces its row.
    record_rows(tmp_path, [job("01")], [], no_crashes, {}, {}, model, "d")
    record_rows(tmp_path, [job("03")], [], no_crashes, {}, {}, model, "d")
    rows = summarize(tmp_path)
    assert [row["source"].rsplit("/", 1)[1] for row in rows] == [
        "sub-01_swi.nii.gz", "sub-03_swi.nii.gz", "sub-02_acq-a b_swi.nii.gz"]
    assert [row["status"] for row in read_tsv(tmp_path / "cmb_summary.tsv")] == [
        "failed", "failed", "skipped"]
    files = {name: (tmp_path / name).read_bytes()
             for name in ("cmb_summary.tsv", "qc.tsv", "index.html")}
    summarize(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    # A file rejected once and processed later keeps only its new row.
    renamed = Rejected(str(job("01").source), "bad name", "skipped")
    record_rows(tmp_path, [], [renamed], no_crashes, {}, {}, model, "d")
    record_rows(tmp_path, [job("01")], [], no_crashes, {}, {}, model, "d")
    assert sorted(read_rows(tmp_path)) == sorted(["sub_01", "sub_03",
                                                  rejected_key(skipped.source)])


def test_results_digest_ignores_how_a_run_executes():
    settings = Settings()
    same = settings.replace(plugin="slurm-array", nprocs=3, predict_batch_size=2,
                            participant_label=("01",))
    assert results_digest(same) == results_digest(settings)
    assert results_digest(settings.replace(threshold=0.6)) != results_digest(settings)
