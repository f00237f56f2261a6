"""Prediction on CPU: the model repository's way against ours, on the same inputs (by hand).

    python benchmarks/prediction_speed.py [--subjects 1 4 16] [--variants unet resunet]

Per variant (unet: 4-level U-Net as v1 .h5 files under mixed_float16, like the v1 release;
resunet: residual blocks like v2's ResUnet3D, as v2 SavedModels) a SHIVA-sized ensemble is
built (random weights: speed does not depend on them) and timed, every job in a fresh Python
process as on a cluster:
- reference: one process per scan that reads the crop, loads each fold and runs it
  (`model.predict` for v1, after the float32 rebuild without which v1 fails on CPU; `.serve`
  for v2), averages and writes the result, as the model repository's script does. Its cost per
  scan does not depend on the number of scans, so the 1- and 4-subject figures are the first
  scans of the largest run;
- ours: the pipeline's Predict interface in jobs of predict_batch_size scans, the ensemble
  loaded once per job, once per `--precisions` value (bfloat16 jobs run with oneDNN on, as it is
  by default on CPUs with native bfloat16; each row says which precision the node kept: on a CPU
  without it, bfloat16 is emulated and slow).
Times are whole-process wall times (Python start, imports, loads, prediction, NIfTI reading and
writing). The CPU may be shared with other work: compare figures taken in one run.
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

# The networks built for tests and benchmarks live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SHAPE = (160, 214, 176)
VARIANTS = {"unet": ("h5", False), "resunet": ("savedmodel", True)}
FP32_FLOP_PER_CYCLE = 32  # AVX2: 2 FMA units x 8 float32 lanes x 2 operations


def peak_rss_gb() -> float:
    """This process's peak resident memory. Not ru_maxrss: Linux carries the parent's peak
    over fork and exec into it."""
    status = Path("/proc/self/status").read_text()
    kilobytes = next(line for line in status.splitlines() if line.startswith("VmHWM"))
    return int(kilobytes.split()[1]) / 2 ** 20


def reference_job(models: str, crop: str, out: str) -> tuple[float, float]:
    """One scan as the model repository's script does it; (load, predict) seconds."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # v1 .h5 files need tf_keras
    # TensorFlow's own defaults, oneDNN included, as the model repository's script runs it (the
    # pipeline turns oneDNN on wherever TensorFlow leaves it off).
    import tensorflow as tf

    from cmb_workflow import models as model_io

    img = nib.load(crop)
    batch = np.asarray(img.dataobj, np.float32)[np.newaxis, ..., np.newaxis]
    total = np.zeros(SHAPE, np.float64)
    load = predict = 0.0
    folds = model_io.read_descriptor(models).files
    for model_file in folds:
        start = time.perf_counter()
        if model_file.path.is_dir():
            saved_model = tf.saved_model.load(str(model_file.path))
            ready = time.perf_counter()
            output = saved_model.serve(tf.constant(batch)).numpy()
        else:
            model = model_io.load_h5_model(model_file.path)
            ready = time.perf_counter()
            output = model.predict(batch, verbose=0)
        total += output[0, ..., 0]
        load += ready - start
        predict += time.perf_counter() - ready
    probability = (total / len(folds)).astype(np.float32)
    nib.save(nib.Nifti1Image(probability, img.affine), out)
    return load, predict


def our_job(models: str, crops: list, masks: list, work: str,
            precision: str) -> tuple[float, float, str]:
    """One prediction job of the pipeline; (load, predict) seconds and the precision kept."""
    from cmb_workflow.interfaces.predict import Predict
    from cmb_workflow.models import load_ensemble

    start = time.perf_counter()
    load_ensemble(models)  # the Predict below finds it in the process's cache
    loaded = time.perf_counter()
    # No output masking: the reference does not mask either.
    result = Predict(in_files=crops, mask_files=masks, model_descriptor=models,
                     mask_output=False, precision=precision).run(cwd=work)
    return loaded - start, time.perf_counter() - loaded, result.outputs.precision["Precision"]


def child(args) -> None:
    """One job; prints its load and prediction seconds and peak RSS as JSON."""
    precision = "float32"
    if args.approach == "reference":
        load, predict = reference_job(args.models, args.crops[0], args.out)
    else:
        load, predict, precision = our_job(args.models, args.crops, args.masks, args.out,
                                           args.precisions[0])
    print(json.dumps({"load_s": load, "predict_s": predict, "precision": precision,
                      "rss_gb": peak_rss_gb()}))


def run_job(models: Path, approach: str, crops: list, masks: list, out: Path,
            precision: str = "float32"):
    command = [sys.executable, __file__, "--approach", approach, "--models", str(models),
               "--out", str(out), "--crops", *map(str, crops), "--masks", *map(str, masks),
               "--precisions", precision]
    environment = dict(os.environ)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode:
        sys.exit(f"{approach} job failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, json.loads(done.stdout.strip().splitlines()[-1])


def peak_flops() -> tuple[float, int, float]:
    """FP32 peak of the cores this process may use: cores x 32 FLOP/cycle x clock."""
    text = Path("/proc/cpuinfo").read_text()
    ghz = float(next(line for line in text.splitlines() if line.startswith("cpu MHz"))
                .split(":")[1]) / 1000
    cores = len(os.sched_getaffinity(0))
    return cores * FP32_FLOP_PER_CYCLE * ghz * 1e9, cores, ghz


def write_crops(folder: Path, count: int) -> tuple[list, list]:
    """Distinct cropped, scaled scan stand-ins (noise inside an ellipsoid brain) and their one
    brain mask; uncompressed: reading them is not what is measured."""
    grid = np.indices(SHAPE, dtype=np.float32)
    radius = sum(((axis - n / 2) / (0.42 * n)) ** 2 for axis, n in zip(grid, SHAPE))
    mask = (radius < 1).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / "mask.nii")
    crops = []
    for seed in range(count):
        image = np.random.default_rng(seed).uniform(0.3, 0.8, SHAPE).astype(np.float32) * mask
        crops.append(folder / f"crop{seed:02d}.nii")
        nib.save(nib.Nifti1Image(image, np.eye(4)), crops[-1])
    return crops, [folder / "mask.nii"] * count


def bench_variant(name: str, args, tmp: Path, crops: list, masks: list, peak: float) -> None:
    from model_builders import build_unet_ensemble, forward_flops

    from cmb_workflow.configs import load_config

    fmt, residual = VARIANTS[name]
    descriptor, model = build_unet_ensemble(
        tmp / name, folds=args.folds, fmt=fmt, base_filters=args.base_filters,
        levels=args.levels, residual=residual)
    flops = forward_flops(model)
    print(f"\n== {name} ({fmt}): {args.folds} folds x {model.count_params():,} parameters, "
          f"{flops / 1e9:.0f} GFLOP per forward pass of one fold", flush=True)

    most = max(args.subjects)
    reference_jobs = []
    for index in range(most):
        out = tmp / f"{name}_reference_{index:02d}.nii.gz"
        reference_jobs.append(run_job(descriptor, "reference", crops[index:index + 1],
                                      masks[:1], out))
        print(f"  reference scan {index + 1}/{most}: {reference_jobs[-1][0]:.1f} s", flush=True)
    results = {"reference": {n: reference_jobs[:n] for n in args.subjects}}
    batch_size = load_config().predict_batch_size
    for precision in args.precisions:
        approach = f"ours-{precision}"
        results[approach] = {}
        for n in args.subjects:
            jobs = []
            for first in range(0, n, batch_size):
                work = tmp / f"{name}_{approach}_{n}_{first}"
                work.mkdir()
                last = min(first + batch_size, n)
                jobs.append(run_job(descriptor, "ours", crops[first:last], masks[first:last],
                                    work, precision))
            results[approach][n] = jobs
            kept = sorted({job["precision"] for _, job in jobs})
            print(f"  {approach} {n} subjects: {sum(wall for wall, _ in jobs):.1f} s "
                  f"(ran in {', '.join(kept)})", flush=True)

    print(f"{'approach':>14} {'subjects':>8} {'jobs':>4} {'per subject s':>13} "
          f"{'load s/job':>10} {'predict s/fold':>14} {'GFLOP/s':>8} {'% peak':>6} "
          f"{'peak RSS GB':>11} {'vs reference':>12}")
    for approach, by_n in results.items():
        for n, jobs in by_n.items():
            per_subject = sum(wall for wall, _ in jobs) / n
            predict = sum(job["predict_s"] for _, job in jobs)
            rate = flops * args.folds * n / predict
            reference = sum(wall for wall, _ in results["reference"][n]) / n
            print(f"{approach:>14} {n:>8} {len(jobs):>4} {per_subject:>13.1f} "
                  f"{sum(job['load_s'] for _, job in jobs) / len(jobs):>10.1f} "
                  f"{predict / n / args.folds:>14.2f} {rate / 1e9:>8.1f} "
                  f"{100 * rate / peak:>6.1f} {max(job['rss_gb'] for _, job in jobs):>11.2f} "
                  f"{per_subject / reference:>12.2f}")
    reference = nib.load(tmp / f"{name}_reference_00.nii.gz").get_fdata()
    for precision in args.precisions:
        ours = nib.load(tmp / f"{name}_ours-{precision}_{most}_0" / "probability_000.nii")
        print(f"max |ours-{precision} - reference| on the first scan: "
              f"{np.max(np.abs(ours.get_fdata() - reference)):.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--base-filters", type=int, default=10)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", choices=["float32", "bfloat16"],
                        default=["float32", "bfloat16"])
    parser.add_argument("--approach", choices=["reference", "ours"], help=argparse.SUPPRESS)
    for name in ("--models", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--crops", "--masks"):
        parser.add_argument(name, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.approach:
        return child(args)

    peak, cores, ghz = peak_flops()
    print(f"CPU peak: {cores} cores x {FP32_FLOP_PER_CYCLE} FP32 FLOP/cycle x {ghz:.2f} GHz = "
          f"{peak / 1e9:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crops, masks = write_crops(tmp, max(args.subjects))
        for name in args.variants:
            bench_variant(name, args, tmp, crops, masks, peak)


if __name__ == "__main__":
    main()
