"""Faults a careful tester found: each one reproduced, each one refused or survived cleanly."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import grid_affine, make_head, save

from cmb_workflow.bids import Rejected
from cmb_workflow.cli import main
from cmb_workflow.configs import InputLimits
from cmb_workflow.execution import RunLock, RunLockedError
from cmb_workflow.imageops import ImageError, load_volume
from cmb_workflow.interfaces.brainmask import supplied_mask
from cmb_workflow.interfaces.native import ToNative
from cmb_workflow.models import ModelError, read_descriptor, verify
from cmb_workflow.summary import write_tsv


def small_study(root: Path) -> Path:
    shape = (40, 48, 40)
    image, _mask = make_head(shape, grid_affine((4.0, 4.0, 4.0), shape))
    save(image, root / "sub-01/anat/sub-01_swi.nii.gz")
    (root / "dataset_description.json").write_text('{"Name": "study"}\n')
    return root


def run_main(capsys, *args) -> tuple[int, str]:
    status = main(["run", *map(str, args)])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("out", ["same", "inside", "holds"])
def test_an_out_that_would_write_into_in_is_refused_and_in_is_untouched(tmp_path, capsys, out):
    study = small_study(tmp_path / "study")
    before = {p: p.read_bytes() for p in study.rglob("*") if p.is_file()}
    out_dir = {"same": study, "inside": study / "results", "holds": tmp_path}[out]
    status, err = run_main(capsys, study, out_dir)
    assert status == 2
    assert err.count("\n") == 1 and "input folder" in err
    assert {p: p.read_bytes() for p in study.rglob("*") if p.is_file()} == before


def test_out_under_in_derivatives_is_accepted(tmp_path):
    from cmb_workflow.runner import check_folders

    study = tmp_path / "study"
    check_folders(study, study / "derivatives" / "cmb", study / "derivatives" / "cmb" / "work")


def test_a_fifo_or_a_device_as_model_file_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fold0.h5")
    (tmp_path / "fold1.h5").symlink_to("/dev/zero")
    for name in ("fold0.h5", "fold1.h5"):
        descriptor = tmp_path / f"model_info_{name}.json"
        descriptor.write_text(json.dumps({"files": [{"name": name, "md5": "0" * 32}]}))
        started = time.monotonic()
        with pytest.raises(ModelError, match=f"{name}: not a regular file"):
            verify(read_descriptor(descriptor))
        assert time.monotonic() - started < 5


def test_a_model_folder_holding_a_fifo_is_refused(tmp_path):
    fold = tmp_path / "fold.tf_inference"
    (fold / "variables").mkdir(parents=True)
    (fold / "saved_model.pb").write_bytes(b"x")
    os.mkfifo(fold / "variables" / "pipe")
    descriptor = tmp_path / "model_info.json"
    descriptor.write_text(json.dumps({"files": [{"name": fold.name, "md5": "0" * 32}]}))
    with pytest.raises(ModelError, match="pipe: not a regular file"):
        verify(read_descriptor(descriptor))


@pytest.mark.parametrize("content, problem", [
    ("[]", "a JSON object, not a list"),
    ('{"files": [{"name": 5, "md5": "x"}]}', "needs a 'name' \\(text\\)"),
    ('{"files": [{"name": "m.h5", "md5": 5}]}', "md5 of 'm.h5' must be text"),
    ('{"files": [{"name": "m.h5"}], "modalities": "swi"}', "'modalities' must be a list"),
])
def test_malformed_descriptors_are_refused_in_one_line(tmp_path, content, problem):
    (tmp_path / "m.h5").write_bytes(b"x")
    descriptor = tmp_path / "model_info.json"
    descriptor.write_text(content)
    with pytest.raises(ModelError, match=f"^{descriptor}: .*{problem}"):
        read_descriptor(descriptor)


def lock_holder(folder: Path, shared: bool = False) -> subprocess.Popen:
    """Another process holding RunLock(folder) (locks do not conflict within one process)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from cmb_workflow.execution import RunLock\n"
         f"with RunLock(Path(sys.argv[1]), shared={shared}):\n"
         "    print('locked', flush=True); time.sleep(60)",
         str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_the_same_out_stops_at_once_naming_the_holder(tmp_path):
    holder = lock_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid} on "):
            with RunLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock went with it, although the file stays.
    assert (tmp_path / RunLock.NAME).exists()
    with RunLock(tmp_path):
        pass


def test_slurm_array_tasks_share_out_and_keep_an_ordinary_run_out(tmp_path):
    task = lock_holder(tmp_path, shared=True)
    try:
        with RunLock(tmp_path, shared=True):  # another task
            pass
        with pytest.raises(RunLockedError, match=f"in use by SLURM array tasks .*process "
                                                 f"{task.pid} on "):
            with RunLock(tmp_path):
                pass
    finally:
        task.kill()
        task.wait()
    run = lock_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {run.pid} on "):
            with RunLock(tmp_path, shared=True):
                pass
    finally:
        run.kill()
        run.wait()
    # Tasks starting together all get in, although the first holds it alone a moment.
    racers = [subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from cmb_workflow.execution import RunLock\n"
         "for _ in range(200):\n    with RunLock(Path(sys.argv[1]), shared=True): pass",
         str(tmp_path)]) for _ in range(4)]
    assert [racer.wait(timeout=120) for racer in racers] == [0] * 4


def test_a_header_without_usable_geometry_is_refused(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(None, code=0)
    path = tmp_path / "qform_only.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None, header), path)
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1:4]: nibabel would read 1 mm
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="no usable geometry: no sform, and voxel sizes "
                                         r"\(pixdim\) \[0.0, 0.0, 0.0\]"):
        load_volume(path)


def test_a_nan_affine_is_called_non_finite(tmp_path):
    path = tmp_path / "nan.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    raw[280:284] = np.array([np.nan], "<f4").tobytes()  # srow_x[0]
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="non-finite affine"):
        load_volume(path)


def test_complex_and_rgb_voxels_are_refused_with_their_kind(tmp_path):
    complex_path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.complex64), np.eye(4)), complex_path)
    with pytest.raises(ImageError, match="holds complex voxels.*give the magnitude image"):
        load_volume(complex_path)
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb_path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), rgb_path)
    with pytest.raises(ImageError, match="holds RGB / multi-field voxels"):
        load_volume(rgb_path)


@pytest.mark.parametrize("voxel, shape, problem", [
    ((15.0, 15.0, 15.0), (20, 20, 20), "voxels of \\[15.0, 15.0, 15.0\\] mm"),
    ((1.0, 1.0, 1.0), (512, 256, 256), "field of view \\[512.0, 256.0, 256.0\\] mm"),
])
def test_implausible_grids_are_refused_before_their_voxels_are_read(tmp_path, voxel, shape,
                                                                     problem):
    # Only a header: refusing must not need the voxels (reading them would fail).
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.diag([*voxel, 1])).header
    header.set_data_shape(shape)
    path = tmp_path / "big.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4)
    with pytest.raises(ImageError, match=problem):
        load_volume(path, limits=InputLimits())


def test_a_probability_mask_is_cut_at_one_half(tmp_path):
    affine = np.eye(4)
    values = np.full((10, 10, 10), 0.05, np.float32)
    values[2:8, 2:8, 2:8] = 0.95
    path = save(nib.Nifti1Image(values, affine), tmp_path / "mask.nii.gz")
    mask = supplied_mask(path, nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), affine), "shivai")
    assert mask.sum() == 6 ** 3


def test_native_volumes_come_from_the_affine_not_the_header_pixdims(tmp_path):
    shape = (40, 40, 40)
    reference = nib.Nifti1Image(np.zeros(shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    reference.header["pixdim"][1:4] = 1.0  # wrong on purpose: the sform says 2 mm
    reference_file = tmp_path / "reference.nii"
    nib.save(reference, reference_file)
    assert nib.load(reference_file).header.get_zooms() == (1.0, 1.0, 1.0)
    cube = np.zeros((80, 80, 80), np.uint8)
    cube[20:60, 20:60, 20:60] = 1  # 40 mm wide: 64 mL
    grid = np.eye(4)
    grid[:3, 3] = -0.5
    for name, data in (("mask", cube), ("probability", cube.astype(np.float32)),
                       ("labels", cube.astype(np.int32))):
        nib.save(nib.Nifti1Image(data, grid), tmp_path / f"{name}.nii.gz")
    (tmp_path / "lesions.json").write_text("[]")
    os.chdir(tmp_path)
    result = ToNative(reference=str(reference_file), probability=str(tmp_path / "probability.nii.gz"),
                      labels=str(tmp_path / "labels.nii.gz"),
                      lesion_table=str(tmp_path / "lesions.json"),
                      brain_mask=str(tmp_path / "mask.nii.gz")).run()
    quality = json.loads(Path(result.outputs.brain_mask_quality).read_text())
    assert quality["brain_volume_ml"] == pytest.approx(64.0, rel=0.05)


def test_summary_tsv_is_never_quoted(tmp_path):
    rows = [{"source": 'a "quoted"\tname', "status": "failed", "message": "line one\nline two"}]
    write_tsv(tmp_path / "s.tsv", rows, ("source", "status", "message"))
    assert (tmp_path / "s.tsv").read_text() == \
        'source\tstatus\tmessage\na "quoted" name\tfailed\tline one line two\n'
    assert Rejected("x", "y").status == "failed"


def test_bad_config_and_unwritable_out_give_one_line_and_exit_2(tmp_path, capsys):
    study = small_study(tmp_path / "study")
    bad = tmp_path / "bad.yml"
    bad.write_text("connectivity: 5\n")
    status, err = run_main(capsys, study, tmp_path / "out", "--config", bad)
    assert status == 2 and err == (f"cmb-workflow: error: {bad}: connectivity 5: expected one "
                                   "of 6, 18, 26\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, err = run_main(capsys, study, blocker / "out")
    assert status == 2 and err.count("\n") == 1 and "cannot write there" in err


def preprocessing_workers(pid: int) -> list:
    """The MultiProc workers under process `pid` (the children of its forkserver) running a
    preprocessing step (Nipype runs a step in its folder): not the prediction graph's worker,
    which loads the models meanwhile."""
    import psutil

    workers = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                workers += [worker for worker in child.children()
                            if f"{os.sep}preprocess{os.sep}" in worker.cwd()]
        except psutil.NoSuchProcess:
            pass
    return workers


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_run_ends_with_every_result(
        study, h5_models, multiproc_run, tmp_path):
    from helpers import result_digests

    out = tmp_path / "cmb"
    command = Path(sys.executable).parent / "cmb-workflow"
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen([str(command), "run", str(study), str(out), "--models",
                                    str(h5_models), "--plugin", "MultiProc", "--nprocs", "2"],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            killed = None
            while killed is None:
                assert process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no MultiProc worker ran in 10 minutes"
                # Midway through preprocessing, as the system's out-of-memory killer would.
                if list((out / "work").glob("preprocess/*/conform/result_conform.pklz")):
                    killed = next(iter(preprocessing_workers(process.pid)), None)
                time.sleep(0.2)
            killed.kill()
            # Before, Nipype waited forever for the dead worker's step.
            assert process.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    assert result_digests(out) == result_digests(multiproc_run)


def _double(number):
    return 2 * number


def test_multiproc_leaves_the_garbage_collector_as_it_found_it(tmp_path):
    import gc

    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    from cmb_workflow.multiproc import WorkerLossTolerantMultiProcPlugin

    workflow = pe.Workflow("doubling", base_dir=str(tmp_path))
    workflow.config["execution"]["crashdump_dir"] = str(tmp_path)  # not the current folder
    double = pe.Node(Function(["number"], ["doubled"], _double), name="double")
    double.inputs.number = 21
    workflow.add_nodes([double])
    plugin_args = {"n_procs": 1, "mp_context": "forkserver"}
    # The plugin keeps the graph's objects out of the collector's scans only while it runs.
    finished = workflow.run(plugin=WorkerLossTolerantMultiProcPlugin(plugin_args=plugin_args),
                            plugin_args=plugin_args)
    assert gc.get_freeze_count() == 0
    assert next(iter(finished.nodes())).result.outputs.doubled == 42


def test_runs_started_in_the_same_second_get_run_logs_of_their_own(tmp_path, monkeypatch):
    from cmb_workflow.execution import name_run_log

    monkeypatch.delenv("CMB_WORKFLOW_RUN_LOG", raising=False)
    logs = [name_run_log(tmp_path / "logs") for _ in range(3)]
    assert len(set(logs)) == 3 and all(log.is_file() for log in logs)
    assert os.environ["CMB_WORKFLOW_RUN_LOG"] == str(logs[-1])


def test_the_command_reaches_the_forkserver_start_without_importing_nipype():
    # MultiProc's forkserver imports Nipype and the steps (about 2 s) while the command imports
    # them too: the command's own imports up to Execution.start_workers must stay light.
    code = ("import sys\nfrom cmb_workflow import cli, configs, execution, runner\n"
            "configs.load_config(overrides={'plugin': 'MultiProc'})\n"
            "print(sorted(name for name in ('nipype', 'scipy', 'SimpleITK', 'tensorflow') "
            "if name in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert imported == "[]"


def _ensembles_loaded_here():
    import sys

    models = sys.modules.get("cmb_workflow.models")
    return len(models._ENSEMBLES) if models else 0


def test_the_prediction_graph_runs_in_the_worker_that_loaded_the_models(savedmodel_models,
                                                                         tmp_path):
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe
    from nipype.utils.filemanip import loadpkl

    from cmb_workflow.configs import load_config
    from cmb_workflow.execution import Execution

    execution = Execution(load_config(overrides={"plugin": "MultiProc", "nprocs": 2}),
                          tmp_path / "jobs", {})
    execution.start_workers()
    # While the images are preprocessed, a worker of the next graph loads the models.
    execution.prepare_prediction(str(savedmodel_models), False)

    def ensembles_in_the_worker(name, prediction):
        workflow = pe.Workflow(name, base_dir=str(tmp_path))
        workflow.config["execution"]["crashdump_dir"] = str(tmp_path)
        workflow.add_nodes([pe.Node(Function([], ["count"], _ensembles_loaded_here),
                                    name="count")])
        execution.run(workflow, prediction=prediction)
        return loadpkl(tmp_path / name / "count" / "result_count.pklz").outputs.count

    assert ensembles_in_the_worker("preprocess", prediction=False) == 0
    assert ensembles_in_the_worker("predict", prediction=True) == 1
    execution.release_prediction()  # nothing left to end: the graph used the worker


@pytest.mark.slow
def test_a_script_calling_main_unguarded_fails_each_image_instead_of_hanging(
        study, h5_models, tmp_path):
    # MultiProc's workers import the main script again as they start.
    script = tmp_path / "unguarded.py"
    script.write_text("import sys\nfrom cmb_workflow.cli import main\n"
                      f"sys.exit(main(['run', {str(study)!r}, {str(tmp_path / 'cmb')!r}, "
                      f"'--models', {str(h5_models)!r}, '--plugin', 'MultiProc']))\n")
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
    assert finished.returncode == 1
    summary = (tmp_path / "cmb" / "cmb_summary.tsv").read_text()
    assert summary.count("WorkerProcessError") == len(summary.splitlines()) - 1
    assert 'guard its call with `if __name__ == "__main__":`' in summary
