"""`cmb-workflow run --plugin slurm-array` on a real one-node SLURM cluster
(tests/slurm_cluster.py): throttled job arrays, a failing image, a cancelled task resubmitted,
and the same results as a MultiProc run."""

import json
import subprocess
import time

import pytest
import yaml
from helpers import SMALL_HEADS_BOX, assert_same_results, read_tsv, write_small_heads
from model_builders import build_dark_voxel_detector

from cmb_workflow.cli import main
from cmb_workflow.networks import keras_module, save_fold, write_descriptor
from cmb_workflow.slurm import queue

# Whole pipelines: the full suite only.
pytestmark = pytest.mark.slow

IMAGES = 10
THROTTLE = 3
KILLED = 4  # the preprocessing task cancelled while it runs: sub-05


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """Nine small heads and one file that is not an image."""
    root = write_small_heads(tmp_path_factory.mktemp("study10"), IMAGES - 1)
    broken = root / f"sub-{IMAGES}/anat/sub-{IMAGES}_swi.nii.gz"
    broken.parent.mkdir(parents=True)
    broken.write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def dark_voxel_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "dark"
    model = build_dark_voxel_detector(keras_module("h5"), input_shape=(*SMALL_HEADS_BOX, 1))
    return write_descriptor(folder, [save_fold(model, folder, "fold0", "h5")],
                            preprocessing="cmb-workflow-1")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "array.yml"
    path.write_text(yaml.safe_dump({
        "final_dimensions": list(SMALL_HEADS_BOX), "predict_batch_size": 4,
        "slurm": {"memory": "1000M", "predict_memory": "1500M", "gpu": False,
                  "array_throttle": THROTTLE}}))
    return path


def wait_for(ids: dict, kill_task: int | None = None, timeout: float = 900) -> tuple[int, bool]:
    """Wait until the submission's jobs have left the queue; returns the most preprocessing
    tasks seen running at once, and whether preprocessing task `kill_task` was cancelled while
    it ran."""
    most, killed = 0, False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [job for job in queue() if job["array_job"] in ids.values()]
        if not jobs:
            return most, killed
        running = [job for job in jobs if job["array_job"] == ids["preprocess"]
                   and job["state"] == "RUNNING"]
        most = max(most, len(running))
        if kill_task is not None and not killed and \
                any(job["array_task"] == str(kill_task) for job in running):
            subprocess.run(["scancel", f"{ids['preprocess']}_{kill_task}"], check=True)
            killed = True
        time.sleep(0.2)
    pytest.fail(f"the jobs {ids} did not end in {timeout} s")


def state_line(state: str, count: int) -> str:
    """A line of `cmb-workflow status`."""
    return f"  {state:<11}{count:>6}"


def submitted(out, capsys) -> tuple[dict, dict]:
    """The newest submission's plan and job ids."""
    printed = capsys.readouterr().out
    assert f"progress: cmb-workflow status {out}" in printed
    plan_dir = max((out / "logs" / "array").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return (json.loads((plan_dir / "plan.json").read_text()),
            json.loads((plan_dir / "jobs.json").read_text()))


def test_job_arrays_throttled_a_failure_a_cancelled_task_resubmitted_and_multiproc_results(
        small_study, dark_voxel_model, config, wide_slurm_cluster, tmp_path, capsys):
    cluster = wide_slurm_cluster
    out = tmp_path / "array"
    argv = ["run", str(small_study), str(out), "--models", str(dark_voxel_model),
            "--config", str(config), "--plugin", "slurm-array"]
    started = time.monotonic()
    assert main(argv) == 0
    assert time.monotonic() - started < 60, "run returns once the jobs are queued"
    plan, ids = submitted(out, capsys)
    assert len(plan["images"]) == IMAGES and len(plan["batches"]) == 3
    most, killed = wait_for(ids, kill_task=KILLED)
    assert killed, f"preprocessing task {KILLED} was never seen running"
    # The throttle, not the node's 6 CPUs, kept the tasks running at once to 3.
    assert 2 <= most <= THROTTLE
    jobs = cluster.jobs()
    tasks = [job for job in jobs.values() if job.get("ArrayJobId") == ids["preprocess"]]
    assert len(tasks) == IMAGES and {job["ArrayTaskThrottle"] for job in tasks} == {"3"}
    # Three sbatch calls: the two arrays and the summary job.
    mine = [job for job in jobs.values() if job.get("Comment") == plan["submission"]]
    assert {job.get("ArrayJobId", job["JobId"]) for job in mine} == set(ids.values())

    rows = {row["subject"]: row for row in read_tsv(out / "cmb_summary.tsv")}
    assert len(rows) == IMAGES
    assert rows[f"{IMAGES}"]["status"] == "failed"
    assert "cannot be read as NIfTI" in rows[f"{IMAGES}"]["message"]
    assert rows["05"]["status"] == "failed"
    assert "preprocess task ended before finishing" in rows["05"]["message"]
    assert [label for label, row in rows.items() if row["status"] == "ok"] == \
        [f"{n:02d}" for n in range(1, IMAGES) if n != KILLED + 1]
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert state_line("done", IMAGES - 2) in status and state_line("failed", 2) in status

    # The same command again submits only the two failed images, in the same work folder.
    assert main(argv) == 0
    plan, ids = submitted(out, capsys)
    assert [image["source"].rsplit("/", 1)[1] for image in plan["images"]] == \
        ["sub-05_swi.nii.gz", f"sub-{IMAGES}_swi.nii.gz"]
    wait_for(ids)
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert state_line("done", IMAGES - 1) in status and state_line("failed", 1) in status

    reference = tmp_path / "multiproc"
    assert main(["run", str(small_study), str(reference), "--models", str(dark_voxel_model),
                 "--config", str(config), "--plugin", "MultiProc", "--nprocs", "2"]) == 1
    assert_same_results(out, reference)
    # summarize rebuilds the same files from the recorded rows.
    digests = {name: (out / name).read_bytes() for name in ("cmb_summary.tsv", "qc.tsv",
                                                            "index.html")}
    assert main(["summarize", str(out)]) == 0
    assert {name: (out / name).read_bytes() for name in digests} == digests
