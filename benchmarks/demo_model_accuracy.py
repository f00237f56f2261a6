"""Accuracy of a CMB model on held-out phantoms, per acquisition grid (run by hand, not in CI).

    python benchmarks/demo_model_accuracy.py [--models model_info.json] [--subjects 14] [--seed 555]

Writes phantoms from a seed the demo model was not trained on (its training seeds come from
cmb_workflow.training.TRAIN_SEED), runs `cmb-workflow run` on them and prints the lesion-wise
tables for microbleeds >= 3 mm across (the demo model's target: sensitivity >= 0.85 and at most
1 false positive per scan on every grid), then for all sizes.
"""

import argparse
import tempfile
import time
from pathlib import Path

from cmb_workflow.configs import load_config
from cmb_workflow.demo import demo_model_descriptor
from cmb_workflow.evaluate import evaluate, format_tables
from cmb_workflow.runner import run_study
from cmb_workflow.synthetic import make_phantom_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(demo_model_descriptor()))
    parser.add_argument("--subjects", type=int, default=14,
                        help="phantoms (14: every grid in both modalities)")
    parser.add_argument("--seed", type=int, default=555)
    parser.add_argument("--keep", help="folder to keep phantoms and results in")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        make_phantom_dataset(root / "phantoms", args.subjects, seed=args.seed)
        config = load_config(overrides={"models": args.models})
        start = time.perf_counter()
        run_study(root / "phantoms", root / "results", config)
        elapsed = time.perf_counter() - start
        truth = root / "phantoms" / "derivatives" / "phantom-truth"
        for min_diameter in (3.0, 0.0):
            print(f"\n=== microbleeds >= {min_diameter:g} mm ===")
            print(format_tables(evaluate(truth, root / "results", min_diameter_mm=min_diameter)))
        print(f"\npipeline: {elapsed:.0f} s for {args.subjects} subjects")


if __name__ == "__main__":
    main()
