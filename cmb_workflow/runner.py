"""Run the study: find images, build the graph, execute it, and write the summary."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from . import __version__
from .bids import find_images
from .imageops import write_text_atomic
from .models import read_descriptor, verify

LOGGER = logging.getLogger("cmb_workflow")

SUMMARY_COLUMNS = ("subject", "session", "run", "source", "n_cmb", "total_volume_mm3",
                   "status", "message")


def run_study(in_dir, out_dir, config: dict) -> int:
    """Process every image; returns 0 when all succeeded, 1 when some failed."""
    out_dir = Path(out_dir).resolve()
    work_dir = Path(config["work_dir"] or out_dir / "work").resolve()
    descriptor = read_descriptor(config["models"])
    # Refuse a tampered model here, once, before any subject starts.
    verify(descriptor, allow_unverified=config["allow_unverified_models"])

    jobs, rejected = find_images(in_dir, input_type=config["input_type"],
                                 participant_label=config["participant_label"],
                                 session_label=config["session_label"], echo=config["echo"],
                                 masks_dir=config["masks_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_dataset_description(out_dir, descriptor)
    crash_dir = work_dir / "crash"
    shutil.rmtree(crash_dir, ignore_errors=True)
    _configure_nipype(work_dir, crash_dir, out_dir / "logs")

    for job in jobs:
        LOGGER.info("%s: %s%s", job.prefix, job.source,
                    f" (brain mask {job.mask})" if job.mask else "")
    if jobs:
        from .workflow.base import init_cmb_wf

        workflow = init_cmb_wf(jobs, config, str(out_dir), str(work_dir))
        try:
            workflow.run(plugin=config["plugin"], plugin_args=_plugin_args(config))
        except RuntimeError as exc:
            # Nipype raises after running everything it could when some nodes failed.
            LOGGER.error("%s", str(exc).splitlines()[0])

    rows = _summary_rows(jobs, rejected, out_dir, _crash_reasons(crash_dir))
    _write_summary(out_dir / "cmb_summary.tsv", rows)
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed:
        LOGGER.error("FAILED %s: %s", row["source"], row["message"])
    LOGGER.info("%d image(s) processed, %d failed; summary: %s", len(rows) - len(failed),
                len(failed), out_dir / "cmb_summary.tsv")
    return 1 if failed else 0


def _plugin_args(config: dict) -> dict:
    if config["plugin"] != "MultiProc":
        return {}
    # forkserver: workers must not inherit a parent that has TensorFlow loaded (fork deadlocks).
    args = {"n_procs": config["nprocs"] or os.cpu_count() or 1, "mp_context": "forkserver"}
    if config["memory_gb"]:
        args["memory_gb"] = config["memory_gb"]
    return args


def _configure_nipype(work_dir: Path, crash_dir: Path, log_dir: Path) -> None:
    from nipype import config as nipype_config, logging as nipype_logging

    nipype_config.update_config({
        "execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                      # Content hashes make a re-run resume even after files were copied.
                      "hash_method": "content", "stop_on_first_crash": False,
                      "remove_unnecessary_outputs": False},
        "monitoring": {"enabled": False},
    })
    nipype_logging.update_logging(nipype_config)
    # A plain handler: Nipype's own log file uses a lock that forked MultiProc workers break.
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / f"cmb-workflow_{time.strftime('%Y%m%d-%H%M%S')}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in ("cmb_workflow", "nipype.workflow"):
        logger = logging.getLogger(name)
        # One run log at a time, also when several runs share a process (demo, tests).
        for old in [h for h in logger.handlers if getattr(h, "cmb_run_log", False)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
    handler.cmb_run_log = True


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
    """Per-image workflow name -> the last line of the first crash of that image."""
    reasons: dict[str, str] = {}
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (\S+)", text, re.MULTILINE)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not node or not lines:
            continue
        parts = node.group(1).split(".")
        image_name = parts[1] if len(parts) > 2 else parts[0]
        if image_name not in reasons:
            # The crash file's name changes every run: log it, keep the summary deterministic.
            LOGGER.info("%s: crash details in %s", image_name, crash)
            reasons[image_name] = _one_line_reason(lines)
    return reasons


def _one_line_reason(lines: list[str]) -> str:
    """The exception line of a traceback, without its module path."""
    for line in reversed(lines):
        match = re.match(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", line)
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return lines[-1]


def _summary_rows(jobs, rejected, out_dir: Path, reasons: dict[str, str]) -> list[dict]:
    rows = []
    for job in jobs:
        entity = job.entity
        row = {"subject": entity["sub"], "session": entity.get("ses", ""),
               "run": entity.get("run", ""), "source": str(job.source),
               "n_cmb": "", "total_volume_mm3": "", "status": "ok", "message": ""}
        table = out_dir / f"{job.relative_prefix}_desc-cmb_lesions.tsv"
        if job.node_name in reasons or not table.exists():
            row["status"] = "failed"
            row["message"] = reasons.get(job.node_name, "no results were written")
        else:
            with open(table, newline="") as handle:
                lesions = list(csv.DictReader(handle, delimiter="\t"))
            row["n_cmb"] = len(lesions)
            row["total_volume_mm3"] = round(sum(float(r["volume_mm3"]) for r in lesions), 2)
        rows.append(row)
    for source, reason in rejected:
        rows.append({"subject": "", "session": "", "run": "", "source": source, "n_cmb": "",
                     "total_volume_mm3": "", "status": "failed", "message": reason})
    return rows


def _write_summary(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, delimiter="\t",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), path)
