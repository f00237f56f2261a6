"""One image's self-contained HTML report (templates/report.html): the model, QC metrics against
their limits, the input with its brain mask and crop box, every lesion zoomed on three planes,
the lesion table, software versions and the command line. WriteDerivatives copies it into OUT."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib import patheffects
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)
from scipy import ndimage

from ..imageops import bounding_box, centre_of_mass, read_mask, resample
from ..mars import MNI_COLUMNS, mars_counts
from ..mimics import LIKELY_MIMIC_MIN_SCORE
from ..rendering import cmb_count_band, figure_uri, model_summary, plt, render, software_versions
from .lesions import DEFINITE_MIN_PROB
from .qc import QC_METRICS, metric_passes

# Thumbnails: half-width of the zoomed window (mm) and how many lesions get one.
ZOOM_HALF_MM = 16
MAX_THUMBNAILS = 60
MOSAIC_SLICES = 12
MOSAIC_COLUMNS = 6
# Voxels of background kept around the brain in each mosaic tile, and between tiles.
MOSAIC_MARGIN = 4
MOSAIC_GAP = 2
MOSAIC_TITLE_ROWS = 11  # background rows above each tile for its slice number
# Sub-voxel steps of the outline grid: enough for the outline to follow voxel edges.
OUTLINE_STEPS = 8
# Gap between a lesion's voxels and its outline (voxels): the outline must not cover the dark
# voxels of a 1-3 voxel wide lesion, which are what the reader judges.
OUTLINE_GAP = 0.75
SCALE_BAR_MM = 10
THUMBNAIL_GAP = 3  # voxels between a thumbnail's planes: their outlines must not merge
ORIENTATIONS = ("radiological", "neurological")


class SubjectReportInputSpec(BaseInterfaceInputSpec):
    title = traits.Str(mandatory=True, desc="the image's name, e.g. sub-01_ses-1")
    source_file = File(exists=True, mandatory=True, desc="raw input image")
    conformed = File(exists=True, mandatory=True, desc="conformed image (1 mm RAS)")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask on the conformed grid")
    box = File(exists=True, mandatory=True, desc="CropToBrain's box JSON")
    labels = File(exists=True, mandatory=True, desc="lesion labels, cropped grid")
    lesion_table = File(exists=True, mandatory=True, desc="JSON lesion rows with regions")
    qc = File(exists=True, mandatory=True, desc="QualityControl's JSON")
    dropped_table = File(exists=True, desc="JSON rows of lesions dropped as likely mimics")
    qc_limits = traits.Dict(mandatory=True, desc="the config's qc block, shown beside each metric")
    model_descriptor = File(exists=True, mandatory=True, desc="model_info*.json used")
    command_line = traits.Str("", usedefault=True, desc="the command that ran the pipeline")
    lesion_rule = traits.Str("", usedefault=True, desc="what made a lesion, for the reader")
    orientation = traits.Enum(*ORIENTATIONS, usedefault=True,
                              desc="radiological: the subject's right on the viewer's left")


class SubjectReportOutputSpec(TraitedSpec):
    out_file = File(exists=True)


def _window(data, mask):
    """Grey levels from the 0.5th to the 99.5th percentile of the brain."""
    values = data[mask] if mask.any() else data.ravel()
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _planes(volume, index):
    """Sagittal, coronal and axial slices through `index`, oriented for imshow(origin=lower)."""
    i, j, k = index
    return volume[i, :, :].T, volume[:, j, :].T, volume[:, :, k].T


PLANE_NAMES = ("sagittal", "coronal", "axial")
# Which conformed axes each plane shows (horizontal, vertical).
PLANE_AXES = ((1, 2), (0, 2), (0, 1))
# Letters of each plane's horizontal axis, low index first (RAS grid), and of its vertical axis.
PLANE_LETTERS = {"sagittal": ("PA", "IS"), "coronal": ("LR", "IS"), "axial": ("LR", "PA")}
_LETTER_STYLE = {"color": "yellow", "fontweight": "bold",
                 "path_effects": [patheffects.withStroke(linewidth=2, foreground="black")]}


def _orient(ax, plane, orientation, fontsize):
    """Show the plane as clinical viewers do and letter its edges. Radiological: the subject's
    right on the viewer's left; sagittal views face left (anterior on the left) either way.
    Call after the axis limits are final."""
    if _mirrored(plane, orientation):
        ax.set_xlim(sorted(ax.get_xlim(), reverse=True))
    _panel_letters(ax, plane, orientation, (0, 0, 1, 1), fontsize, ax.transAxes)


def orientation_note(orientation: str) -> str:
    side = "left" if orientation == "radiological" else "right"
    return (f"{orientation.capitalize()} convention: the subject's right (R) is on the {side} of "
            "axial and coronal views; sagittal views have anterior (A) on the left.")


def _overview_figure(data, mask, box, window, orientation):
    """Three planes through the brain's centre: mask outline (cyan), crop box (yellow)."""
    centre = np.round(centre_of_mass(mask)).astype(int) if mask.any() \
        else np.array(data.shape) // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), dpi=90)
    for index, (ax, name, image, outline, (h, v)) in enumerate(zip(
            axes, PLANE_NAMES, _planes(data, centre), _planes(mask.astype(np.uint8), centre),
            PLANE_AXES)):
        ax.imshow(image, cmap="gray", origin="lower", vmin=window[0], vmax=window[1])
        if outline.any():
            ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.8)
        start, size = box["start"], box["dimensions"]
        ax.add_patch(plt.Rectangle((start[h] - 0.5, start[v] - 0.5), size[h], size[v],
                                   fill=False, edgecolor="yellow", linestyle="--", linewidth=1.2))
        ax.set_xlim(min(-0.5, start[h] - 2), max(image.shape[1], start[h] + size[h] + 2))
        ax.set_ylim(min(-0.5, start[v] - 2), max(image.shape[0], start[v] + size[v] + 2))
        ax.set_title(f"{name} (voxel {centre[index]})", fontsize=9)
        ax.axis("off")
        _orient(ax, name, orientation, 11)
    fig.suptitle("brain mask (cyan), crop box given to the model (yellow, dashed)", fontsize=9)
    # Fixed margins: the panels have no tick labels, and tight_layout cost a fifth of a figure.
    fig.subplots_adjust(0.01, 0.01, 0.99, 0.88, wspace=0.04)
    return fig


def _mosaic_figure(data, mask, window, orientation):
    """Axial slices across the brain with the mask outline, tiled into one image: one imshow and
    one contour instead of a dozen axes, which took most of the report's time to draw."""
    slices = np.flatnonzero(mask.any(axis=(0, 1))) if mask.any() else np.arange(data.shape[2])
    picks = np.unique(np.linspace(slices[0], slices[-1], MOSAIC_SLICES + 2).round().astype(int))
    picks = picks[1:-1] if len(picks) > 2 else picks
    x_range, y_range, _ = bounding_box(mask, MOSAIC_MARGIN)
    width, height = x_range.stop - x_range.start, y_range.stop - y_range.start
    columns = min(MOSAIC_COLUMNS, len(picks))
    rows = int(np.ceil(len(picks) / columns))
    tile_w, tile_h = width + MOSAIC_GAP, height + MOSAIC_TITLE_ROWS
    image = np.full((rows * tile_h, columns * tile_w), window[0], np.float32)
    outline = np.zeros(image.shape, np.uint8)
    corners = []
    for number, k in enumerate(picks):
        # The first slice in the top left; rows go down the figure (origin "lower": from the top).
        left, bottom = (number % columns) * tile_w, (rows - 1 - number // columns) * tile_h
        tile = (slice(bottom, bottom + height), slice(left, left + width))
        flip = slice(None, None, -1) if orientation == "radiological" else slice(None)
        image[tile] = data[x_range, y_range, k].T[:, flip]
        outline[tile] = mask[x_range, y_range, k].T[:, flip]
        corners.append((left, bottom, k))
    fig, ax = plt.subplots(figsize=(12, 12 * image.shape[0] / image.shape[1] + 0.3), dpi=80)
    ax.imshow(image, cmap="gray", origin="lower", vmin=window[0], vmax=window[1])
    if outline.any():
        ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.6)
    right, left = ("R", "L") if orientation == "radiological" else ("L", "R")
    for left_x, bottom_y, k in corners:
        ax.text(left_x + 1, bottom_y + height + 1, f"axial {k}", ha="left", va="bottom",
                fontsize=7, color="white")
    # Letters on the first tile only: the others are the same way round.
    first_x, first_y, _ = corners[0]
    for text, x, y, ha, va in ((right, first_x + 1, first_y + height / 2, "left", "center"),
                               (left, first_x + width - 1, first_y + height / 2, "right", "center"),
                               ("P", first_x + width / 2, first_y + 1, "center", "bottom"),
                               ("A", first_x + width / 2, first_y + height - 1, "center", "top")):
        ax.text(x, y, text, ha=ha, va=va, fontsize=7, **_LETTER_STYLE)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(-0.5, image.shape[0] - 0.5)
    ax.axis("off")
    fig.subplots_adjust(0.005, 0.005, 0.995, 0.995)
    return fig


def _lesion_figure(data, labels, row, index, window, voxel_mm, orientation):
    """The lesion (red outline) in a 2 x ZOOM_HALF_MM window on three planes, drawn side by side
    as one image on one axes (three axes cost twice the time to lay out and draw)."""
    side = 2 * ZOOM_HALF_MM + 1
    panel_w = side + THUMBNAIL_GAP
    image = np.full((side, 3 * panel_w - THUMBNAIL_GAP), window[0], np.float32)
    lesion = np.zeros(image.shape, bool)
    low = index - ZOOM_HALF_MM
    for number, (name, (h, v)) in enumerate(zip(PLANE_NAMES, PLANE_AXES)):
        fixed = 3 - h - v
        # The window as the volume has it (cut at its edges), placed where it would lie uncut.
        where = [slice(max(low[a], 0), min(low[a] + side, data.shape[a])) for a in range(3)]
        where[fixed] = int(np.clip(index[fixed], 0, data.shape[fixed] - 1))
        rows = slice(where[v].start - low[v], where[v].stop - low[v])
        columns = slice(where[h].start - low[h], where[h].stop - low[h])
        panel = np.full((side, side), window[0], np.float32)
        panel[rows, columns] = data[tuple(where)].T
        mask = np.zeros((side, side), bool)
        mask[rows, columns] = (labels[tuple(where)] == row["label"]).T
        if _mirrored(name, orientation):
            panel, mask = panel[:, ::-1], mask[:, ::-1]
        left = number * panel_w
        image[:, left:left + side] = panel
        lesion[:, left:left + side] = mask
    fig, ax = plt.subplots(figsize=(6.0, 2.2), dpi=80)
    ax.imshow(image, cmap="gray", origin="lower", vmin=window[0], vmax=window[1],
              interpolation="nearest")
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(-0.5, image.shape[0] - 0.5)
    _outline_outside(ax, lesion)
    for number, (name, (h, _v)) in enumerate(zip(PLANE_NAMES, PLANE_AXES)):
        left = number * panel_w - 0.5
        ax.text(left + side / 2, side, name, ha="center", va="bottom", fontsize=8)
        _panel_letters(ax, name, orientation, (left, -0.5, side, side), 7)
        bar = SCALE_BAR_MM / voxel_mm[h]
        ax.plot([left + 0.95 * side - bar, left + 0.95 * side], [0.07 * side] * 2, color="white",
                linewidth=2, solid_capstyle="butt")
        ax.text(left + 0.95 * side - bar / 2, 0.09 * side, f"{SCALE_BAR_MM} mm", ha="center",
                va="bottom", fontsize=6, color="white")
    ax.axis("off")
    fig.subplots_adjust(0.01, 0.01, 0.99, 0.88)
    return fig


def _mirrored(plane, orientation) -> bool:
    """Whether the plane is shown with its horizontal axis reversed (see _orient)."""
    return plane == "sagittal" or orientation == "radiological"


def _panel_letters(ax, plane, orientation, box, fontsize, transform=None):
    """The letters of a panel's edges, for a panel at box (left, bottom, width, height; data
    units unless `transform` says otherwise)."""
    (low, high), (bottom, top) = PLANE_LETTERS[plane]
    if _mirrored(plane, orientation):
        low, high = high, low
    left, base, width, height = box
    for text, x, y, ha, va in ((low, 0.02, 0.5, "left", "center"),
                               (high, 0.98, 0.5, "right", "center"),
                               (bottom, 0.5, 0.02, "center", "bottom"),
                               (top, 0.5, 0.98, "center", "top")):
        ax.text(left + x * width, base + y * height, text, ha=ha, va=va, fontsize=fontsize,
                transform=transform or ax.transData, **_LETTER_STYLE)


def _outline_outside(ax, mask):
    """Outline `mask` OUTLINE_GAP voxels outside its voxels' edges: a fill, or a line on the
    edges, would hide the dark voxels the reader must judge."""
    if not mask.any():
        return
    pad = int(np.ceil(OUTLINE_GAP)) + 1  # room for the outline where the lesion meets the edge
    fine = np.kron(np.pad(mask, pad), np.ones((OUTLINE_STEPS, OUTLINE_STEPS), bool))
    distance = ndimage.distance_transform_edt(~fine) / OUTLINE_STEPS  # voxels from the lesion
    # Fine-grid centres in voxel coordinates (voxel centres are integers).
    rows, columns = ((np.arange(n) + 0.5) / OUTLINE_STEPS - 0.5 - pad for n in fine.shape)
    limits = ax.get_xlim(), ax.get_ylim()
    ax.contour(columns, rows, distance, levels=[OUTLINE_GAP], colors="red", linewidths=1.0)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])


def _format(value, unit: str) -> str:
    """The value with its unit, joined by a no-break space so that narrow columns keep them
    together."""
    if value is None:
        return "not measured"
    if value == "":
        return "none"
    if unit == "%":
        return f"{100 * value:.2f}\u00a0%"
    return f"{value}\u00a0{unit}" if unit else str(value)


def qc_rows(qc: dict, limits: dict) -> list[dict]:
    """Each QC metric with its label, value and limit in its unit, and whether it passed."""
    rows = []
    for key, meta in QC_METRICS.items():
        limit = limits.get(meta.limit) if meta.limit else None
        if meta.limit is None:
            limit_text = "none"
        elif isinstance(limit, (list, tuple)):
            limit_text = f"{_format(limit[0], meta.unit)} to {_format(limit[1], meta.unit)}"
        else:
            limit_text = ("≤\u00a0" if meta.limit.startswith("max_") else "≥\u00a0") \
                + _format(limit, meta.unit)
        rows.append({"label": meta.label, "value": _format(qc[key], meta.unit),
                     "limit": limit_text, "passed": metric_passes(key, qc[key], limits),
                     "flag": meta.flag})
    return rows


def _triple(row, columns) -> str:
    values = [row[column] for column in columns]
    return "n/a" if "n/a" in values else "(" + ", ".join(f"{v:g}" for v in values) + ")"


def lesion_rows(rows: list[dict]) -> list[dict]:
    """The lesion table as the report shows it: region with its side, both coordinates, the
    likeliest microbleeds (lowest mimic_score) first."""
    rows = sorted(rows, key=lambda row: row.get("mimic_score", 0.0))
    return [{**row, "place": (f"{row['hemisphere']} " if row["hemisphere"] != "unknown" else "")
             + row["region"].replace("_", " "),
             "scanner": _triple(row, ("x", "y", "z")), "mni": _triple(row, MNI_COLUMNS)}
            for row in rows]


LESION_TABLE = {"label": "#", "confidence": "confidence", "place": "region",
                "mars_class": "MARS class", "volume_mm3": "volume (mm³)", "max_prob": "max p",
                "mean_prob": "mean p", "mimic_score": "mimic score",
                "likely_mimic": "likely mimic", "scanner": "scanner RAS x, y, z (mm)",
                "mni": "MNI x, y, z (mm)"}

DROPPED_TABLE = ("label", "volume_mm3", "max_prob", "mimic_score", "scanner")


class SubjectReport(SimpleInterface):
    """Render one image's self-contained HTML report (figures embedded)."""

    input_spec = SubjectReportInputSpec
    output_spec = SubjectReportOutputSpec

    def _run_interface(self, runtime):
        conformed = nib.load(self.inputs.conformed)
        data = conformed.get_fdata(dtype=np.float32)
        voxel_mm = conformed.header.get_zooms()[:3]
        mask = read_mask(self.inputs.brain_mask)
        box = json.loads(Path(self.inputs.box).read_text())
        rows = lesion_rows(json.loads(Path(self.inputs.lesion_table).read_text()))
        qc = json.loads(Path(self.inputs.qc).read_text())
        # Dropped before the regions step: no region or MNI columns.
        dropped = [{**row, "scanner": _triple(row, ("x", "y", "z"))}
                   for row in json.loads(Path(self.inputs.dropped_table).read_text())] \
            if isdefined(self.inputs.dropped_table) else []
        orientation = self.inputs.orientation
        window = _window(data, mask)
        # On the conformed grid for the thumbnails only: a scan without lesions skips it.
        labels = np.asarray(resample(nib.load(self.inputs.labels), data.shape, conformed.affine,
                                     "nearest").dataobj).astype(np.int32) if rows else None
        inverse = np.linalg.inv(conformed.affine)
        thumbnails = []
        for row in rows[:MAX_THUMBNAILS]:
            index = np.round(nib.affines.apply_affine(
                inverse, [row["x"], row["y"], row["z"]])).astype(int)
            figure = _lesion_figure(data, labels, row, index, window, voxel_mm, orientation)
            thumbnails.append({**row, "uri": figure_uri(figure)})

        html = render(
            "report.html", title=f"cmb-workflow report: {self.inputs.title}",
            model=model_summary(self.inputs.model_descriptor),
            source_file=self.inputs.source_file,
            qc={"flags": qc["qc_flags"], "rows": qc_rows(qc, self.inputs.qc_limits)},
            orientation_note=orientation_note(orientation),
            overview=figure_uri(_overview_figure(data, mask, box, window, orientation)),
            mosaic=figure_uri(_mosaic_figure(data, mask, window, orientation)),
            lesions=rows, band=cmb_count_band(len(rows)), counts=mars_counts(rows),
            definite_min_prob=DEFINITE_MIN_PROB, lesion_rule=self.inputs.lesion_rule,
            lesion_columns=list(LESION_TABLE), lesion_headers=LESION_TABLE,
            lesion_numbers=("label", "volume_mm3", "max_prob", "mean_prob", "mimic_score"),
            dropped=dropped, dropped_columns=DROPPED_TABLE,
            likely_mimic_min_score=LIKELY_MIMIC_MIN_SCORE,
            thumbnails=thumbnails, hidden=max(len(rows) - MAX_THUMBNAILS, 0),
            versions=[{"software": name, "version": version}
                      for name, version in software_versions().items()],
            command_line=self.inputs.command_line)
        out_file = Path(runtime.cwd) / "report.html"
        out_file.write_text(html)
        self._results["out_file"] = str(out_file)
        return runtime
