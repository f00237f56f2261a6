"""Does cmb-workflow feed a SHIVA model the array SHiVAi's own code would? One run, side by side.

For each scan of a BIDS-like folder that has a supplied brain mask, this runs:
- `cmb-workflow run --preprocessing shivai --save-model-input` (the array the model was given);
- SHiVAi's own interfaces, in SHiVAi's order and with its default parameters (affine check,
  conform, mask resampling and cleaning, Quickshear, crop, normalisation), in an interpreter
  where a SHiVAi checkout imports (`--shivai-python`, `--shivai-src`: SHiVAi is GPL-3 and is
  neither shipped nor imported by cmb-workflow);
and prints, per scan, the largest affine difference (mm), the share of voxels differing by more
than 1e-3, the correlation over the box and inside the brain, and the seconds each side took.

    python benchmarks/shivai_parity.py IN --shivai-src ~/SHiVAi/src \
        --shivai-python ~/shivai-venv/bin/python [--models model_info.json] [--work DIR]

With no IN, it writes phantoms on four grids (oblique anisotropic, 1 mm, thick oblique slices,
and a field of view cut at the chin) with their truth masks as supplied masks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import cpu_description

# The networks built for tests and benchmarks live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# SHiVAi's CMB chain (its workflows/preprocessing.py with its defaults), run in SHiVAi's own
# interpreter; prints the normalised crop's path.
SHIVAI_CHAIN = r"""
import os, sys
from shivai.interfaces.image import (Conform, CorrectAffine, Crop, Normalization,
                                     Resample_from_to, Threshold)
from nipype.interfaces.quickshear import Quickshear
image, mask, work = sys.argv[1:4]
os.makedirs(work, exist_ok=True)
os.chdir(work)
img = CorrectAffine(img=image, correction_threshold=0.005).run().outputs.corrected_img
seg = CorrectAffine(img=mask, correction_threshold=0.005).run().outputs.corrected_img
conformed = Conform(img=img, dimensions=(256, 256, 256), voxel_size=(1.0, 1.0, 1.0),
                    voxels_tolerance=(0.0, 0.0, 0.0), orientation="RAS").run().outputs.resampled
moved = Resample_from_to(moving_image=seg, fixed_image=conformed, spline_order=0
                         ).run().outputs.resampled_image
brain = Threshold(img=moved, threshold=0.5, binarize=True, minVol=100, clusterCheck="keep_all"
                  ).run().outputs.thresholded
defaced = Quickshear(in_file=conformed, mask_file=brain).run().outputs.out_file
cropped = Crop(apply_to=defaced, roi_mask=brain, final_dimensions=(160, 214, 176)
               ).run().outputs.cropped
box_mask = Resample_from_to(moving_image=brain, fixed_image=cropped, spline_order=0,
                            out_name="brainmask_cropped.nii.gz").run().outputs.resampled_image
print(Normalization(input_image=cropped, brain_mask=box_mask, percentile=99.0
                    ).run().outputs.intensity_normalized)
"""

PHANTOM_GRIDS = ("0.9x0.9x1.5 oblique", "1.0x1.0x1.0", "1.0x1.0x3.0 oblique", "0.5x0.5x2.0")


def make_phantoms(root: Path) -> Path:
    """Phantoms on PHANTOM_GRIDS, the last one cut at the chin, truth masks supplied."""
    from cmb_workflow.synthetic import make_phantom_dataset

    study = root / "phantoms"
    for index, grid in enumerate(PHANTOM_GRIDS):
        make_phantom_dataset(root / f"grid{index}", 1, seed=700 + index, grids=[grid])
        source = next((root / f"grid{index}").glob("sub-*/anat/*_*.nii.gz"))
        truth = next((root / f"grid{index}").glob("derivatives/*/sub-*/anat/*_desc-brain_mask"
                                                  ".nii.gz"))
        target = study / f"sub-{index:02d}" / "anat"
        target.mkdir(parents=True, exist_ok=True)
        image, mask = nib.load(source), nib.load(truth)
        if index == len(PHANTOM_GRIDS) - 1:
            # Keep the top 55 % of the slices: a neck-heavy scan cut at the chin.
            keep = slice(int(image.shape[2] * 0.45), None)
            image, mask = image.slicer[:, :, keep], mask.slicer[:, :, keep]
        suffix = source.name.split("_")[-1]
        nib.save(image, target / f"sub-{index:02d}_{suffix}")
        nib.save(mask, target / f"sub-{index:02d}_desc-brain_mask.nii.gz")
    return study


def compare(ours_file: Path, theirs_file: Path, brain_file: Path) -> dict:
    ours, theirs = nib.load(ours_file), nib.load(theirs_file)
    a = np.asarray(ours.dataobj, dtype=np.float64)
    b = np.asarray(theirs.dataobj, dtype=np.float64)
    brain = np.asarray(nib.load(brain_file).dataobj) > 0
    return {"affine_mm": float(np.abs(ours.affine - theirs.affine).max()),
            "share_over_1e-3": float(np.mean(np.abs(a - b) > 1e-3)),
            "corr_box": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "corr_brain": float(np.corrcoef(a[brain], b[brain])[0, 1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("in_dir", nargs="?", help="BIDS-like folder with supplied brain masks")
    parser.add_argument("--shivai-src", required=True, help="the src/ folder of a SHiVAi checkout")
    parser.add_argument("--shivai-python", required=True,
                        help="a Python where SHiVAi's dependencies are installed")
    parser.add_argument("--models", help="a SHIVA-format descriptor (default: a small detector "
                                         "built here; the model does not change its input)")
    parser.add_argument("--work", help="folder for everything (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="shivai-parity-")).resolve()
    print(f"CPU: {cpu_description()}; work: {work}")
    study = Path(args.in_dir).resolve() if args.in_dir else make_phantoms(work)
    models = args.models
    if not models:
        from model_builders import build_detector_ensemble

        models = str(build_detector_ensemble(work / "models" / "SWI-CMB", "savedmodel", folds=1))
    from cmb_workflow.cli import main as cmb_workflow

    out = work / "cmb-workflow"
    started = time.perf_counter()
    cmb_workflow(["run", str(study), str(out), "--models", models, "--preprocessing", "shivai",
                  "--save-model-input", "--brain-mask", "supplied"])
    ours_seconds = time.perf_counter() - started
    rows = []
    for ours in sorted(out.glob("sub-*/**/*_desc-modelinput_*.nii.gz")):
        if ours.name.endswith("_mask.nii.gz"):
            continue
        prefix = ours.name.split("_desc-modelinput_")[0]
        image = next(path for path in study.glob(f"**/{prefix}_*.nii*")
                     if "_desc-" not in path.name)
        mask = next(study.glob(f"**/{prefix}_desc-brain_mask.nii*"))
        started = time.perf_counter()
        chain = subprocess.run([args.shivai_python, "-c", SHIVAI_CHAIN, str(image), str(mask),
                                str(work / "shivai" / prefix)], capture_output=True, text=True,
                               env={"PYTHONPATH": args.shivai_src, "PATH": str(
                                   Path(args.shivai_python).parent) + ":/usr/bin:/bin"})
        if chain.returncode:
            print(f"{prefix}: SHiVAi failed: {chain.stderr.strip().splitlines()[-1]}")
            continue
        theirs = Path(chain.stdout.strip().splitlines()[-1])
        brain = ours.with_name(f"{prefix}_desc-modelinput_mask.nii.gz")
        rows.append({"image": prefix, **compare(ours, theirs, brain),
                     "shivai_s": round(time.perf_counter() - started, 1)})
    print(f"cmb-workflow, whole run (all images, prediction included): {ours_seconds:.1f} s")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
