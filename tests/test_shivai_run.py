"""`cmb-workflow run` with a SHIVA-format model: the shivai preparation end to end, and the model
input it writes is exactly what preprocessing.py's functions make of the scan."""

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import grid_affine, make_head, read_tsv, save
from model_builders import build_detector_ensemble

from cmb_workflow.cli import main
from cmb_workflow.imageops import load_volume
from cmb_workflow.preprocessing import (crop_start, deface, extract_box, mask_onto_grid,
                                        normalize)
from cmb_workflow.preprocessing import conform as conform_image

pytestmark = pytest.mark.slow


def test_a_shiva_model_gets_the_shivai_preparation_and_its_input_is_saved(tmp_path):
    shape = (110, 120, 40)
    affine = grid_affine((1.5, 1.5, 3.5), shape, rotation_deg=(7, -4, 5))
    image, mask = make_head(shape, affine, blobs_world=[(20, 10, 15)], seed=4)
    source = save(image, tmp_path / "in/sub-01/anat/sub-01_swi.nii.gz")
    supplied = save(mask, tmp_path / "in/sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    models = build_detector_ensemble(tmp_path / "models" / "SWI-CMB", "savedmodel", folds=1)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "in"), str(out), "--models", str(models),
                 "--plugin", "Linear", "--save-model-input"]) == 0

    anat = out / "sub-01/anat"
    given = nib.load(anat / "sub-01_desc-modelinput_swi.nii.gz")
    given_mask = nib.load(anat / "sub-01_desc-modelinput_mask.nii.gz")
    sidecar = json.loads((anat / "sub-01_desc-modelinput_swi.json").read_text())
    assert sidecar["Preprocessing"] == "shivai" and sidecar["MaskApplied"] is False

    # The same chain from the library functions, by hand.
    raw = load_volume(source, prefer_qform=True)
    conformed = conform_image(raw, "shivai")
    brain = mask_onto_grid(load_volume(supplied, prefer_qform=True), conformed, "shivai")
    defaced = np.asarray(deface(conformed, brain).dataobj)
    start = crop_start(brain, (160, 214, 176), 5, "shivai")
    assert sidecar["CropStart"] == [int(s) for s in start]
    box_mask = extract_box(brain, start, (160, 214, 176))
    expected = normalize(extract_box(defaced, start, (160, 214, 176)), box_mask, "shivai", 99.0,
                         1.3)
    np.testing.assert_allclose(np.asarray(given.dataobj), expected, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(given_mask.dataobj) > 0, box_mask)
    # Outside the brain the model saw the image, not zeros.
    assert np.asarray(given.dataobj)[~box_mask].max() > 0.1
    # The conformed grid keeps the scan's tilt; the model's box is 1 mm.
    np.testing.assert_allclose(nib.affines.voxel_sizes(given.affine), 1.0, atol=1e-5)
    assert abs(given.affine[0, 1]) > 0.01

    # Results on the scan's own grid, the blob found where it is.
    probseg = nib.load(anat / "sub-01_desc-cmb_probseg.nii.gz")
    assert probseg.shape == shape
    np.testing.assert_allclose(probseg.affine, affine, atol=1e-4)
    rows = read_tsv(anat / "sub-01_desc-cmb_lesions.tsv")
    centres = np.array([[float(row[c]) for c in "xyz"] for row in rows])
    assert np.linalg.norm(centres - [20, 10, 15], axis=1).min() < 3.0
    recorded = json.loads((anat / "sub-01_desc-cmb_probseg.json").read_text())
    assert recorded["preprocessing"] == "shivai" and recorded["mask_input"] is False
