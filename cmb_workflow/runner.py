"""Run the study: find images, run the graphs (preprocessing, then batched prediction and
post-processing), and write the summary."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from . import __version__
from .bids import find_images
from .configs import ConfigError
from .imageops import write_text_atomic
from .interfaces.derivatives import report_name
from .models import is_probability, read_descriptor, verify
from .regions import mars_counts
from .slurm import SLURM_PLUGINS, SbatchArgs, prepare as prepare_slurm, wait_for_jobs

LOGGER = logging.getLogger("cmb_workflow")
# Crash files go to the run log only; the terminal gets their one-line reasons.
CRASH_LOGGER = logging.getLogger("cmb_workflow.crash")
CRASH_LOGGER.propagate = False

# The brain mask's quality columns come from its sidecar (see interfaces.brainmask.mask_quality).
MASK_QUALITY_COLUMNS = ("brain_volume_ml", "mask_fov_edge_fraction")
CLASS_COLUMNS = ("n_lobar", "n_deep", "n_infratentorial", "strictly_lobar")
SUMMARY_COLUMNS = ("subject", "session", "run", "source", "n_cmb", *CLASS_COLUMNS,
                   "total_volume_mm3", *MASK_QUALITY_COLUMNS, "qc_flags", "status", "message")
# OUT/qc.tsv: the metrics of interfaces.qc (its JSON keys) for every processed image.
QC_COLUMNS = ("subject", "session", "run", "source", "brain_volume_ml", "mask_fov_edge_fraction",
              "brain_outside_crop_fraction", "saturated_fraction", "dark_fraction", "n_clusters",
              "largest_cluster_mm3", "template_brain_dice", "registration_error", "qc_flags")


def run_study(in_dir, out_dir, config: dict, command_line: str = "") -> int:
    """Process every image; returns 0 when all succeeded, 1 when some failed.

    command_line: how the run was started, recorded in the reports."""
    out_dir = Path(out_dir).resolve()
    work_dir = Path(config["work_dir"] or out_dir / "work").resolve()
    descriptor = read_descriptor(config["models"])
    # Refuse a tampered model here, once, before any subject starts.
    verify(descriptor, allow_unverified=config["allow_unverified_models"])
    config = _with_detection_thresholds(config, descriptor)
    if config["brain_mask_model"]:
        verify(read_descriptor(config["brain_mask_model"], expected_target="brain_mask"),
               allow_unverified=config["allow_unverified_models"])

    jobs, rejected = find_images(in_dir, input_type=config["input_type"],
                                 participant_label=config["participant_label"],
                                 session_label=config["session_label"], echo=config["echo"],
                                 masks_dir=config["masks_dir"])
    labels = {job.node_name: job.prefix for job in jobs}
    execution = _Execution(config, out_dir / "logs" / "slurm", labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_dataset_description(out_dir, descriptor)
    crash_dir = work_dir / "crash"
    # Handoff records prove that this run (not an earlier one) prepared an image.
    handoff_dir = work_dir / "handoff"
    for folder in (crash_dir, handoff_dir):
        shutil.rmtree(folder, ignore_errors=True)
    log_file = _configure_nipype(work_dir, crash_dir, out_dir / "logs")

    for job in jobs:
        LOGGER.info("%s: %s%s", job.prefix, job.source,
                    f" (brain mask {job.mask})" if job.mask else "")
    prepared: dict[str, dict] = {}
    batch_of: dict[str, str] = {}
    if jobs:
        from .workflow.base import init_predict_study_wf, init_preprocess_study_wf

        execution.run(init_preprocess_study_wf(jobs, config, str(handoff_dir), str(work_dir)))
        prepared = {job.node_name: json.loads(record.read_text()) for job in jobs
                    if (record := handoff_dir / f"{job.node_name}.json").exists()}
        batches = _batches(jobs, prepared, config["predict_batch_size"])
        for name, batch in batches.items():
            labels[name] = ", ".join(job.prefix for job in batch)
            batch_of.update({job.node_name: name for job in batch})
        if batches:
            execution.run(init_predict_study_wf(batches, prepared, config, str(out_dir),
                                                str(work_dir), execution.predict_plugin_args,
                                                command_line))

    rows, qc_rows = _summary_rows(jobs, rejected, out_dir, _crash_reasons(crash_dir), prepared,
                                  batch_of)
    _write_tsv(out_dir / "cmb_summary.tsv", rows, SUMMARY_COLUMNS)
    _write_tsv(out_dir / "qc.tsv", qc_rows, QC_COLUMNS)
    from .reporting import write_index

    write_index(out_dir, rows, SUMMARY_COLUMNS, descriptor.json_path)
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed:
        LOGGER.error("FAILED %s: %s", row["source"], row["message"])
    LOGGER.info("%d image(s) processed, %d failed; summary: %s; log: %s", len(rows) - len(failed),
                len(failed), out_dir / "cmb_summary.tsv", log_file)
    return 1 if failed else 0


def _with_detection_thresholds(config: dict, descriptor) -> dict:
    """config with min_peak_probability resolved (unset: the model's own, else none), both
    thresholds checked."""
    if config["min_peak_probability"] is None:
        config = {**config, "min_peak_probability": descriptor.min_peak_probability or 0.0}
    for key in ("threshold", "min_peak_probability"):
        if not is_probability(config[key]):
            raise ConfigError(f"{key} {config[key]!r}: expected a probability between 0 and 1")
    return config


def _batches(jobs, prepared: dict, size: int) -> dict[str, list]:
    """Prediction batches: fixed slices of the image list, keeping the prepared images.

    Fixed slices mean an image that fails preprocessing changes only its own batch, so the
    other batches' cached predictions stay valid when the run is repeated.
    """
    batches = {}
    for start in range(0, len(jobs), size):
        batch = [job for job in jobs[start:start + size] if job.node_name in prepared]
        if batch:
            batches[f"batch_{start // size:04d}"] = batch
    return batches


class _Execution:
    """How the graphs run: the Nipype plugin, its arguments, and the progress lines."""

    def __init__(self, config: dict, job_log_dir: Path, labels: dict):
        from nipype.pipeline import plugins
        from nipype.pipeline.plugins.base import GraphPluginBase

        self.plugin = config["plugin"]
        plugin_class = getattr(plugins, f"{self.plugin}Plugin", None)
        if plugin_class is None:
            raise ConfigError(f"plugin {self.plugin!r}: Nipype has no such plugin")
        # Graph plugins return once the jobs are submitted; only SLURM's queue is waited on.
        graph_plugin = issubclass(plugin_class, GraphPluginBase)
        if graph_plugin and self.plugin != "SLURMGraph":
            raise ConfigError(f"plugin {self.plugin!r} returns before its jobs have run; use "
                              "SLURMGraph, SLURM, MultiProc or another plugin that waits")
        if int(config["predict_batch_size"]) < 1:
            raise ConfigError("predict_batch_size must be at least 1")
        self.sbatch = None
        self.args: dict = {}
        if self.plugin == "MultiProc":
            # forkserver: workers must not inherit a parent that has TensorFlow loaded (fork
            # deadlocks).
            self.args = {"n_procs": config["nprocs"] or os.cpu_count() or 1,
                         "mp_context": "forkserver"}
            if config["memory_gb"]:
                self.args["memory_gb"] = config["memory_gb"]
        elif self.plugin in SLURM_PLUGINS:
            self.sbatch = SbatchArgs(config["slurm"], job_log_dir)
            prepare_slurm(self.sbatch)
            job_log_dir.mkdir(parents=True, exist_ok=True)
            self.args = {"sbatch_args": self.sbatch.common}
            if self.plugin == "SLURMGraph":
                # Otherwise every finished step of a resumed run is a job of its own.
                self.args["dont_resubmit_completed_jobs"] = True
        if not graph_plugin:  # Nipype's graph plugins take no status callback
            self.args["status_callback"] = _Progress(labels)

    @property
    def predict_plugin_args(self) -> dict | None:
        """Per-node arguments of the prediction jobs (GPU, memory), replacing the common ones."""
        if self.sbatch is None:
            return None
        return {"sbatch_args": self.sbatch.predict, "overwrite": True}

    def run(self, workflow) -> None:
        try:
            workflow.run(plugin=self.plugin, plugin_args=self.args)
        except RuntimeError as exc:
            # Nipype raises after running everything it could when some nodes failed.
            LOGGER.error("%s", str(exc).splitlines()[0])
        if self.plugin == "SLURMGraph":
            wait_for_jobs(self.sbatch.comment)


class _Progress:
    """Nipype's status callback: one line per image (or batch) and step as it ends."""

    def __init__(self, labels: dict):
        self.labels = labels
        self.failed: set[str] = set()

    def __call__(self, node, status: str) -> None:
        if status == "start":
            return
        unit = _unit(node.fullname)
        label = self.labels.get(unit, unit)
        if status == "exception":
            self.failed.add(node.fullname)
            LOGGER.error("%s: %s failed", label, node.name)
        elif node.fullname not in self.failed:  # MultiProc also ends what failed
            LOGGER.info("%s: %s done", label, node.name)


def _unit(fullname: str) -> str:
    """'preprocess.sub_01.conform' -> 'sub_01'; 'predict.batch_0000.predict' -> 'batch_0000'."""
    return fullname.split(".")[1]


def _configure_nipype(work_dir: Path, crash_dir: Path, log_dir: Path) -> Path:
    from nipype import config as nipype_config, logging as nipype_logging

    nipype_config.update_config({
        "execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                      # Content hashes make a re-run resume even after files were copied.
                      "hash_method": "content", "stop_on_first_crash": False,
                      "remove_unnecessary_outputs": False},
        "monitoring": {"enabled": False},
    })
    nipype_logging.update_logging(nipype_config)
    # Nipype prints each node's start and end on stdout; the run log keeps them, the terminal
    # shows cmb_workflow's progress lines instead (the CLI's handler leaves Nipype out too).
    for nipype_handler in logging.getLogger("nipype").handlers:
        if type(nipype_handler) is logging.StreamHandler:
            nipype_handler.setLevel(logging.CRITICAL)
    # A plain handler: Nipype's own log file uses a lock that forked MultiProc workers break.
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_file = log_dir / f"cmb-workflow_{stamp}.log"
    # A second run started within the same second gets a log of its own.
    for repeat in itertools.count(2):
        if not log_file.exists():
            break
        log_file = log_dir / f"cmb-workflow_{stamp}-{repeat}.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in ("cmb_workflow", "cmb_workflow.crash", "nipype.workflow"):
        logger = logging.getLogger(name)
        # One run log at a time, also when several runs share a process (demo, tests).
        for old in [h for h in logger.handlers if getattr(h, "cmb_run_log", False)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
    handler.cmb_run_log = True
    # The run log gets the progress lines whatever the embedding program's root level is.
    LOGGER.setLevel(logging.INFO)
    return log_file


def _write_dataset_description(out_dir: Path, descriptor) -> None:
    description = {
        "Name": "cmb-workflow: cerebral microbleed maps",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "cmb-workflow", "Version": __version__,
                         "Description": f"model {descriptor.json_path.name} "
                                        f"version {descriptor.version or 'unknown'}"}],
    }
    write_text_atomic(json.dumps(description, indent=2) + "\n", out_dir / "dataset_description.json")


def _crash_reasons(crash_dir: Path) -> dict[str, str]:
    """Image (or batch) workflow name -> the exception line of its first crash."""
    reasons: dict[str, str] = {}
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (\S+)", text, re.MULTILINE)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not node or not lines:
            continue
        unit = _unit(node.group(1))
        # The crash file's name changes every run: log it, keep the summary deterministic.
        CRASH_LOGGER.error("%s: crash details (%s):\n%s", unit, crash, text)
        reasons.setdefault(unit, _one_line_reason(lines))
    return reasons


def _one_line_reason(lines: list[str]) -> str:
    """The exception line of a traceback, without its module path."""
    for line in reversed(lines):
        match = re.match(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", line)
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return lines[-1]


def _summary_rows(jobs, rejected, out_dir: Path, reasons: dict[str, str], prepared: dict,
                  batch_of: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """cmb_summary.tsv's rows (every image; `report`: its report's OUT-relative name, for the
    index) and qc.tsv's (the processed images)."""
    rows, qc_rows = [], []
    for job in jobs:
        entity = job.entity
        row = {"subject": entity["sub"], "session": entity.get("ses", ""),
               "run": entity.get("run", ""), "source": str(job.source),
               "n_cmb": "", "total_volume_mm3": "", "status": "ok", "message": ""}
        table = out_dir / f"{job.relative_prefix}_desc-cmb_lesions.tsv"
        reason = reasons.get(job.node_name) or reasons.get(batch_of.get(job.node_name, ""))
        if job.node_name not in prepared:
            reason = reason or "preprocessing did not finish (no error was reported; see the log)"
        if reason or not table.exists():
            row["status"] = "failed"
            row["message"] = reason or "no results were written"
        else:
            with open(table, newline="") as handle:
                lesions = list(csv.DictReader(handle, delimiter="\t"))
            row["n_cmb"] = len(lesions)
            row.update(mars_counts(lesions))
            row["total_volume_mm3"] = round(sum(float(r["volume_mm3"]) for r in lesions), 2)
            sidecar = out_dir / f"{job.relative_prefix}_desc-brain_mask.json"
            quality = json.loads(sidecar.read_text())
            row.update({column: quality[column] for column in MASK_QUALITY_COLUMNS})
            qc = json.loads((out_dir / f"{job.relative_prefix}_desc-cmb_qc.json").read_text())
            qc["qc_flags"] = row["qc_flags"] = ",".join(qc["qc_flags"])
            row["report"] = report_name(job.relative_prefix)
            qc_rows.append({**{key: row[key] for key in QC_COLUMNS[:4]},
                            **{key: "" if qc[key] is None else qc[key]
                               for key in QC_COLUMNS[4:]}})
        rows.append(row)
    for source, reason in rejected:
        rows.append({"subject": "", "session": "", "run": "", "source": source, "n_cmb": "",
                     "total_volume_mm3": "", "status": "failed", "message": reason})
    return rows, qc_rows


def _write_tsv(path: Path, rows: list[dict], columns) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t", lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), path)
