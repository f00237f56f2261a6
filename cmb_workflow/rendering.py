"""Self-contained HTML reports: the jinja2 templates (cmb_workflow/templates) they are rendered
with, figures embedded as base64 PNG, the model named on every page, and the group index
(OUT/index.html). Nothing here reads the clock, so the same results give the same bytes."""

from __future__ import annotations

import base64
import io
import os
import platform
from importlib import metadata
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display in pipelines and containers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .imageops import write_text_atomic  # noqa: E402
from .mars import MARS_CLASSES  # noqa: E402
from .models import read_descriptor  # noqa: E402
from .summary import CMB_COUNT_BANDS, cmb_count_band  # noqa: E402

VERSIONED_PACKAGES = ("cmb-workflow", "tensorflow", "tf_keras", "nipype", "nibabel", "numpy",
                      "scipy", "SimpleITK", "antspyx", "nilearn", "matplotlib", "jinja2")
CLASS_COLOURS = {"lobar": "#1f77b4", "deep": "#d62728", "infratentorial": "#2ca02c"}
# How a descriptor says its model is a demo (the bundled one: "DEMO MODEL ... NOT for real
# scans"), or that it must not be used on patients' scans.
DEMO_PHRASE = "demo model"
NOT_CLINICAL_PHRASES = ("not for real scans", "not for clinical use")

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("cmb_workflow", "templates"),
    autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(template: str, **context) -> str:
    return _TEMPLATES.get_template(template).render(**context)


def figure_uri(fig) -> str:
    """The figure as a data: URI (PNG without a software tag, so bytes depend on pixels only)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def model_summary(descriptor_file) -> dict:
    """What every page says of the model: name, version, files with their md5, and `warning`,
    why its results are not for patients (None when the descriptor says nothing of the kind)."""
    descriptor = read_descriptor(descriptor_file)
    info = descriptor.info
    description = str(info.get("description", ""))
    texts = [str(value).lower() for value in info.values() if isinstance(value, str)]
    warning = None
    if any(DEMO_PHRASE in text for text in texts):
        warning = "DEMO MODEL: these results are not for real scans or clinical use."
    elif any(phrase in text for text in texts for phrase in NOT_CLINICAL_PHRASES):
        warning = "The model's descriptor marks it NOT for clinical use: " + description
    return {
        "name": str(info.get("name") or descriptor.json_path.parent.name),
        "version": descriptor.version or "unknown",
        "path": str(descriptor.json_path),
        "description": description,
        "modalities": ", ".join(descriptor.modalities),
        "files": [{"file": os.path.relpath(f.path, descriptor.json_path.parent),
                   "md5": f.md5 or "none"} for f in descriptor.files],
        "warning": warning,
    }


def _class_counts_figure(rows: list[dict]):
    """Microbleeds per image, stacked by MARS class."""
    labels = [Path(row["source"]).name.split(".nii")[0] for row in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 3.6), dpi=100)
    bottom = np.zeros(len(rows))
    for mars_class in MARS_CLASSES:
        counts = np.array([float(row[f"n_{mars_class}"] or 0) for row in rows])
        ax.bar(range(len(rows)), counts, bottom=bottom, label=mars_class,
               color=CLASS_COLOURS[mars_class])
        bottom += counts
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("microbleeds")
    ax.set_title("Microbleeds per image by MARS class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_index(out_dir: Path, rows: list[dict], columns, model_descriptor) -> Path:
    """OUT/index.html: the summary table linking each report with each image's count band, class
    totals, a distribution plot, and the failed images with their reasons."""
    done = [row for row in rows if row["status"] == "ok"]
    failed = [row for row in rows if row["status"] != "ok"]
    # The image's file name links to its report; the full path stays in cmb_summary.tsv.
    shown = ["image", "n_cmb", "cmb_band",
             *(c for c in columns if c not in ("source", "status", "message", "n_cmb", "cmb_band"))]
    done = [{**row, "image": Path(row["source"]).name, "cmb_band": cmb_count_band(row["n_cmb"])}
            for row in done]
    classes = [{"class": c, "microbleeds": sum(int(row[f"n_{c}"] or 0) for row in done),
                "images": sum(int(row[f"n_{c}"] or 0) > 0 for row in done)}
               for c in MARS_CLASSES]
    figure = figure_uri(_class_counts_figure(done)) if done else None
    path = out_dir / "index.html"
    write_text_atomic(render("index.html", title="cmb-workflow: microbleeds by image",
                             model=model_summary(model_descriptor), columns=shown, done=done,
                             failed=failed, classes=classes, figure=figure,
                             bands=[band for _, band in reversed(CMB_COUNT_BANDS)]), path)
    return path
