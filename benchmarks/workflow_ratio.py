"""The whole workflow against prediction alone, the model repository's way (by hand, not in CI).

    python benchmarks/workflow_ratio.py [--subjects 4] [--format savedmodel] [--folds 3]
                                        [--precisions float32 auto]

On N phantoms and one SHIVA-sized ensemble (random weights, output pushed near 0 so that
post-processing sees a clean scan, as a real scan mostly is):
- ours: `cmb-workflow run` with MultiProc on every core, from the raw images to OUT (conform,
  brain mask with template registration, crop, normalise, predict, lesions, mimic scores,
  regions, native space, QC, reports), each run a new process started as a user starts it;
- reference: the crops our run gave the model, predicted one process per scan as the model
  repository's script does (benchmarks/prediction_speed.py's reference job), one after the
  other.
Ours runs in float32, then in auto (bfloat16 only where the CPU has it natively) twice: the
model's first use on this CPU, with its float32 check, and a later use, which follows the kept
outcome.
Prints the wall times and their ratios (the target is <= 1.0), each node's mean wall seconds in
the last run, the CPU seconds of the first image's nodes (and the first prediction job) run again
alone, each in a fresh process as a cluster job runs it (so with Python's start and imports;
Nipype's own resource monitor counts threads several times over), and the critical path: the
slowest image's preprocessing chain, prediction, and the slowest image's post-processing chain
(its nodes run one after the other, but for to_native beside regions), and where the cores ran
no node: before the first step, at the boundary between the graphs, after the last step, and
inside the graphs. CPU seconds are the figure to compare on a shared machine; wall seconds
follow the load.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from machine import cpu_description
from prediction_speed import run_job

# Post-processing nodes that run beside the chain (to_native needs only the mimic labels).
BESIDE_THE_CHAIN = {"to_native"}


def node_times(work: Path) -> tuple[dict, list]:
    """(graph -> image -> node -> (wall s in the run, node folder), and every node's (graph,
    name, start, end) in epoch seconds) from Nipype's result files."""
    from datetime import datetime, timezone

    from nipype.utils.filemanip import loadpkl

    def epoch(stamp: str) -> float:  # Nipype's times are UTC, marked as such or not
        moment = datetime.fromisoformat(stamp)
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()

    times = defaultdict(lambda: defaultdict(dict))
    spans = []
    for result_file in work.rglob("result_*.pklz"):
        folder = result_file.parent
        parts = folder.relative_to(work).parts
        runtime = loadpkl(result_file).runtime
        times[parts[0]][parts[1]][parts[-1]] = (float(runtime.duration), folder)
        spans.append((parts[0], parts[-1], epoch(runtime.startTime), epoch(runtime.endTime)))
    return times, spans


def idle_core_seconds(spans, run_start: float, run_end: float, cores: int) -> dict:
    """Core-seconds in which no node ran, by where they fall in the run: before the first node,
    between the preprocessing graph's last node and the prediction graph's first, after the
    last node, and the rest (inside the graphs). A prediction job counts for every core."""
    events = sorted({run_start, run_end, *(t for span in spans for t in span[2:])})
    pre_end = max(end for graph, _, _, end in spans if graph == "preprocess")
    predict_start = min(start for graph, _, start, _ in spans if graph == "predict")
    first, last = min(span[2] for span in spans), max(span[3] for span in spans)
    idle = defaultdict(float)
    for begin, end in zip(events, events[1:]):
        middle = (begin + end) / 2
        busy = sum(cores if node == "predict" else 1
                   for _, node, start, stop in spans if start <= middle < stop)
        where = ("before the first node" if middle < first else
                 "after the last node" if middle > last else
                 "between the graphs" if pre_end <= middle < predict_start else
                 "inside the graphs")
        idle[where] += max(cores - busy, 0) * (end - begin)
    return dict(idle)


def rerun_cpu_seconds(folder: Path) -> float:
    """CPU seconds of the node in `folder` run again in a fresh process (end_to_end's rerun)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, str(Path(__file__).with_name("end_to_end.py")), "--rerun",
                    str(folder / "_node.pklz")], check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--format", choices=["savedmodel", "h5"], default="savedmodel")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--base-filters", type=int, default=10)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--precisions", nargs="+", choices=["float32", "auto"],
                        default=["float32", "auto"],
                        help="our runs: float32, and auto twice (bfloat16 where the CPU has "
                             "it natively: its first use with the float32 check, then a later "
                             "use; skipped where it would be float32 again)")
    args = parser.parse_args()

    from model_builders import build_unet_ensemble  # on the path prediction_speed sets

    from cmb_workflow.synthetic import make_phantom_dataset

    print(f"CPU: {cpu_description()}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        descriptor, model = build_unet_ensemble(
            tmp / "models", folds=args.folds, fmt=args.format, base_filters=args.base_filters,
            levels=args.levels, residual=args.format == "savedmodel", output_bias=-20.0)
        print(f"ensemble: {args.format}, {args.folds} folds x {model.count_params():,} "
              f"parameters; {args.subjects} phantoms")
        make_phantom_dataset(tmp / "bids", args.subjects, seed=args.seed, modalities=("swi",))
        from cmb_workflow.models import bfloat16_candidate

        # A home of its own: the first auto run checks bfloat16 against float32 (the model's
        # first use on this CPU), the second follows the kept outcome, as later runs do.
        os.environ["CMB_WORKFLOW_HOME"] = str(tmp / "home")
        runs = ["float32"] + (["auto (first use)", "auto (later use)"]
                              if "auto" in args.precisions and bfloat16_candidate("auto")[0]
                              else [])
        runs = [run for run in runs if run.split()[0] in args.precisions]
        walls = {}
        for index, run in enumerate(runs):
            precision = run.split()[0]
            out = tmp / f"out_{index}"
            command = [str(Path(sys.executable).with_name("cmb-workflow")), "run",
                       str(tmp / "bids"), str(out), "--models", str(descriptor), "--plugin",
                       "MultiProc", "--precision", precision]
            run_start = time.time()
            subprocess.run(command, check=True, capture_output=True)
            run_end = time.time()
            walls[run] = run_end - run_start
            sidecar = json.loads(next(out.rglob("*_probseg.json")).read_text())
            print(f"ours, precision {run}: {walls[run]:.1f} s, predicted in "
                  f"{sidecar['Precision']} ({sidecar['PrecisionReason']})", flush=True)

        records = [json.loads(path.read_text())
                   for path in sorted((out / "work" / "handoff").glob("*.json"))]
        reference = 0.0
        for index, record in enumerate(records):
            wall, _ = run_job(descriptor, "reference", [record["image"]], [record["mask"]],
                              tmp / f"reference_{index:02d}.nii.gz")
            reference += wall
        print(f"\nreference, prediction alone: {reference:.1f} s "
              f"({reference / len(records):.1f} s per scan)")
        for run, ours in walls.items():
            print(f"ours, whole workflow, precision {run}: {ours:.1f} s "
                  f"({ours / len(records):.1f} s per scan); ratio ours / reference: "
                  f"{ours / reference:.2f}")

        print(f"\nnodes of the run with precision {run}:")
        times, spans = node_times(out / "work")
        print(f"\n{'graph':<11} {'node':<20} {'images':>6} {'wall s':>7} {'CPU s alone':>11}  "
              "(wall: mean per image in the run; predict: per job)")
        for graph, images in times.items():
            nodes = defaultdict(list)
            for image_nodes in images.values():
                for node, figures in image_nodes.items():
                    nodes[node].append(figures)
            for node, figures in sorted(nodes.items(), key=lambda item: -sum(
                    wall for wall, _ in item[1])):
                cpu = rerun_cpu_seconds(figures[0][1])
                print(f"{graph:<11} {node:<20} {len(figures):>6} "
                      f"{sum(w for w, _ in figures) / len(figures):>7.1f} {cpu:>11.1f}",
                      flush=True)

        def chain(graph: str, skip=()) -> float:
            return max((sum(wall for node, (wall, _) in nodes.items() if node not in skip)
                        for image, nodes in times[graph].items() if "predict" not in nodes),
                       default=0.0)

        predict = max((nodes["predict"][0] for nodes in times["predict"].values()
                       if "predict" in nodes), default=0.0)
        preprocess, postprocess = chain("preprocess"), chain("predict", BESIDE_THE_CHAIN)
        print(f"\ncritical path: preprocessing {preprocess:.1f} s + prediction {predict:.1f} s "
              f"+ post-processing {postprocess:.1f} s = {preprocess + predict + postprocess:.1f} "
              f"s of the run's {ours:.1f} s")
        # What the phase boundaries (and anything else) leave idle: core-seconds in which no
        # node ran, a prediction job counting for every core (TensorFlow uses them all; two
        # jobs side by side share them).
        cores = len(os.sched_getaffinity(0))
        idle = idle_core_seconds(spans, run_start, run_end, cores)
        busy = cores * ours - sum(idle.values())
        print(f"nodes ran {busy:.1f} s of {cores} cores x {ours:.1f} s "
              f"({100 * busy / (cores * ours):.0f} %): {cores * ours - busy:.1f} core-s with no "
              "node running:")
        for where, seconds in idle.items():
            print(f"  {where}: {seconds:.1f} core-s")


if __name__ == "__main__":
    main()
