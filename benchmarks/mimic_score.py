"""How well the mimic score separates false positives from microbleeds (run by hand, not in CI).

    python benchmarks/mimic_score.py [--subjects 6] [--styles standard,contrast-b] [--seed 777]
        [--keep DIR]

For every phantom style and two detectors (the demo model, and the tests' hand-weighted
dark-spot detector, which has no training at all), runs `cmb-workflow run` on phantoms the demo
model was not trained on, then scores the results with `evaluate` twice: all lesions, and
without the ones flagged likely_mimic. Prints, per style and detector, the share of false
positives flagged (target >= 50 %) and of true microbleeds of 3 mm and more flagged (target
<= 5 %), with Wilson 95 % intervals, and evaluate's pooled rows for both views.
"""

import argparse
import tempfile
import time
from pathlib import Path

from machine import cpu_description
from scipy.stats import binomtest

from cmb_workflow.configs import load_config
from cmb_workflow.demo import demo_model_descriptor
from cmb_workflow.evaluate import evaluate, format_tables
from cmb_workflow.networks import build_detector_ensemble
from cmb_workflow.runner import run_study
from cmb_workflow.synthetic import STYLES, make_phantom_dataset


def share(part: int, whole: int) -> str:
    if not whole:
        return "n/a"
    interval = binomtest(part, whole).proportion_ci(method="wilson")
    return f"{part}/{whole} = {part / whole:.0%} [{interval.low:.0%}, {interval.high:.0%}]"


def pooled(tables, view):
    return next(row for row in tables["summary"]
                if row["view"] == view and row["scope"] == "pooled")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6, help="phantoms per style")
    parser.add_argument("--styles", default=",".join(STYLES))
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--keep", help="folder to keep phantoms and results in")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        detectors = {
            "demo": demo_model_descriptor(),
            "dark-spot": build_detector_ensemble(root / "models" / "dark-spot", "savedmodel",
                                                 folds=1, preprocessing="cmb-workflow-1",
                                                 min_peak_probability=0.5),
        }
        lines = []
        for style in args.styles.split(","):
            phantoms = root / style / "phantoms"
            make_phantom_dataset(phantoms, args.subjects, seed=args.seed, style=style)
            truth = phantoms / "derivatives" / "phantom-truth"
            for name, descriptor in detectors.items():
                results = root / style / name
                start = time.perf_counter()
                run_study(phantoms, results, load_config(overrides={"models": str(descriptor)}))
                elapsed = time.perf_counter() - start
                tables = evaluate(truth, results, min_diameter_mm=3.0, drop_likely_mimics=True)
                every, kept = pooled(tables, "distance"), pooled(tables, "distance_no_mimics")
                lines.append(f"{style:11} {name:9} FP flagged {share(every['fp'] - kept['fp'], every['fp']):28}"
                             f" microbleeds >= 3 mm flagged "
                             f"{share(every['tp'] - kept['tp'], every['tp'])}")
                print(f"\n=== {style}, {name} ({args.subjects} scans, {elapsed:.0f} s) ===")
                print(format_tables({**tables, "summary": [
                    row for row in tables["summary"] if row["view"].startswith("distance")],
                    "by_size": [], "by_grid": [], "subjects": []}))
        print("\n=== mimic flags per style and detector (Wilson 95 % intervals) ===")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
