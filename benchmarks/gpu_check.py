"""The GPU check (run by hand through gpu_check.sh, on the day a GPU is available).

    python benchmarks/gpu_check.py [--scans 16] [--cpu-scans 2] [--folds 3] [--base-filters 10]

1. Says which devices TensorFlow sees. Without a GPU it says so and runs the rest on the CPU
   (GPU figures are then skipped), so the script stays tested where no GPU is.
2. Builds SHIVA-sized ensembles in both released formats (random weights: speed and numerics
   do not depend on them): v1 .h5 saved under mixed_float16 (on a GPU it runs in that policy
   natively; the CPU rebuilds it in float32), v2 SavedModels.
3. Predicts `--scans` crops per format with the pipeline's Predict interface, the ensemble
   loaded once, and prints seconds per scan (prediction only, and with the model load) and the
   peak GPU memory.
4. Predicts the first `--cpu-scans` crops again in a process that sees no GPU and prints the
   largest difference of the probabilities, and whether the lesions (the run's default rule)
   are the same (without a GPU this compares two CPU runs: the check of determinism).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import cpu_description
from prediction_speed import write_crops

FORMATS = ("h5", "savedmodel")


def predict_job(descriptor: str, crops: list, masks: list, work: Path) -> dict:
    """Predict in this process; seconds to load, seconds per scan, peak GPU memory."""
    from cmb_workflow.interfaces.predict import Predict
    from cmb_workflow.models import import_tensorflow, load_ensemble

    tf = import_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    start = time.perf_counter()
    load_ensemble(descriptor)  # Predict finds it in the process's cache
    loaded = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    Predict(in_files=[str(c) for c in crops], mask_files=[str(m) for m in masks],
            model_descriptor=descriptor).run(cwd=str(work))
    done = time.perf_counter()
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 30 if gpus else None
    return {"device": "GPU" if gpus else "CPU", "load_s": loaded - start,
            "per_scan_s": (done - loaded) / len(crops), "peak_gpu_gb": peak}


def cpu_job(descriptor: str, crops: list, masks: list, work: Path) -> dict:
    """predict_job in a fresh process that sees no GPU."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, __file__, "--child", descriptor, str(work),
               "--crops", *map(str, crops), "--masks", *map(str, masks)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode:
        sys.exit(f"CPU job failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def lesions(probability: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from cmb_workflow.configs import load_config
    from cmb_workflow.interfaces.lesions import label_lesions

    settings = load_config()
    labels, _ = label_lesions(probability, np.eye(4), settings.threshold, settings.connectivity,
                              settings.min_lesion_size, brain=mask)
    return labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=16)
    parser.add_argument("--cpu-scans", type=int, default=2)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--base-filters", type=int, default=10)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    for name in ("--crops", "--masks"):
        parser.add_argument(name, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        descriptor, work = args.child
        print(json.dumps(predict_job(descriptor, args.crops, args.masks, Path(work))))
        return

    from model_builders import build_unet_ensemble  # on the path prediction_speed sets

    from cmb_workflow.models import import_tensorflow

    tf = import_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    print(f"CPU: {cpu_description()}, TensorFlow {tf.__version__}")
    print("GPU: " + (", ".join(tf.config.experimental.get_device_details(gpu).get(
        "device_name", gpu.name) for gpu in gpus) if gpus else
        "none visible to TensorFlow: GPU figures skipped, everything below ran on the CPU"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crops, masks = write_crops(tmp, args.scans)
        mask = np.asarray(nib.load(masks[0]).dataobj) > 0
        print(f"{'format':<11} {'device':<6} {'scans':>5} {'load s':>7} {'s per scan':>10} "
              f"{'peak GPU GB':>11} {'max |here - CPU|':>16} {'same lesions':>12}")
        for fmt in FORMATS:
            descriptor, _ = build_unet_ensemble(
                tmp / fmt, folds=args.folds, fmt=fmt, base_filters=args.base_filters,
                levels=args.levels, residual=fmt == "savedmodel")
            here = predict_job(str(descriptor), crops, masks, tmp / f"{fmt}-here")
            count = min(args.cpu_scans, args.scans)
            cpu_job(str(descriptor), crops[:count], masks[:count], tmp / f"{fmt}-cpu")
            differences, agreements = [0.0], []
            for index in range(count):
                name = f"probability_{index:03d}.nii"
                here_map = np.asarray(nib.load(tmp / f"{fmt}-here" / name).dataobj)
                cpu_map = np.asarray(nib.load(tmp / f"{fmt}-cpu" / name).dataobj)
                differences.append(float(np.abs(here_map - cpu_map).max()))
                agreements.append(np.array_equal(lesions(here_map, mask), lesions(cpu_map, mask)))
            difference, same = f"{max(differences):.2e}", "yes" if all(agreements) else "NO"
            peak = f"{here['peak_gpu_gb']:.2f}" if here["peak_gpu_gb"] is not None else "n/a"
            print(f"{fmt:<11} {here['device']:<6} {args.scans:>5} {here['load_s']:>7.1f} "
                  f"{here['per_scan_s']:>10.2f} {peak:>11} {difference:>16} {same:>12}",
                  flush=True)


if __name__ == "__main__":
    main()
