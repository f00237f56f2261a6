"""The study's summary: why images failed (from Nipype's crash files), each image's summary row
(OUT/logs/rows), and cmb_summary.tsv, qc.tsv, index.html and dataset_description.json.

Every run, or slurm-array task, records the rows of the images it processed, one file per image;
the summary files are rebuilt from all of them, so runs sharing one OUT add to the summary
rather than overwrite it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

from . import __version__
from .execution import unit_name
from .imageops import write_text_atomic
from .interfaces.derivatives import report_name
from .interfaces.qc import QC_METRICS
from .mars import mars_counts

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
                  batch_of: dict[str, str], model_descriptor, digest: str) -> list[dict]:
    """Record the run's rows (record_rows), then rebuild cmb_summary.tsv, qc.tsv and index.html
    from every image's (summarize); returns the run's own rows."""
    rows = record_rows(out_dir, jobs, rejected, crash_dir, prepared, batch_of, model_descriptor,
                       digest)
    summarize(out_dir)
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


def record_rows(out_dir: Path, jobs, rejected, crash_dir: Path, prepared: dict,
                batch_of: dict[str, str], model_descriptor, digest: str,
                submission: str = "") -> list[dict]:
    """Save the summary row (and qc.tsv row) of each image of `jobs` and `rejected` under
    OUT/logs/rows; returns the rows. digest: configs.results_digest of the settings;
    submission: the slurm-array submission that made them."""
    rows, qc_rows = summary_rows(jobs, rejected, out_dir, crash_reasons(crash_dir), prepared,
                                 batch_of)
    qc_of = {qc["source"]: qc for qc in qc_rows}
    # summary_rows gives the images' rows in the order of jobs, then rejected.
    names = [(job.node_name, False) for job in jobs]
    names += [(rejected_key(skipped.source), True) for skipped in rejected]
    for (key, is_rejected), row in zip(names, rows):
        save_row(out_dir, key, row, qc_of.get(row["source"]), model_descriptor, digest,
                 submission, rejected=is_rejected)
    return rows


def rejected_key(source) -> str:
    """A rejected file's row name: it has no usable entities, so a hash of its path."""
    return "rejected_" + hashlib.sha1(str(source).encode()).hexdigest()[:16]


def rows_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "logs" / "rows"


def save_row(out_dir: Path, key: str, row: dict, qc: dict | None, model_descriptor,
             digest: str, submission: str, *, rejected: bool = False) -> None:
    """OUT/logs/rows/<key>.json, written whole (temporary name, then renamed)."""
    record = {"row": row, "qc": qc, "rejected": rejected, "model": str(model_descriptor),
              "digest": digest, "submission": submission}
    write_text_atomic(json.dumps(record, indent=1) + "\n", rows_dir(out_dir) / f"{key}.json")
    if not rejected:  # a file rejected by an earlier run that is now processed
        (rows_dir(out_dir) / f"{rejected_key(row['source'])}.json").unlink(missing_ok=True)


def read_rows(out_dir: Path) -> dict[str, dict]:
    """Row name -> record, as save_row wrote them."""
    return {path.stem: json.loads(path.read_text())
            for path in sorted(rows_dir(out_dir).glob("*.json"))}


def summarize(out_dir: Path) -> list[dict]:
    """cmb_summary.tsv, qc.tsv and index.html from every image's recorded row: the same files
    whichever run, task or order made the rows. Returns the rows."""
    records = sorted(read_rows(out_dir).values(),
                     key=lambda record: (record["rejected"], Path(record["row"]["source"])))
    rows = [record["row"] for record in records]
    write_tsv(out_dir / "cmb_summary.tsv", rows, SUMMARY_COLUMNS)
    write_tsv(out_dir / "qc.tsv", [record["qc"] for record in records if record["qc"]],
              QC_COLUMNS)
    from .rendering import write_index

    # The index names one model: the one most images were processed with.
    models = Counter(record["model"] for record in records)
    if models:
        write_index(out_dir, rows, SUMMARY_COLUMNS, models.most_common(1)[0][0])
    return rows
