"""Wall time and memory of one subject end to end, per stage, with a SHIVA-sized ensemble
(run by hand, not in CI).

    python benchmarks/end_to_end.py [--folds 3] [--base-filters 10] [--levels 4]

Builds the ensemble (random weights: speed does not depend on them) as v1 .h5 files saved
under mixed_float16, its output pushed near 0 so that post-processing sees a clean scan, as a
real scan mostly is (random weights alone put a probability near 0.5 everywhere: thousands of
lesions, which the QC flags, and minutes of mimic scoring), writes one phantom and runs
`cmb-workflow run` with the Linear plugin.
Prints the total, then each node's time in that run (Nipype's runtime) and the peak memory of
that node run again alone in a fresh Python process, as a cluster job runs it (so it includes
Python, the imports and, for predict, TensorFlow and the folds).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prediction_speed import peak_rss_gb

# The networks built for tests and benchmarks live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def rerun_node(node_file: str) -> None:
    """Run a node again from its pickle, in this (fresh) process; print its peak RSS in GB."""
    from nipype.utils.filemanip import loadpkl

    node = loadpkl(node_file)
    node.overwrite = True
    node.run()
    print(peak_rss_gb())


def stage_table(work_dir: Path) -> None:
    from nipype.utils.filemanip import loadpkl

    print(f"{'node':<48} {'time s':>7} {'peak RSS GB (alone)':>20}")
    for node_file in sorted(work_dir.rglob("_node.pklz"), key=lambda path: path.stat().st_mtime):
        folder = node_file.parent
        result = loadpkl(next(folder.glob("result_*.pklz")))
        done = subprocess.run([sys.executable, __file__, "--rerun", str(node_file)],
                              capture_output=True, text=True, check=True)
        peak = float(done.stdout.strip().splitlines()[-1])
        print(f"{str(folder.relative_to(work_dir)):<48} {result.runtime.duration:>7.1f} "
              f"{peak:>20.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--base-filters", type=int, default=10)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--rerun", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rerun:
        return rerun_node(args.rerun)
    from model_builders import build_unet_ensemble

    from cmb_workflow.configs import load_config
    from cmb_workflow.runner import run_study
    from cmb_workflow.synthetic import make_phantom_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        descriptor, model = build_unet_ensemble(
            tmp / "models", folds=args.folds, base_filters=args.base_filters, levels=args.levels,
            output_bias=-20.0)
        print(f"U-Net: {model.count_params():,} parameters per fold, {args.folds} folds")
        make_phantom_dataset(tmp / "bids", 1, seed=7, modalities=("swi",))
        config = load_config(overrides={"models": str(descriptor), "plugin": "Linear"})
        start = time.perf_counter()
        run_study(tmp / "bids", tmp / "out", config)
        total = time.perf_counter() - start
        print(f"one subject end to end: {total:.1f} s")
        stage_table(tmp / "out" / "work")


if __name__ == "__main__":
    main()
