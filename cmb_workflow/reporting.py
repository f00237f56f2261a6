"""Self-contained HTML reports: page skeleton, tables, figures embedded as base64 PNG, and the
group index (OUT/index.html). Nothing here reads the clock, so the same results give the same
bytes."""

from __future__ import annotations

import base64
import html
import io
import platform
from importlib import metadata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in pipelines and containers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .imageops import write_text_atomic  # noqa: E402
from .regions import MARS_CLASSES  # noqa: E402

VERSIONED_PACKAGES = ("cmb-workflow", "tensorflow", "tf_keras", "nipype", "nibabel", "numpy",
                      "scipy", "SimpleITK", "antspyx", "nilearn", "matplotlib")
CLASS_COLOURS = {"lobar": "#1f77b4", "deep": "#d62728", "infratentorial": "#2ca02c"}

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
th { background: #f0f0f0; }
th.sortable { cursor: pointer; }
/* Wide tables scroll instead of running off the page; names and headers stay on one line. */
.table-scroll { overflow-x: auto; }
th, td a { white-space: nowrap; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 0.4em 0.8em; }
.ok { background: #e8f5e9; border: 1px solid #8c8; padding: 0.4em 0.8em; }
.failed { background: #fde8e8; }
.lesions { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; } figcaption { font-size: 0.85em; }
pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; }
"""

# Click a header to sort by that column (numbers numerically); click again to reverse.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var up = th.dataset.order !== "up"; th.dataset.order = up ? "up" : "down";
      rows.sort(function (a, b) {
        var x = a.cells[column].textContent, y = b.cells[column].textContent;
        var d = (x !== "" && y !== "" && !isNaN(x) && !isNaN(y)) ? x - y : x.localeCompare(y);
        return up ? d : -d;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def escape(value) -> str:
    return html.escape("" if value is None else str(value))


def figure_uri(fig) -> str:
    """The figure as a data: URI (PNG without a software tag, so bytes depend on pixels only)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_tag(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">'


def table(columns, rows, *, sortable: bool = False, links: dict | None = None,
          row_classes=None) -> str:
    """An HTML table of dict rows; links: column -> function(row) giving an href or None."""
    links = links or {}
    head = "".join(f"<th>{escape(column)}</th>" for column in columns)
    body = []
    for index, row in enumerate(rows):
        cells = []
        for column in columns:
            text = escape(row.get(column, ""))
            href = links[column](row) if column in links else None
            cells.append(f'<td><a href="{escape(href)}">{text}</a></td>' if href
                         else f"<td>{text}</td>")
        css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    css = ' class="sortable"' if sortable else ""
    return (f'<div class="table-scroll"><table{css}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def page(title: str, body: str, *, script: bool = False) -> str:
    extra = f"<script>{_SORT_SCRIPT}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{escape(title)}</h1>{body}{extra}</body></html>\n")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


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


def write_index(out_dir: Path, rows: list[dict], columns) -> Path:
    """OUT/index.html: the summary table linking each report, class totals, a distribution
    plot, and the failed images with their reasons."""
    done = [row for row in rows if row["status"] == "ok"]
    failed = [row for row in rows if row["status"] != "ok"]
    totals = {mars_class: sum(int(row[f"n_{mars_class}"] or 0) for row in done)
              for mars_class in MARS_CLASSES}
    parts = [f"<p>{len(done)} image(s) processed, {len(failed)} failed. Click a column header "
             "to sort.</p>"]
    # The image's file name links to its report; the full path stays in cmb_summary.tsv.
    shown = ["image", *(c for c in columns if c not in ("source", "status", "message"))]
    done = [{**row, "image": Path(row["source"]).name} for row in done]
    parts.append("<h2>Summary</h2>" + table(shown, done, sortable=True,
                                            links={"image": lambda row: row["report"]}))
    parts.append("<h2>Microbleeds per MARS class (all images)</h2>" + table(
        ["class", "microbleeds", "images with any"],
        [{"class": c, "microbleeds": totals[c],
          "images with any": sum(int(row[f"n_{c}"] or 0) > 0 for row in done)}
         for c in MARS_CLASSES]))
    if done:
        parts.append("<h2>Distribution</h2>"
                     + image_tag(figure_uri(_class_counts_figure(done)), "microbleeds per image"))
    parts.append("<h2>Failed images</h2>" + (
        table(["source", "message"], failed, row_classes=["failed"] * len(failed))
        if failed else "<p>None.</p>"))
    path = out_dir / "index.html"
    write_text_atomic(page("cmb-workflow: microbleeds by image", "".join(parts), script=True),
                      path)
    return path
