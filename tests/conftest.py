import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cmb_workflow.networks import build_detector_ensemble  # noqa: E402


@pytest.fixture(scope="session")
def h5_models(tmp_path_factory):
    return build_detector_ensemble(tmp_path_factory.mktemp("models") / "v1", "h5")


@pytest.fixture(scope="session")
def savedmodel_models(tmp_path_factory):
    # v2 releases name files with the model folder's own name first ("SWI-CMB/...").
    root = tmp_path_factory.mktemp("models")
    return build_detector_ensemble(root / "SWI-CMB", "savedmodel")
