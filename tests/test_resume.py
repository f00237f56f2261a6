"""A run killed midway (SIGKILL) and started again with the same work directory resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import result_digests

from cmb_workflow.cli import main
from cmb_workflow.runner import predicted_before

# Whole pipelines, registrations or full-size predictions: the full suite only.
pytestmark = pytest.mark.slow


def finished_nodes(work):
    """Result file -> mtime, for every node whose run completed (its hash file is final)."""
    return {result: result.stat().st_mtime_ns for result in sorted(work.rglob("result_*.pklz"))
            if [h for h in result.parent.glob("_0x*.json") if not h.stem.endswith("_unfinished")]
            # These two always run: they record this run's results.
            and not {"handoff", "write_derivatives"} & set(result.parts)}


def test_killed_run_resumes_without_recomputing_and_gives_identical_outputs(
        study, h5_models, multiproc_run, tmp_path):
    out = tmp_path / "cmb"
    args = ["run", str(study), str(out), "--models", str(h5_models)]
    command = Path(sys.executable).parent / "cmb-workflow"
    with open(tmp_path / "killed.log", "w") as log:
        # Its own process group: the kill takes the MultiProc workers and forkserver along.
        process = subprocess.Popen([str(command), *args, "--plugin", "MultiProc", "--nprocs", "2"],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not list((out / "work").glob("preprocess/*/normalize/result_normalize.pklz")):
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no image was normalised in 10 minutes"
                time.sleep(0.2)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert not (out / "cmb_summary.tsv").exists(), "the run finished before it was killed"
    finished = finished_nodes(out / "work")
    assert finished

    # In-process and serial: the same work directory resumes whatever the plugin.
    assert main([*args, "--plugin", "Linear"]) == 0
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert result_digests(out) == result_digests(multiproc_run)

    # Once every image succeeded, --clean-work leaves only the work folder's lock file.
    assert main([*args, "--plugin", "Linear", "--clean-work"]) == 0
    assert [path.name for path in (out / "work").iterdir()] == [".cmb-workflow.lock"]
    assert result_digests(out) == result_digests(multiproc_run)


def descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_sigterm_stops_every_worker_and_the_run_resumes_from_another_folder_with_relative_paths(
        study, h5_models, multiproc_run, tmp_path):
    import psutil

    out = tmp_path / "cmb"
    command = Path(sys.executable).parent / "cmb-workflow"
    # Relative IN, OUT and --models, from another working folder.
    args = ["run", os.path.relpath(study, tmp_path), "cmb",
            "--models", os.path.relpath(h5_models, tmp_path)]
    with open(tmp_path / "stopped.log", "w") as log:
        process = subprocess.Popen([str(command), *args, "--plugin", "MultiProc", "--nprocs", "2"],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        workers: set[int] = set()
        try:
            deadline = time.monotonic() + 600
            while not list((out / "work").glob("preprocess/*/normalize/result_normalize.pklz")):
                assert process.poll() is None, (tmp_path / "stopped.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no image was normalised in 10 minutes"
                workers |= descendants(process.pid)
                time.sleep(0.2)
            workers |= descendants(process.pid)
            process.send_signal(signal.SIGTERM)  # the main process only, as `kill PID` does
            assert process.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            if process.poll() is None:
                process.kill()
    assert workers, "MultiProc started no worker"
    alive = [pid for pid in workers if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after SIGTERM: {alive}"
    assert "run the same command again to resume" in (tmp_path / "stopped.log").read_text()

    resumed = subprocess.run([str(command), *args, "--plugin", "Linear"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert result_digests(out) == result_digests(multiproc_run)


def test_a_finished_study_is_seen_as_predicted_and_a_new_batch_is_not(multiproc_run):
    # The study's images fit one batch; a re-run then loads no model ahead of preprocessing.
    assert predicted_before(multiproc_run / "work", ["batch_0000"])
    assert not predicted_before(multiproc_run / "work", ["batch_0000", "batch_0001"])
