import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests' own CMB_WORKFLOW_HOME (installed models, bfloat16 checks): never the user's.
os.environ["CMB_WORKFLOW_HOME"] = tempfile.mkdtemp(prefix="cmb-workflow-home-")

from helpers import write_study  # noqa: E402
from model_builders import build_detector_ensemble  # noqa: E402
from slurm_cluster import OneNodeCluster, missing_reason  # noqa: E402

from cmb_workflow.cli import main  # noqa: E402


# The whole-pipeline tests check the workflow's mechanics (formats, resume, SLURM, failures) on
# the untilted grid over the field of view, whose images are a fraction of SHiVAi's 256^3: the
# shivai preparation is pinned rule by rule in test_preprocessing.py and run end to end in
# test_shivai_run.py.
FAST_PREPROCESSING = "cmb-workflow-1"


@pytest.fixture(scope="session")
def h5_models(tmp_path_factory):
    return build_detector_ensemble(tmp_path_factory.mktemp("models") / "v1", "h5",
                                   preprocessing=FAST_PREPROCESSING)


@pytest.fixture(scope="session")
def savedmodel_models(tmp_path_factory):
    # v2 releases name files with the model folder's own name first ("SWI-CMB/...").
    root = tmp_path_factory.mktemp("models")
    return build_detector_ensemble(root / "SWI-CMB", "savedmodel",
                                   preprocessing=FAST_PREPROCESSING)


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """Three good subjects (helpers.SUBJECTS)."""
    return write_study(tmp_path_factory.mktemp("study3"))


@pytest.fixture(scope="session")
def multiproc_run(study, h5_models, tmp_path_factory):
    """A clean MultiProc run of `study`: the reference other ways of running must match."""
    out = tmp_path_factory.mktemp("multiproc") / "cmb"
    assert main(["run", str(study), str(out), "--models", str(h5_models),
                 "--plugin", "MultiProc", "--nprocs", "2"]) == 0
    return out


def running_cluster(cpus=None):
    """A started OneNodeCluster with SLURM_CONF set, for a fixture to yield from."""
    reason = missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the SLURM tests")
        pytest.skip(reason)
    cluster = OneNodeCluster(cpus)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM cluster of real slurmctld, slurmd and munged, with SLURM_CONF set."""
    yield from running_cluster()


@pytest.fixture(scope="module")
def wide_slurm_cluster():
    """The same with 6 CPUs whatever the machine has: a job array's throttle, not the node,
    limits the tasks running at once (they share the machine's cores)."""
    yield from running_cluster(cpus=6)
