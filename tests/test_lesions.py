"""Lesion labelling and its two thresholds: the voxel threshold and the lesion's peak."""

import json

import nibabel as nib
import numpy as np
import pytest

from cmb_workflow.cli import build_parser
from cmb_workflow.configs import ConfigError, load_config
from cmb_workflow.interfaces.lesions import label_lesions
from cmb_workflow.models import ModelError, read_descriptor
from cmb_workflow.runner import with_model_defaults


def probability_with_two_blobs():
    probability = np.zeros((12, 12, 12), np.float32)
    probability[2:5, 2:5, 2:5] = 0.6  # faint and larger
    probability[3, 3, 3] = 0.7
    probability[8, 8, 8:10] = [0.95, 0.8]  # confident and smaller
    return probability


def test_min_peak_drops_faint_lesions_whole_and_keeps_the_others_as_they_were():
    probability = probability_with_two_blobs()

    labels, rows = label_lesions(probability, np.eye(4), 0.5, 26, 1)
    peaked_labels, peaked_rows = label_lesions(probability, np.eye(4), 0.5, 26, 1, min_peak=0.9)

    assert [(r["volume_mm3"], r["max_prob"]) for r in rows] == [(27.0, 0.7), (2.0, 0.95)]
    assert [(r["label"], r["volume_mm3"], r["max_prob"]) for r in peaked_rows] == [(1, 2.0, 0.95)]
    assert peaked_rows[0]["mean_prob"] == rows[1]["mean_prob"]
    np.testing.assert_array_equal(peaked_labels, np.where(labels == 2, 1, 0))
    # A lesion's peak equal to min_peak is kept.
    assert len(label_lesions(probability, np.eye(4), 0.5, 26, 1, min_peak=0.7)[1]) == 2


def test_a_map_with_nothing_above_the_threshold_has_no_lesion():
    labels, rows = label_lesions(np.full((6, 7, 8), 0.5, np.float32), np.eye(4), 0.5, 26, 1)
    assert rows == [] and labels.dtype == np.int32 and not labels.any()


def test_lesion_measures_are_those_of_the_whole_volume():
    """label_lesions measures on the voxels above the threshold only; its centroids, means
    and peaks are those scipy.ndimage gives over the whole volume."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    probability = ndimage.gaussian_filter(rng.random((40, 44, 36)), 1.5).astype(np.float32)
    probability = (probability - probability.min()) / (probability.max() - probability.min())
    affine = np.array([[0.9, 0, 0, -40], [0, 1.1, 0, 20], [0, 0, 1.3, 7.5], [0, 0, 0, 1]])
    labels, rows = label_lesions(probability, affine, 0.7, 26, 2)

    assert len(rows) > 10
    index = [row["label"] for row in rows]
    centres = ndimage.center_of_mass(labels > 0, labels, index)
    world = [[round(float(v), 2) for v in point]
             for point in nib.affines.apply_affine(affine, np.array(centres))]
    assert [[row["x"], row["y"], row["z"]] for row in rows] == world
    assert [row["mean_prob"] for row in rows] == [
        round(float(v), 4) for v in ndimage.mean(probability, labels, index)]
    assert [row["max_prob"] for row in rows] == [
        round(float(v), 4) for v in ndimage.maximum(probability, labels, index)]
    assert [row["volume_mm3"] for row in rows] == [
        round(float(n) * 0.9 * 1.1 * 1.3, 2) for n in ndimage.sum_labels(labels > 0, labels, index)]


def write_descriptor(folder, **fields):
    (folder / "m.h5").write_bytes(b"x")
    path = folder / "model_info.json"
    path.write_text(json.dumps({"files": [{"name": "m.h5", "md5": "x"}], **fields}))
    return path


def test_unset_min_peak_takes_the_models_own_and_a_setting_overrides_it(tmp_path):
    with_peak = read_descriptor(write_descriptor(tmp_path, min_peak_probability=0.85))
    without = read_descriptor(write_descriptor(tmp_path))

    assert with_peak.min_peak_probability == 0.85 and without.min_peak_probability is None
    assert with_model_defaults(load_config(), with_peak).min_peak_probability == 0.85
    assert with_model_defaults(load_config(), without).min_peak_probability == 0.0
    chosen = load_config(overrides={"min_peak_probability": 0.5})
    assert with_model_defaults(chosen, with_peak).min_peak_probability == 0.5


def test_unset_drop_likely_mimics_takes_the_models_own_and_the_command_line_overrides_it(
        tmp_path):
    dropping = read_descriptor(write_descriptor(tmp_path, drop_likely_mimics=True))
    silent = read_descriptor(write_descriptor(tmp_path))

    assert with_model_defaults(load_config(), dropping).drop_likely_mimics is True
    assert with_model_defaults(load_config(), silent).drop_likely_mimics is False
    for flag, expected in (("--no-drop-likely-mimics", False), ("--drop-likely-mimics", True)):
        given = build_parser("run").parse_args(["run", "in", "out", flag]).drop_likely_mimics
        chosen = load_config(overrides={"drop_likely_mimics": given})
        assert with_model_defaults(chosen, dropping if expected is False else silent) \
            .drop_likely_mimics is expected
    with pytest.raises(ModelError, match=r"model_info.json: drop_likely_mimics 'yes' is not "
                                         r"true or false"):
        read_descriptor(write_descriptor(tmp_path, drop_likely_mimics="yes"))


@pytest.mark.parametrize("value", [1.5, "high", True])
def test_a_min_peak_that_is_not_a_probability_is_refused_naming_its_source(tmp_path, value):
    with pytest.raises(ModelError, match=r"model_info.json: min_peak_probability .* is not a "
                                         r"probability"):
        read_descriptor(write_descriptor(tmp_path, min_peak_probability=value))
    with pytest.raises(ConfigError, match="min_peak_probability .*: expected a number at least "
                                          "0 and at most 1"):
        load_config(overrides={"min_peak_probability": value})
    with pytest.raises(ConfigError, match="threshold .*: expected a number at least 0"):
        load_config(overrides={"threshold": value})
