"""The study's summary: why images failed (from Nipype's crash files), cmb_summary.tsv, qc.tsv,
index.html and dataset_description.json."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

from . import __version__
from .execution import unit_name
from .imageops import write_text_atomic
from .interfaces.derivatives import report_name
from .interfaces.qc import QC_METRICS
from .regions import mars_counts

# Crash files go to the run log only; the terminal gets their one-line reasons.
CRASH_LOGGER = logging.getLogger("cmb_workflow.crash")
CRASH_LOGGER.propagate = False

# Microbleed-count bands (lower bounds) of the burden scales clinicians grade with (ARIA-H: 1,
# 2-4, 5-9, 10 and more); the index and cmb_summary.tsv give each image its band.
CMB_COUNT_BANDS = ((10, ">=10"), (5, "5-9"), (2, "2-4"), (1, "1"), (0, "0"))

# The brain mask's quality columns come from its sidecar (see interfaces.brainmask.mask_quality).
MASK_QUALITY_COLUMNS = ("brain_volume_ml", "mask_fov_edge_fraction")
CLASS_COLUMNS = ("n_lobar", "n_deep", "n_infratentorial", "strictly_lobar")
SUMMARY_COLUMNS = ("subject", "session", "run", "source", "n_cmb", "n_likely_mimic", "cmb_band",
                   *CLASS_COLUMNS,
                   "total_volume_mm3", *MASK_QUALITY_COLUMNS, "qc_flags", "status", "message")
# OUT/qc.tsv: the metrics of interfaces.qc (its JSON keys) for every processed image.
QC_COLUMNS = ("subject", "session", "run", "source", *QC_METRICS, "qc_flags")


def write_summary(out_dir: Path, jobs, rejected, crash_dir: Path, prepared: dict,
                  batch_of: dict[str, str], model_descriptor) -> list[dict]:
    """cmb_summary.tsv, qc.tsv and index.html of the run; returns the summary rows."""
    rows, qc_rows = summary_rows(jobs, rejected, out_dir, crash_reasons(crash_dir), prepared,
                                 batch_of)
    write_tsv(out_dir / "cmb_summary.tsv", rows, SUMMARY_COLUMNS)
    write_tsv(out_dir / "qc.tsv", qc_rows, QC_COLUMNS)
    from .reporting import write_index

    write_index(out_dir, rows, SUMMARY_COLUMNS, model_descriptor)
    return rows


def write_dataset_description(out_dir: Path, models: list[dict]) -> None:
    """BIDS-Derivatives dataset_description.json: this tool (and its container, if any) and the
    models that made the results (registry.model_provenance)."""
    tool = {"Name": "cmb-workflow", "Version": __version__}
    code_url = _package_metadata("Home-page")
    if code_url:
        tool["CodeURL"] = code_url
    # Set in the project's container images (containers/), as "docker:<tag>" or "apptainer:<tag>".
    container = os.environ.get("CMB_WORKFLOW_CONTAINER", "")
    if ":" in container:
        kind, tag = container.split(":", 1)
        tool["Container"] = {"Type": kind, "Tag": tag}
    description = {
        "Name": "cmb-workflow: cerebral microbleed maps",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [tool, *models],
    }
    write_text_atomic(json.dumps(description, indent=2) + "\n", out_dir / "dataset_description.json")


def _package_metadata(key: str) -> str | None:
    from importlib import metadata

    try:
        value = metadata.metadata("cmb-workflow").get(key)
    except metadata.PackageNotFoundError:
        return None
    return value if value and value != "UNKNOWN" else None


def cmb_count_band(n: int) -> str:
    """'0', '1', '2-4', '5-9' or '>=10' microbleeds."""
    return next(band for lowest, band in CMB_COUNT_BANDS if int(n) >= lowest)


def crash_reasons(crash_dir: Path) -> dict[str, str]:
    """Image (or batch) workflow name -> the exception line of its first crash."""
    reasons: dict[str, str] = {}
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (\S+)", text, re.MULTILINE)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not node or not lines:
            continue
        unit = unit_name(node.group(1))
        # The crash file's name changes every run: log it, keep the summary deterministic.
        CRASH_LOGGER.error("%s: crash details (%s):\n%s", unit, crash, text)
        reasons.setdefault(unit, one_line_reason(lines))
    return reasons


def one_line_reason(lines: list[str]) -> str:
    """The exception line of a traceback, without its module path."""
    for line in reversed(lines):
        match = re.match(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception))(?:: (.+))?$", line)
        if match:
            return f"{match.group(1)}: {match.group(2)}" if match.group(2) else match.group(1)
    return lines[-1]


def summary_rows(jobs, rejected, out_dir: Path, reasons: dict[str, str], prepared: dict,
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
            row["n_likely_mimic"] = sum(lesion["likely_mimic"] == "yes" for lesion in lesions)
            row["cmb_band"] = cmb_count_band(len(lesions))
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
    for skipped in rejected:
        rows.append({"subject": "", "session": "", "run": "", "source": skipped.source,
                     "n_cmb": "", "total_volume_mm3": "", "status": skipped.status,
                     "message": skipped.reason})
    return rows, qc_rows


def write_tsv(path: Path, rows: list[dict], columns) -> None:
    """A BIDS TSV: tab-separated, never quoted (tabs and line breaks in values become spaces)."""
    def cell(value) -> str:
        return re.sub(r"[\t\r\n]+", " ", "" if value is None else str(value))

    lines = ["\t".join(columns)]
    lines += ["\t".join(cell(row.get(column, "")) for column in columns) for row in rows]
    write_text_atomic("\n".join(lines) + "\n", path)
