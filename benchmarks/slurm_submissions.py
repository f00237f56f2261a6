"""sbatch calls and queued jobs of each SLURM plugin, measured on a small study and given for
1,000 images (run by hand, not in CI; needs root, slurm-wlm and munge, as the tests' cluster).

    python benchmarks/slurm_submissions.py [--images 4] [--batch-size 2]

Starts the tests' one-node cluster (tests/slurm_cluster.py), then runs `cmb-workflow run` on
the same small heads with --plugin SLURM, SLURMGraph and slurm-array. For each it counts the
sbatch calls (job ids created; an array is one), the most entries squeue showed at once (a
pending array is one entry) and the most jobs at once as a MaxSubmitJobs limit counts them
(`squeue -r`: each array task is one). The counts per image and per batch measured here give
the line for 1,000 images (prediction batches of 8, the default).
"""

import argparse
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import SMALL_HEADS_BOX, write_small_heads  # noqa: E402
from slurm_cluster import OneNodeCluster  # noqa: E402

STUDY_IMAGES, STUDY_BATCH = 1000, 8


class QueuePeak(threading.Thread):
    """The most squeue entries, and array tasks, seen at once while a run goes on."""

    def __init__(self, env):
        super().__init__(daemon=True)
        self.env, self.entries, self.tasks = env, 0, 0
        self.stopped = threading.Event()

    def count(self, *flags) -> int:
        listing = subprocess.run(["squeue", "--noheader", *flags], env=self.env,
                                 capture_output=True, text=True)
        return len(listing.stdout.splitlines())

    def run(self):
        while not self.stopped.is_set():
            self.entries = max(self.entries, self.count())
            self.tasks = max(self.tasks, self.count("-r"))
            time.sleep(0.2)

    def empty(self) -> bool:
        return self.count() == 0


def measure(plugin: str, study: Path, models: Path, config: Path, root: Path,
            cluster: OneNodeCluster) -> tuple[int, int, int]:
    from cmb_workflow.cli import main

    before = set(cluster.jobs())
    peak = QueuePeak(cluster.env)
    peak.start()
    main(["run", str(study), str(root / plugin), "--models", str(models), "--config",
          str(config), "--plugin", plugin])
    while not peak.empty():  # slurm-array returns once its jobs are queued
        time.sleep(1)
    peak.stopped.set()
    peak.join()
    created = [job for number, job in cluster.jobs().items() if number not in before]
    sbatch_calls = len({job.get("ArrayJobId", job["JobId"]) for job in created})
    return sbatch_calls, peak.entries, peak.tasks


def for_study(plugin: str, images: int, batch_size: int, calls: int, entries: int,
              tasks: int) -> tuple:
    """The counts for STUDY_IMAGES images in batches of STUDY_BATCH, from those measured."""
    batches = math.ceil(images / batch_size)
    study_batches = math.ceil(STUDY_IMAGES / STUDY_BATCH)
    if plugin == "slurm-array":
        # Three calls whatever the size; a pending array is one entry, a running task one
        # more; every task counts against MaxSubmitJobs until it has ended.
        return 3, "3 + running tasks", STUDY_IMAGES + study_batches + 1
    # One job per step of each image and one per batch.
    per_image = (calls - batches) / images
    calls = round(per_image * STUDY_IMAGES) + study_batches
    if plugin == "SLURMGraph":
        # A whole graph at once: the prediction graph, the larger, has the batches too.
        peak = round((entries - batches) / images * STUDY_IMAGES) + study_batches
        return calls, peak, peak
    # Nipype's SLURM plugin queues each image's next step as soon as it is ready: up to one
    # per image in flight (a small study on an idle node drains faster than that).
    return calls, f"up to {STUDY_IMAGES}", f"up to {STUDY_IMAGES}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    import os

    import yaml

    from model_builders import build_dark_voxel_detector

    from cmb_workflow.networks import keras_module, save_fold, write_descriptor

    cluster = OneNodeCluster(cpus=6)
    cluster.start()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        root = Path(tempfile.mkdtemp(prefix="cmb-slurm-bench-"))
        study = write_small_heads(root / "study", args.images)
        model = build_dark_voxel_detector(keras_module("h5"), input_shape=(*SMALL_HEADS_BOX, 1))
        models = write_descriptor(root / "model", [save_fold(model, root / "model", "fold0",
                                                             "h5")],
                                  preprocessing="cmb-workflow-1")
        config = root / "config.yml"
        config.write_text(yaml.safe_dump({
            "final_dimensions": list(SMALL_HEADS_BOX), "predict_batch_size": args.batch_size,
            "slurm": {"memory": "1000M", "predict_memory": "1500M", "gpu": False,
                      "array_throttle": 3}}))
        print(f"{'plugin':<12} {'images':>6} {'sbatch calls':>13} {'queue entries':>22} "
              f"{'jobs (-r)':>10}")
        for plugin in ("SLURM", "SLURMGraph", "slurm-array"):
            counts = measure(plugin, study, models, config, root, cluster)
            print(f"{plugin:<12} {args.images:>6} {counts[0]:>13} {counts[1]:>22} "
                  f"{counts[2]:>10}")
            calls, entries, tasks = for_study(plugin, args.images, args.batch_size, *counts)
            print(f"{plugin:<12} {STUDY_IMAGES:>6} {calls:>13} {entries:>22} {tasks:>10}"
                  "  (from the counts above)")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
