"""How well the mimic score separates false positives from microbleeds (run by hand, not in CI).

    python benchmarks/mimic_score.py [--subjects 6] [--styles standard,contrast-b] [--seed 200]
        [--models A.json,B.json] [--no-dark-blob]

For every phantom style and two detectors (the demo model, and a fixed dark-blob filter with no
training at all, defined here), prepares each phantom as the demo model's pipeline does (from
the phantom's true brain mask: the template registration is not what is measured), predicts,
labels the lesions with the run's rule and scores them with the pipeline's own functions. A
lesion touching a true microbleed is a true positive, any other a false positive. Prints, per
style and detector, the sensitivity for microbleeds of 3 mm and more and the false positives
per scan, the share of false positives flagged likely_mimic (target >= 50 %) and of true
microbleeds of 3 mm and more flagged (target <= 5 %), with Wilson 95 % intervals (evaluate's),
and the features of every lesion with --verbose.
"""

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from machine import cpu_description
from scipy import ndimage

from cmb_workflow.configs import MASK_INPUT, load_config
from cmb_workflow.demo import demo_model_descriptor
from cmb_workflow.evaluate import fp_per_scan_interval, wilson_interval
from cmb_workflow.interfaces.lesions import label_lesions
from cmb_workflow.mimics import FEATURE_COLUMNS, score_lesions
from cmb_workflow.models import load_ensemble
from cmb_workflow.synthetic import STYLES, make_phantom
from cmb_workflow.training import DEMO_CONVENTION, lesion_target, phantom_model_input

MIN_DIAMETER_MM = 3.0


class DarkBlobDetector:
    """A second detector built unlike the demo model: the largest centre-surround contrast over
    a few blob sizes, (surround - centre) / surround, with Gaussian centres and surrounds
    averaged over the brain only (so the masked-out outside does not read as dark). Fixed
    weights, no training; veins, edges and dark nuclei respond to it too, as to any detector."""

    CENTRE_SIGMAS_MM = (0.8, 1.4, 2.4)
    SURROUND_RATIO = 2.5
    HALF_CONTRAST = 0.25  # the contrast at probability 0.5

    def predict(self, image, mask):
        inside = mask.astype(np.float32)
        image = image * inside

        def brain_mean(sigma):
            return ndimage.gaussian_filter(image, sigma) / np.maximum(
                ndimage.gaussian_filter(inside, sigma), 1e-3)
        contrast = np.zeros(image.shape, np.float32)
        for sigma in self.CENTRE_SIGMAS_MM:  # the crop is on a 1 mm grid
            surround = brain_mean(sigma * self.SURROUND_RATIO)
            scale = (surround - brain_mean(sigma)) / np.maximum(surround, 1e-3)
            np.maximum(contrast, scale, out=contrast)
        contrast = np.clip(contrast, 0, None)
        return (contrast / (contrast + self.HALF_CONTRAST)).astype(np.float32)


class Ensemble:
    def __init__(self, descriptor):
        self.ensemble = load_ensemble(descriptor)

    def predict(self, image, mask):
        given = image * mask if MASK_INPUT[DEMO_CONVENTION] else image
        return self.ensemble.predict(given[None, ..., None])[0]


def share(part: int, whole: int) -> str:
    if not whole:
        return "n/a"
    low, high = wilson_interval(part, whole)
    return f"{part}/{whole} = {part / whole:.0%} [{low:.0%}, {high:.0%}]"


def prepared(phantom, config, folder):
    """(the normalised crop, its brain mask, its affine, the true microbleeds numbered as in
    phantom.lesions) of one phantom."""
    data, mask, affine = phantom_model_input(phantom, config, folder)
    truth = np.zeros(data.shape, np.int16)
    for number, lesion in enumerate(phantom.lesions, start=1):
        truth[lesion_target([lesion], affine, data.shape) & (truth == 0)] = number
    return data, mask, affine, truth


def scored_lesions(phantom, prepared_input, probability, min_peak, config, score=score_lesions):
    """The scored lesion rows of one phantom, each with `truth_diameter` (0: false positive),
    and the numbers of true microbleeds of MIN_DIAMETER_MM and more found and present."""
    data, mask, affine, truth = prepared_input
    labels, rows = label_lesions(probability * mask, affine, config.threshold,
                                 config.connectivity, config.min_lesion_size, min_peak, mask)
    rows = score(rows, data, labels, mask, affine)  # the unmasked crop, as in a run
    found = set()
    for row in rows:
        touched = [k for k in np.unique(truth[labels == row["label"]]) if k]
        found.update(touched)
        row["truth_diameter"] = max((phantom.lesions[k - 1]["diameter_mm"] for k in touched),
                                    default=0.0)
    large = {number for number, lesion in enumerate(phantom.lesions, start=1)
             if lesion["diameter_mm"] >= MIN_DIAMETER_MM}
    return rows, len(large & found), len(large)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6, help="phantoms per style")
    parser.add_argument("--styles", default=",".join(STYLES))
    parser.add_argument("--seed", type=int, default=200, help="first phantom seed")
    parser.add_argument("--verbose", action="store_true", help="print every lesion's features")
    parser.add_argument("--models", default=str(demo_model_descriptor()),
                        help="model descriptors, comma-separated (default: the demo model)")
    parser.add_argument("--no-dark-blob", action="store_true",
                        help="leave the dark-blob filter out")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}")
    config = load_config()
    # (detector, the lesion's least peak probability)
    detectors = {}
    for number, descriptor in enumerate(args.models.split(",")):
        model = Ensemble(descriptor)
        name = "demo" if number == 0 else f"model{number}"
        print(f"{name}: {descriptor} ({model.ensemble.descriptor.version})")
        detectors[name] = (model, model.ensemble.descriptor.min_peak_probability or 0.0)
    if not args.no_dark_blob:
        detectors["dark-blob"] = (DarkBlobDetector(), 0.6)
    results = defaultdict(list)
    detected = defaultdict(lambda: np.zeros(2, int))
    with tempfile.TemporaryDirectory() as scratch:
        for style in args.styles.split(","):
            for seed in range(args.seed, args.seed + args.subjects):
                n_cmb = int(np.random.default_rng(seed).integers(5, 13))
                phantom = make_phantom(seed, style=style, n_cmb=n_cmb)
                given = prepared(phantom, config, Path(scratch) / f"{style}-{seed}")
                for name, (detector, min_peak) in detectors.items():
                    probability = detector.predict(given[0], given[1])
                    rows, found, present = scored_lesions(phantom, given, probability,
                                                          min_peak, config)
                    results[style, name] += rows
                    detected[style, name] += np.array([found, present])
                    if args.verbose:
                        for row in rows:
                            print(style, seed, name, row["truth_diameter"], row["volume_mm3"],
                                  *(f"{key}={row[key]}" for key in FEATURE_COLUMNS),
                                  row["mimic_score"])
    print(f"\n=== likely_mimic flags, {args.subjects} phantoms per style (Wilson 95 %) ===")
    for (style, name), rows in results.items():
        false = [row for row in rows if not row["truth_diameter"]]
        true = [row for row in rows if row["truth_diameter"] >= MIN_DIAMETER_MM]

        def flagged(subset):
            return sum(row["likely_mimic"] == "yes" for row in subset)
        found, present = detected[style, name]
        low, high = fp_per_scan_interval(len(false), args.subjects)
        print(f"{style:11} {name:9} sensitivity >= 3 mm {share(found, present):27} "
              f"FP/scan {len(false) / args.subjects:.1f} [{low:.1f}, {high:.1f}]; "
              "false positives flagged "
              f"{share(flagged(false), len(false)):27} microbleeds >= 3 mm flagged "
              f"{share(flagged(true), len(true))}")


if __name__ == "__main__":
    main()
