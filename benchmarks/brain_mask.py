"""Automatic brain masks against the phantoms' true brain masks, on every acquisition grid.

    python benchmarks/brain_mask.py [--seed 0] [--dataset DIR] [--repeat]

Writes phantoms of every grid in both modalities (or uses DIR, a `cmb-workflow phantoms`
dataset), runs conform, template registration and the brain mask step on each, and prints the
Dice of the mask (on the native grid, as written to OUT) with each step's CPU seconds (this
process and its children: on a shared machine wall time follows the load) and wall seconds,
then the median and worst Dice, and the median seconds, per grid and overall. The CPU is
printed first. The intensity-based mask that starts the registration is scored too, for
comparison. --repeat runs the mask steps a second time and checks the masks
are byte-identical.
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import cpu_description

from cmb_workflow.imageops import resample
from cmb_workflow.interfaces.brainmask import BrainMask
from cmb_workflow.interfaces.conform import Conform
from cmb_workflow.interfaces.template import RegisterTemplate
from cmb_workflow.synthetic import GRIDS, MODALITIES, make_phantom_dataset


def native_dice(mask_file, truth_file) -> float:
    """Dice on the truth's (native) grid, the mask brought there as the pipeline does."""
    truth = nib.load(str(truth_file))
    mask = resample(nib.load(str(mask_file)), truth.shape, truth.affine, "linear")
    mask = np.asarray(mask.dataobj) >= 0.5
    expected = np.asarray(truth.dataobj) > 0
    return 2.0 * (mask & expected).sum() / (mask.sum() + expected.sum())


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its finished children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run(interface, folder: Path):
    """The interface's outputs, CPU seconds and wall seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = interface.run(cwd=str(folder))
    return result.outputs, cpu_seconds() - cpu, time.perf_counter() - wall


def mask_steps(conformed: str, folder: Path):
    """The mask's path and the (CPU, wall) seconds of registration and of the mask step."""
    registration, *register_s = run(RegisterTemplate(in_file=conformed), folder / "register")
    mask, *mask_s = run(BrainMask(in_file=conformed, method="template",
                                  template_transforms=registration.forward_transforms,
                                  intensity_mask=registration.intensity_mask), folder / "mask")
    return mask.out_file, (*register_s, *mask_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", type=Path, help="an existing phantom dataset to use")
    parser.add_argument("--repeat", action="store_true",
                        help="run the mask steps twice and compare the masks' bytes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = args.dataset or tmp / "phantoms"
        if args.dataset is None:
            make_phantom_dataset(dataset, len(GRIDS) * len(MODALITIES), args.seed, n_cmb=0)
        truth_root = dataset / "derivatives" / "phantom-truth"
        rows = []
        print(f"CPU: {cpu_description()}")
        print(f"{'subject':10} {'modality':8} {'grid':22} {'dice':>6} {'register cpu/wall s':>19} "
              f"{'mask cpu/wall s':>15} {'intensity dice':>14}")
        for image in sorted(dataset.glob("sub-*/anat/*.nii.gz")):
            subject, modality = image.name.split("_")[0], image.name.split("_")[1][:-7]
            truth = truth_root / subject / "anat" / f"{subject}_desc-brain_mask.nii.gz"
            folder = tmp / "work" / subject
            conformed, *_ = run(Conform(in_file=str(image)), folder / "conform")
            conformed = conformed.out_file
            mask_file, seconds = mask_steps(conformed, folder)
            if args.repeat:
                again, _ = mask_steps(conformed, folder / "repeat")
                transform = "register/template_to_subject_0GenericAffine.mat"
                assert (folder / transform).read_bytes() == \
                    (folder / "repeat" / transform).read_bytes(), f"{subject}: transforms differ"
                assert np.asanyarray(nib.load(again).dataobj).tobytes() == \
                    np.asanyarray(nib.load(mask_file).dataobj).tobytes(), f"{subject}: masks differ"
            row = (subject, modality, _grid_label(image), native_dice(mask_file, truth), *seconds,
                   native_dice(folder / "register" / "intensity_mask.nii.gz", truth))
            rows.append(row)
            print("{:10} {:8} {:22} {:6.4f} {:9.1f} / {:7.1f} {:6.1f} / {:6.1f} {:14.4f}"
                  .format(*row), flush=True)
        print("\nper grid: median / worst Dice (template); median CPU / wall s of register, mask")
        for grid in dict.fromkeys(row[2] for row in rows):
            _summary(grid, [row for row in rows if row[2] == grid])
        _summary("all", rows)
        dice = [row[8] for row in rows]
        print(f"intensity mask: median Dice {np.median(dice):.4f}, worst {min(dice):.4f}")
        total = [row[4] + row[6] for row in rows]
        print(f"mask steps: median {np.median(total):.1f} CPU s, most {max(total):.1f} CPU s per "
              f"subject" + ("; repeated runs gave identical masks" if args.repeat else ""))


def _summary(label: str, rows: list):
    dice = [row[3] for row in rows]
    register_cpu, register_wall, mask_cpu, mask_wall = np.median([row[4:8] for row in rows], axis=0)
    print(f"  {label:22} {np.median(dice):.4f} / {min(dice):.4f}  register {register_cpu:5.1f} / "
          f"{register_wall:5.1f} s  mask {mask_cpu:5.1f} / {mask_wall:5.1f} s")


def _grid_label(image: Path) -> str:
    subject = image.name.split("_")[0]
    truth = image.parents[2] / "derivatives" / "phantom-truth" / subject / "anat"
    return json.loads((truth / f"{subject}_desc-cmb_lesions.json").read_text())["grid"]["label"]


if __name__ == "__main__":
    main()
