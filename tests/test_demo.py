"""The bundled demo model: verified, labelled as a demo, and it finds microbleeds on a phantom."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest
from helpers import compare_outputs

from cmb_workflow.cli import main
from cmb_workflow.demo import demo_model_descriptor
from cmb_workflow.models import read_descriptor, verify
from cmb_workflow.training import lesion_target

# Whole pipelines, registrations or full-size predictions: the full suite only.
pytestmark = pytest.mark.slow


def test_bundled_demo_model_is_verified_and_labelled_a_demo():
    descriptor = read_descriptor(demo_model_descriptor())
    verify(descriptor, allow_unverified=False)
    info = json.loads(demo_model_descriptor().read_text())
    assert "DEMO MODEL" in info["description"] and "NOT for real scans" in info["description"]
    training = json.loads((demo_model_descriptor().parent / "training.json").read_text())
    assert training["seed"] and len(training["folds"]) == len(descriptor.files)
    assert all(fold["steps"] > 0 for fold in training["folds"])


def test_lesion_target_marks_the_diameter_around_world_centres():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-10.0, -10.0, -10.0]
    lesions = [{"x": 0.0, "y": 0.0, "z": 0.0, "diameter_mm": 5.0},
               {"x": 5.3, "y": 0.2, "z": 0.0, "diameter_mm": 0.5},   # thinner than a voxel
               {"x": 50.0, "y": 0.0, "z": 0.0, "diameter_mm": 4.0}]  # outside the box
    target = lesion_target(lesions, affine, (20, 20, 20))
    assert target[10, 10, 10] and target[12, 10, 10] and not target[13, 10, 10]
    assert target[15, 10, 10]
    sphere_voxels = int(target.sum()) - 1
    assert sphere_voxels == 81  # lattice points within 2.5 voxels of a lattice centre


DEMO_ARGS = ["--n-subjects", "1", "--seed", "4"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`cmb-workflow demo` on one fixed phantom: its folder and what it printed."""
    out = tmp_path_factory.mktemp("demo")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["demo", str(out), *DEMO_ARGS]) == 0
    return out, printed.getvalue()


def test_demo_finds_most_microbleeds_of_a_fixed_phantom(demo_run):
    """`cmb-workflow demo` end to end: phantom, pipeline with the bundled model, evaluation."""
    out, printed = demo_run
    assert "sens" in printed and str(out / "results" / "index.html") in printed
    with open(out / "evaluation.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    distance = [row for row in rows if row["view"] == "distance"]
    pooled = next(row for row in distance if row["scope"] == "pooled")
    # The model's target is microbleeds of 3 mm and more; smaller ones are mostly missed.
    sized = [row for row in distance if row["scope"] == "size" and row["group"] in ("3-5mm",
                                                                                   "5-10mm")]
    n_ref = sum(int(row["n_ref"]) for row in sized)
    assert n_ref >= 4
    assert sum(int(row["tp"]) for row in sized) >= 0.8 * n_ref
    assert float(pooled["fp_per_scan"]) <= 1


def test_demo_run_twice_gives_the_same_outputs(demo_run, tmp_path):
    """Same inputs, same outputs, as scripts/compare_outputs.py judges them: the check a
    maintainer runs on main and on a branch (docs/pipeline.md, Refactoring safely)."""
    assert main(["demo", str(tmp_path), *DEMO_ARGS]) == 0
    assert compare_outputs.compare_folders(demo_run[0], tmp_path) == 0
    # The second run in this process has workers of its own, writing to its own log.
    def worker_lines(out):
        logs = "".join(path.read_text() for path in (out / "results" / "logs").glob("*.log"))
        return [line for line in logs.splitlines() if "[Node] Setting-up" in line]
    assert any(f'"{tmp_path}' in line for line in worker_lines(tmp_path))
    assert not any(str(tmp_path) in line for line in worker_lines(demo_run[0]))


def test_training_is_reproducible_from_its_seed(tmp_path):
    """Two tiny trainings from the same seed give the same network."""
    from cmb_workflow.models import load_ensemble
    from cmb_workflow.training import FoldRecipe, train

    image = np.random.default_rng(0).random((1, 160, 214, 176, 1), dtype=np.float32)
    # Both ways of picking a microbleed: per lesion voxel, and per microbleed after step 1;
    # with and without darker iron.
    recipes = (FoldRecipe(steps=3), FoldRecipe(steps=3, lesion_chance_power=0.0,
                                               from_fraction=0.34, iron_darkening=0.4))
    predictions = []
    # The second training reads the phantom the first prepared (the pipeline's own determinism
    # is test_demo_run_twice_gives_the_same_outputs').
    for run in ("a", "b"):
        descriptor = train(tmp_path / run, recipes=recipes, n_subjects=1, batch_size=2, patch=16,
                           base_filters=2, levels=2, seed=11, cache=tmp_path / "prepared")
        predictions.append(load_ensemble(descriptor, allow_unverified=False).predict(image))
    np.testing.assert_array_equal(predictions[0], predictions[1])
