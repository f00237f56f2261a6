"""Model descriptors, checksums and the two released formats."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmb_workflow.models import ModelError, load_ensemble, md5sum, read_descriptor

# Whole pipelines, registrations or full-size predictions: the full suite only.
pytestmark = pytest.mark.slow


def blob_volume():
    volume = np.full((1, 160, 214, 176, 1), 0.6, np.float32)
    volume[0, 77:84, 97:104, 87:94, 0] = 0.05
    return volume


def test_h5_and_savedmodel_of_the_same_network_give_the_same_map(h5_models, savedmodel_models):
    volume = blob_volume()
    from_h5 = load_ensemble(h5_models).predict(volume)
    from_savedmodel = load_ensemble(savedmodel_models).predict(volume)
    assert from_h5.shape == (1, 160, 214, 176)
    # The blob is found, the flat background is not.
    assert from_h5[0, 80, 100, 90] > 0.9 and from_h5[0, 20, 20, 20] < 0.05
    np.testing.assert_allclose(from_h5, from_savedmodel, atol=1e-5)


def test_mixed_float16_h5_is_rebuilt_in_float32(h5_models):
    import h5py

    first = read_descriptor(h5_models).files[0].path
    with h5py.File(first) as handle:
        assert "mixed_float16" in str(handle.attrs["model_config"])
    ensemble = load_ensemble(h5_models)
    assert len(ensemble.folds) == 2
    from cmb_workflow.models import load_h5_model

    model = load_h5_model(first)
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}


def test_v2_names_starting_with_the_model_folder_resolve(savedmodel_models):
    info = json.loads(savedmodel_models.read_text())
    assert info["files"][0]["name"].startswith("SWI-CMB/")
    descriptor = read_descriptor(savedmodel_models)
    assert all(f.path.is_dir() for f in descriptor.files)


def test_directory_checksum_is_md5_of_all_files_in_sorted_order(tmp_path):
    # Written out of order; the digest is md5("abc" + "def"), computed once by hand.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c").write_bytes(b"def")
    (tmp_path / "a").write_bytes(b"abc")
    assert md5sum(tmp_path) == "e80b5017098950fc58aad83c8c14978e"


def tampered_copy(descriptor_path):
    """The same descriptor with a wrong md5 for the first fold, beside the models."""
    info = json.loads(descriptor_path.read_text())
    info["files"][0]["md5"] = "0" * 32
    copy = descriptor_path.parent / "model_info_tampered.json"
    copy.write_text(json.dumps(info))
    return copy


def test_wrong_checksum_is_refused_before_tensorflow_is_imported(h5_models):
    tampered = tampered_copy(h5_models)
    script = (
        "import sys\n"
        "from cmb_workflow.models import load_ensemble, ModelError\n"
        f"try:\n    load_ensemble({str(tampered)!r})\n"
        "except ModelError as exc:\n    print('REFUSED', exc)\n"
        "print('TF_IMPORTED', 'tensorflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert "REFUSED" in result.stdout and "does not match" in result.stdout
    assert "fold0.h5" in result.stdout
    assert "TF_IMPORTED False" in result.stdout


def test_unverified_model_loads_only_with_the_explicit_flag(h5_models, caplog):
    tampered = tampered_copy(h5_models)
    with pytest.raises(ModelError, match="allow-unverified-models"):
        load_ensemble(tampered)
    ensemble = load_ensemble(tampered, allow_unverified=True)
    assert ensemble.predict(blob_volume())[0, 80, 100, 90] > 0.9
    assert "loading it anyway" in caplog.text


def test_a_fold_that_cannot_be_loaded_stops_the_ensemble(savedmodel_models, tmp_path):
    """Verified checksums but a broken SavedModel: refused naming the fold, never skipped."""
    models = tmp_path / "SWI-CMB"
    shutil.copytree(savedmodel_models.parent, models)
    (models / "fold1.tf_inference" / "saved_model.pb").write_bytes(b"not a graph")
    info = json.loads(savedmodel_models.read_text())
    info["files"][1]["md5"] = md5sum(models / "fold1.tf_inference")
    (models / "model_info.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match=r"fold1\.tf_inference: fold 2 of 2 cannot be loaded"):
        load_ensemble(models / "model_info.json")


def test_descriptor_for_other_modalities_is_refused(tmp_path):
    (tmp_path / "m.h5").write_bytes(b"x")
    descriptor = tmp_path / "model_info.json"
    descriptor.write_text(json.dumps({"target": "PVS", "modalities": ["t1", "flair"],
                                      "files": [{"name": "m.h5", "md5": "x"}]}))
    with pytest.raises(ModelError, match="target is 'PVS'"):
        read_descriptor(descriptor)
    descriptor.write_text(json.dumps({"target": "CMB", "modalities": ["t1", "flair"],
                                      "files": [{"name": "m.h5", "md5": "x"}]}))
    with pytest.raises(ModelError, match="provides only SWI"):
        read_descriptor(descriptor)


def test_model_file_names_cannot_leave_the_descriptor_folder(tmp_path):
    descriptor = tmp_path / "model_info.json"
    descriptor.write_text(json.dumps({"files": [{"name": "../evil.h5", "md5": "x"}]}))
    with pytest.raises(ModelError, match="relative path"):
        read_descriptor(descriptor)


def test_float32_rebuild_changes_policies_only():
    from cmb_workflow.models import _float32_config

    config = {"name": "mixed_1", "dtype": "mixed_float16",
              "layers": [{"dtype": {"class_name": "Policy", "config": {"name": "mixed_float16"}},
                          "name": "mixed_block"}]}
    rebuilt = _float32_config(config)
    assert rebuilt["name"] == "mixed_1" and rebuilt["layers"][0]["name"] == "mixed_block"
    assert rebuilt["dtype"] == "float32"
    assert rebuilt["layers"][0]["dtype"]["config"]["name"] == "float32"


def test_forward_flops_counts_two_per_multiply_add_of_each_convolution():
    """The benchmarks' FLOP count, on a network small enough to count by hand."""
    from model_builders import forward_flops

    from cmb_workflow.networks import keras_module

    K = keras_module("savedmodel")
    inputs = K.layers.Input((8, 8, 8, 1))
    x = K.layers.Conv3D(4, 3, padding="same")(inputs)  # 8^3 outputs x 27 x 1 x 4 multiply-adds
    x = K.layers.MaxPooling3D(2)(x)
    # A transposed convolution visits every input voxel: 4^3 x 8 x 4 x 2.
    x = K.layers.Conv3DTranspose(2, 2, strides=2)(x)
    model = K.Model(inputs, x)
    assert forward_flops(model) == 2 * (8 ** 3 * 27 * 4 + 4 ** 3 * 8 * 4 * 2)


def test_gpu_check_script_runs_without_a_gpu():
    """benchmarks/gpu_check.sh, kept working for the day a GPU is there: without one it says so
    and runs every part on the CPU, its two CPU runs agreeing exactly."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script), "--scans", "1", "--cpu-scans", "1", "--folds",
                           "1", "--base-filters", "2", "--levels", "2"],
                          capture_output=True, text=True, env=environment, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GPU: none visible to TensorFlow" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] in (["h5"], ["savedmodel"])]
    assert [row[0] for row in rows] == ["h5", "savedmodel"]
    for row in rows:
        assert row[1] == "CPU" and float(row[6]) == 0 and row[7] == "yes", row
