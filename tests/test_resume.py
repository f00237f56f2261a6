"""A run killed midway (SIGKILL) and started again with the same work directory resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import result_digests

from cmb_workflow.cli import main


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
