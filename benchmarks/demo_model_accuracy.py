"""Accuracy of CMB models on held-out phantoms, per look and acquisition grid (run by hand, not in CI).

    python benchmarks/demo_model_accuracy.py [--models A.json,B.json] [--subjects 14] [--seed 555]
        [--styles standard,contrast-b,contrast-c] [--true-masks]
        [--min-peak-probability P] [--sweep P,P,...] [--keep DIR]

Writes phantoms of each style from a seed the demo model was not trained on (its training seeds
come from cmb_workflow.training.TRAIN_SEED), runs `cmb-workflow run` on them with each model and
prints the lesion-wise tables for microbleeds >= 3 mm across (the demo model's target:
sensitivity >= 0.85 and at most 1 false positive per scan on every style), then for all sizes,
and at the end one line per style and model. --true-masks gives the run the phantoms' true brain
masks (faster; the template registration is then not part of what is measured).

--sweep scores the same results at each detection threshold (evaluate's min_peak_probability),
pooled and on the worst grid: run with --min-peak-probability 0 on validation phantoms to
choose a model's threshold (the demo model's: cmb_workflow.training.DEMO_MIN_PEAK_PROBABILITY).
"""

import argparse
import tempfile
import time
from pathlib import Path

from cmb_workflow.configs import load_config
from cmb_workflow.demo import demo_model_descriptor
from cmb_workflow.evaluate import evaluate, format_tables
from cmb_workflow.runner import run_study
from cmb_workflow.synthetic import STYLES, make_phantom_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(demo_model_descriptor()),
                        help="model descriptors or installed names, comma-separated")
    parser.add_argument("--styles", default="standard",
                        help=f"phantom looks, comma-separated, among {', '.join(STYLES)}")
    parser.add_argument("--true-masks", action="store_true",
                        help="supply the phantoms' true brain masks")
    parser.add_argument("--subjects", type=int, default=14,
                        help="phantoms (14: every grid in both modalities)")
    parser.add_argument("--seed", type=int, default=555)
    parser.add_argument("--keep", help="folder to keep phantoms and results in")
    parser.add_argument("--min-peak-probability", type=float,
                        help="the run's detection threshold (default: the model's own)")
    parser.add_argument("--sweep", type=lambda text: [float(p) for p in text.split(",")],
                        default=[], metavar="P,P,...",
                        help="detection thresholds to score the results at")
    args = parser.parse_args()
    summary = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        for style in args.styles.split(","):
            phantoms = root / f"phantoms-{style}"
            make_phantom_dataset(phantoms, args.subjects, seed=args.seed, style=style)
            truth = phantoms / "derivatives" / "phantom-truth"
            for number, model in enumerate(args.models.split(",")):
                results = root / f"results-{style}-model{number}"
                config = load_config(overrides={
                    "models": model, "min_peak_probability": args.min_peak_probability,
                    "masks_dir": str(truth) if args.true_masks else None})
                start = time.perf_counter()
                run_study(phantoms, results, config)
                elapsed = time.perf_counter() - start
                print(f"\n##### style {style}, model {model}: {elapsed:.0f} s for "
                      f"{args.subjects} subjects")
                for min_diameter in (3.0, 0.0):
                    print(f"\n=== microbleeds >= {min_diameter:g} mm ===")
                    tables = evaluate(truth, results, min_diameter_mm=min_diameter)
                    print(format_tables(tables))
                    if min_diameter:
                        summary.append((style, model, pooled_row(tables)))
                if args.sweep:
                    print_sweep(truth, results, args.sweep)
    print("\n=== microbleeds >= 3 mm, pooled (Wilson / Poisson 95 % intervals) ===")
    for style, model, row in summary:
        print(f"{style:11} {model}: sensitivity {row['sensitivity']:.3f} "
              f"[{row['sensitivity_ci_low']:.3f}, {row['sensitivity_ci_high']:.3f}], "
              f"FP/scan {row['fp_per_scan']:.2f} "
              f"[{row['fp_per_scan_ci_low']:.2f}, {row['fp_per_scan_ci_high']:.2f}]")


def pooled_row(tables):
    return next(row for row in tables["summary"]
                if row["view"] == "distance" and row["scope"] == "pooled")


def print_sweep(truth, results, peaks):
    """Lesion-wise figures (>= 3 mm, 5 mm matching) at each detection threshold."""
    print("\n=== detection threshold sweep, microbleeds >= 3 mm (thresholds below the run's "
          "own score as the run's) ===")
    print("min_peak  sens   FP/scan  F1     lowest grid sens       highest grid FP/scan")
    for peak in peaks:
        tables = evaluate(truth, results, min_diameter_mm=3.0, min_peak_probability=peak)
        pooled = pooled_row(tables)
        grids = [row for row in tables["by_grid"] if row["view"] == "distance"]
        weakest = min(grids, key=lambda row: row["sensitivity"])
        busiest = max(grids, key=lambda row: row["fp_per_scan"])
        print(f"{peak:<8g}  {pooled['sensitivity']:.3f}  {pooled['fp_per_scan']:<7.2f}  "
              f"{pooled['f1']:.3f}  {weakest['sensitivity']:.3f} {weakest['group']:<16}  "
              f"{busiest['fp_per_scan']:.2f} {busiest['group']}")


if __name__ == "__main__":
    main()
