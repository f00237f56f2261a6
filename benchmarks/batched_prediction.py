"""Per-subject cost of prediction jobs by batch size, with a SHIVA-sized ensemble (by hand).

    python benchmarks/batched_prediction.py [--batch-sizes 1 4 16] [--folds 3]

Each batch runs as a cluster job does: a fresh Python process that imports the package, loads
the ensemble once and predicts every image of the batch with the Predict interface. The
process's wall time divided by the batch size is the per-subject cost. The images are one
synthetic 160x214x176 crop (and mask) given `batch` times: the cost does not depend on content.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def child(args) -> None:
    """One prediction job: report load and prediction times as JSON on stdout."""
    start = time.perf_counter()
    from cmb_workflow.interfaces.predict import Predict
    from cmb_workflow.models import load_ensemble

    load_ensemble(args.models)  # the Predict below finds it in the process's cache
    loaded = time.perf_counter()
    Predict(in_files=[args.crop] * args.batch, mask_files=[args.mask] * args.batch,
            model_descriptor=args.models).run(cwd=args.work)
    print(json.dumps({"load_s": loaded - start, "predict_s": time.perf_counter() - loaded}))


def write_crop(folder: Path) -> tuple[Path, Path]:
    shape = (160, 214, 176)
    grid = np.indices(shape, dtype=np.float32)
    radius = sum(((axis - n / 2) / (0.42 * n)) ** 2 for axis, n in zip(grid, shape))
    mask = (radius < 1).astype(np.uint8)
    image = np.random.default_rng(0).uniform(0.3, 0.8, shape).astype(np.float32) * mask
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "crop.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / "mask.nii.gz")
    return folder / "crop.nii.gz", folder / "mask.nii.gz"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--base-filters", type=int, default=10)
    parser.add_argument("--levels", type=int, default=4)
    for name in ("--batch", "--models", "--crop", "--mask", "--work"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch:
        args.batch = int(args.batch)
        return child(args)

    from cmb_workflow import networks

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        descriptor, parameters = networks.build_unet_ensemble(
            tmp / "models", folds=args.folds, base_filters=args.base_filters, levels=args.levels)
        crop, mask = write_crop(tmp)
        print(f"U-Net: {parameters:,} parameters per fold, {args.folds} folds")
        print(f"{'batch':>5} {'job s':>8} {'import+load s':>13} {'predict s/image':>15} "
              f"{'per subject s':>13} {'vs batch ' + str(args.batch_sizes[0]):>10}")
        baseline = None
        for batch in args.batch_sizes:
            work = tmp / f"batch{batch}"
            work.mkdir()
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--batch", str(batch), "--models",
                                   str(descriptor), "--crop", str(crop), "--mask", str(mask),
                                   "--work", str(work)], capture_output=True, text=True,
                                  check=True)
            job = time.perf_counter() - start
            timings = json.loads(done.stdout.strip().splitlines()[-1])
            per_subject = job / batch
            baseline = baseline or per_subject
            print(f"{batch:>5} {job:>8.1f} {timings['load_s']:>13.1f} "
                  f"{timings['predict_s'] / batch:>15.1f} {per_subject:>13.1f} "
                  f"{per_subject / baseline:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
