"""Wall time of one subject end to end with a SHIVA-sized ensemble (run by hand, not in CI).

    python benchmarks/end_to_end.py [--folds 3] [--base-filters 10] [--levels 4]

Builds the ensemble (random weights: speed does not depend on them) as v1 .h5 files saved
under mixed_float16, writes one phantom, runs `cmb-workflow run` with the Linear plugin and
prints the total; per-step times are in Nipype's "[Node] Finished ..." lines above it.
"""

import argparse
import tempfile
import time
from pathlib import Path

from cmb_workflow import networks
from cmb_workflow.configs import load_config
from cmb_workflow.runner import run_study
from cmb_workflow.synthetic import make_phantom_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--base-filters", type=int, default=10)
    parser.add_argument("--levels", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        descriptor, parameters = networks.build_unet_ensemble(
            tmp / "models", folds=args.folds, base_filters=args.base_filters, levels=args.levels)
        print(f"U-Net: {parameters:,} parameters per fold, {args.folds} folds")
        make_phantom_dataset(tmp / "bids", 1, seed=7, modalities=("swi",))
        config = load_config(overrides={"models": str(descriptor), "plugin": "Linear"})
        start = time.perf_counter()
        run_study(tmp / "bids", tmp / "out", config)
        total = time.perf_counter() - start
        print(f"one subject end to end: {total:.1f} s")


if __name__ == "__main__":
    main()
