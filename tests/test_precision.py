"""The precision setting: bfloat16 only where it is native (auto) and only when the first image's
lesions match float32's; float32 everywhere else, with the reason recorded."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cmb_workflow.configs import ConfigError, load_config
from cmb_workflow.interfaces.predict import Predict
from cmb_workflow.models import bfloat16_candidate, native_bfloat16_flags

# Builds a small U-Net ensemble in both formats and predicts with TensorFlow's oneDNN on (it must
# be switched on before TensorFlow is imported, hence a fresh process); prints JSON.
ONEDNN_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import nibabel as nib, numpy as np
    from cmb_workflow import networks
    from cmb_workflow.interfaces.predict import Predict
    from cmb_workflow.models import load_ensemble

    root = Path(sys.argv[1])
    shape = (32, 48, 32)
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[4:-4, 4:-4, 4:-4] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), root / "image.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "mask.nii.gz")
    report = {}
    for fmt in ("h5", "savedmodel"):
        K = networks.keras_module(fmt)
        folder = root / fmt
        folder.mkdir()
        folds = [networks.save_fold(networks.build_with_policy(
                     K, networks.build_unet, mixed_precision=fmt == "h5",
                     input_shape=(*shape, 1), base_filters=4, levels=3), folder, f"fold{n}", fmt)
                 for n in range(2)]
        descriptor = networks.write_descriptor(folder, folds)
        ensemble = load_ensemble(descriptor)
        batch = image[np.newaxis, ..., np.newaxis]
        before = ensemble.predict(batch)
        bfloat16 = ensemble.predict(batch, precision="bfloat16")
        after = ensemble.predict(batch)
        precisions = {}
        for precision in ("float32", "bfloat16"):
            # threshold 0: the whole brain is one lesion, whose peak bfloat16 barely moves.
            node = Predict(in_files=[str(root / "image.nii.gz")] * 2,
                           mask_files=[str(root / "mask.nii.gz")] * 2,
                           model_descriptor=str(descriptor), precision=precision, threshold=0.0)
            (root / f"{fmt}-{precision}").mkdir()
            result = node.run(cwd=str(root / f"{fmt}-{precision}"))
            precisions[precision] = result.outputs.precision
        # The check's outcome is kept; a later job follows it (here, a record saying float32).
        records = sorted((root / "home" / "precision_checks").glob("*.json"))
        kept = json.loads(records[-1].read_text()) if records else None
        for record in records:
            record.write_text(json.dumps(["float32", "kept record"]))
        (root / f"{fmt}-again").mkdir()
        again = Predict(in_files=[str(root / "image.nii.gz")], mask_files=[str(root / "mask.nii.gz")],
                        model_descriptor=str(descriptor), precision="bfloat16", threshold=0.0
                        ).run(cwd=str(root / f"{fmt}-again")).outputs.precision
        for record in records:
            record.unlink()
        report[fmt] = {"bfloat16_difference": float(np.abs(bfloat16 - before).max()),
                       "float32_again_difference": float(np.abs(after - before).max()),
                       "node": precisions, "records": len(records), "kept": kept,
                       "again": again}
    print("RESULT " + json.dumps(report))
""")


def test_float32_asked_for_is_never_checked():
    assert bfloat16_candidate("float32") == (False, "float32 was asked for")


def test_auto_takes_bfloat16_only_where_native():
    candidate, reason = bfloat16_candidate("auto")
    if not native_bfloat16_flags():
        assert not candidate and reason
    assert reason


def test_precision_setting_is_checked():
    assert load_config(None, {"precision": "bfloat16"}).precision == "bfloat16"
    assert load_config(None, {}).precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, {"precision": "float16"})


def lesion_check(bfloat16, float32, **rule):
    node = Predict(**rule)
    return node._bfloat16_difference(bfloat16, float32, np.ones(bfloat16.shape, bool))


def test_bfloat16_check_compares_lesion_voxels_and_peaks():
    float32 = np.zeros((20, 20, 20), np.float32)
    float32[5:8, 5:8, 5:8] = 0.8
    float32[14:16, 14:16, 14:16] = 0.6
    assert lesion_check(float32.copy(), float32) == ""
    close = float32.copy()
    close[6, 6, 6] = 0.815  # a peak 0.015 away: still the same lesion
    assert lesion_check(close, float32) == ""
    moved = float32.copy()
    moved[6, 6, 6] = 0.83
    assert "moved by 0.030" in lesion_check(moved, float32)
    lost = float32.copy()
    lost[14:16, 14:16, 14:16] = 0.4  # the second lesion falls below the threshold
    assert "1 against 2 lesions" in lesion_check(lost, float32)
    grown = float32.copy()
    grown[8, 6, 6] = 0.7  # same count, one more voxel
    assert "not the same voxels" in lesion_check(grown, float32)
    # Without any lesion, a voxel that moves too far elsewhere still rejects bfloat16.
    empty = np.zeros_like(float32)
    stray = empty.copy()
    stray[2, 2, 2] = 0.3
    assert "a probability on the first image moved by 0.300" in lesion_check(stray, empty)
    # The run's detection threshold is part of the rule: a lesion it drops is no difference.
    faint = float32.copy()
    faint[14:16, 14:16, 14:16] = 0.62
    assert lesion_check(faint, float32, min_peak=0.7) == ""


@pytest.mark.slow
def test_bfloat16_runs_both_formats_and_is_checked(tmp_path):
    """With oneDNN on (as on CPUs with native bfloat16), both formats predict in bfloat16 close to
    float32, float32 is unchanged after a bfloat16 call, and the node keeps bfloat16 when the
    lesions agree; float32 is recorded when it was asked for; the check's outcome is kept at
    the first use and followed by later jobs."""
    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "CUDA_VISIBLE_DEVICES": "",
                   "CMB_WORKFLOW_HOME": str(tmp_path / "home")}
    completed = subprocess.run([sys.executable, "-c", ONEDNN_SCRIPT, str(tmp_path)],
                               capture_output=True, text=True, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    report = json.loads(line[len("RESULT "):])
    for fmt, figures in report.items():
        assert 0 < figures["bfloat16_difference"] < 0.02, fmt  # rewritten, and close
        assert figures["float32_again_difference"] == 0, fmt
        assert figures["node"]["float32"] == {"Precision": "float32",
                                              "PrecisionReason": "float32 was asked for"}
        assert figures["node"]["bfloat16"]["Precision"] == "bfloat16", figures["node"]
        # One record per ensemble, written at its first use, then followed without a check.
        assert figures["records"] == 1, fmt
        assert figures["kept"] == ["bfloat16", figures["node"]["bfloat16"]["PrecisionReason"]]
        assert "first use" in figures["kept"][1]
        assert figures["again"] == {"Precision": "float32", "PrecisionReason": "kept record"}
