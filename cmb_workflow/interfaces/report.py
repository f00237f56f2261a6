"""One image's self-contained HTML report: the input with its brain mask and crop box, every
lesion zoomed on three planes, the lesion table, QC warnings, model and software versions and
the command line. WriteDerivatives copies it into OUT."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..imageops import resample
from ..models import read_descriptor
from ..regions import REGION_COLUMNS, mars_counts
from ..reporting import escape, figure_uri, image_tag, page, plt, software_versions, table
from .lesions import LESION_COLUMNS

# Thumbnails: half-width of the zoomed window (mm) and how many lesions get one.
ZOOM_HALF_MM = 16
MAX_THUMBNAILS = 60
MOSAIC_SLICES = 12
# Sub-voxel steps of the outline grid: enough for the outline to run along voxel edges.
OUTLINE_STEPS = 8


class SubjectReportInputSpec(BaseInterfaceInputSpec):
    title = traits.Str(mandatory=True, desc="the image's name, e.g. sub-01_ses-1")
    source_file = File(exists=True, mandatory=True, desc="raw input image")
    conformed = File(exists=True, mandatory=True, desc="conformed image (1 mm RAS)")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask on the conformed grid")
    box = File(exists=True, mandatory=True, desc="CropToBrain's box JSON")
    labels = File(exists=True, mandatory=True, desc="lesion labels, cropped grid")
    lesion_table = File(exists=True, mandatory=True, desc="JSON lesion rows with regions")
    qc = File(exists=True, mandatory=True, desc="QualityControl's JSON")
    model_descriptor = File(exists=True, mandatory=True, desc="model_info*.json used")
    command_line = traits.Str("", usedefault=True, desc="the command that ran the pipeline")
    lesion_rule = traits.Str("", usedefault=True, desc="what made a lesion, for the reader")


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


def _overview_figure(data, mask, box, window):
    """Three planes through the brain's centre: mask outline (cyan), crop box (yellow)."""
    centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int) if mask.any() \
        else np.array(data.shape) // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), dpi=90)
    for ax, name, image, outline, (h, v) in zip(axes, PLANE_NAMES, _planes(data, centre),
                                                 _planes(mask.astype(np.uint8), centre),
                                                 PLANE_AXES):
        ax.imshow(image, cmap="gray", origin="lower", vmin=window[0], vmax=window[1])
        if outline.any():
            ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.8)
        start, size = box["start"], box["dimensions"]
        ax.add_patch(plt.Rectangle((start[h] - 0.5, start[v] - 0.5), size[h], size[v],
                                   fill=False, edgecolor="yellow", linestyle="--", linewidth=1.2))
        ax.set_xlim(min(-0.5, start[h] - 2), max(image.shape[1], start[h] + size[h] + 2))
        ax.set_ylim(min(-0.5, start[v] - 2), max(image.shape[0], start[v] + size[v] + 2))
        ax.set_title(f"{name} (voxel {centre[{'sagittal': 0, 'coronal': 1, 'axial': 2}[name]]})",
                     fontsize=9)
        ax.axis("off")
    fig.suptitle("brain mask (cyan), crop box given to the model (yellow, dashed); "
                 "right of the subject on the right of axial and coronal views", fontsize=9)
    fig.tight_layout()
    return fig


def _mosaic_figure(data, mask, window):
    """Axial slices across the brain with the mask outline."""
    slices = np.flatnonzero(mask.any(axis=(0, 1))) if mask.any() else np.arange(data.shape[2])
    picks = np.unique(np.linspace(slices[0], slices[-1], MOSAIC_SLICES + 2).round().astype(int))
    picks = picks[1:-1] if len(picks) > 2 else picks
    columns = 6
    rows = int(np.ceil(len(picks) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(12, 2.3 * rows), dpi=80)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, k in zip(np.ravel(axes), picks):
        ax.imshow(data[:, :, k].T, cmap="gray", origin="lower", vmin=window[0], vmax=window[1])
        if mask[:, :, k].any():
            ax.contour(mask[:, :, k].T.astype(np.uint8), levels=[0.5], colors="cyan",
                       linewidths=0.6)
        ax.set_title(f"axial {k}", fontsize=8)
    fig.tight_layout()
    return fig


def _lesion_figure(data, labels, row, index, window):
    """The lesion (red outline) in a 2 x ZOOM_HALF_MM window on three planes."""
    fig, axes = plt.subplots(1, 3, figsize=(6.0, 2.2), dpi=80)
    low = index - ZOOM_HALF_MM
    for ax, name, axis_pair in zip(axes, PLANE_NAMES, PLANE_AXES):
        fixed = 3 - sum(axis_pair)
        where = [slice(max(low[a], 0), max(low[a], 0) + 2 * ZOOM_HALF_MM + 1) for a in range(3)]
        where[fixed] = int(np.clip(index[fixed], 0, data.shape[fixed] - 1))
        image = data[tuple(where)].T
        lesion = (labels[tuple(where)] == row["label"]).T
        ax.imshow(image, cmap="gray", origin="lower", vmin=window[0], vmax=window[1],
                  interpolation="nearest")
        _outline_voxels(ax, lesion)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def _outline_voxels(ax, mask):
    """Outline `mask` along its voxels' edges: a fill would hide the dark voxels the reader
    must judge, and a plain contour runs through voxel centres, so it vanishes around a
    one-voxel lesion."""
    padded = np.pad(mask, 1)  # closes the outline where the lesion meets the window's edge
    fine = np.kron(padded, np.ones((OUTLINE_STEPS, OUTLINE_STEPS)))
    # Fine-grid centres in voxel coordinates; level 0.5 falls midway, on the voxel edges.
    rows, columns = ((np.arange(n) + 0.5) / OUTLINE_STEPS - 1.5 for n in fine.shape)
    limits = ax.get_xlim(), ax.get_ylim()
    ax.contour(columns, rows, fine, levels=[0.5], colors="red", linewidths=0.8)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])


def _lesion_caption(row) -> str:
    side = "" if row["hemisphere"] == "unknown" else f"{row['hemisphere']} "
    return (f"<b>#{row['label']}</b> {escape(side + row['region'].replace('_', ' '))} "
            f"({escape(row['mars_class'])}) · {row['volume_mm3']} mm³ · max p "
            f"{row['max_prob']} · mean p {row['mean_prob']}")


def _qc_section(qc: dict) -> str:
    flags = qc["qc_flags"]
    box = (f'<div class="warn"><b>QC warnings:</b> {escape(", ".join(flags))}</div>' if flags
           else '<div class="ok">No QC warning.</div>')
    metrics = [{"metric": key, "value": value} for key, value in qc.items() if key != "qc_flags"]
    return "<h2>Quality control</h2>" + box + table(["metric", "value"], metrics)


def _model_section(descriptor_file) -> str:
    descriptor = read_descriptor(descriptor_file)
    files = [{"file": os.path.relpath(f.path, descriptor.json_path.parent),
              "md5 (descriptor)": f.md5 or "none"} for f in descriptor.files]
    return (f"<h2>Model</h2><p>{escape(descriptor.json_path)}, version "
            f"{escape(descriptor.version or 'unknown')}, modalities "
            f"{escape(', '.join(descriptor.modalities))}</p>" + table(["file", "md5 (descriptor)"],
                                                                     files))


class SubjectReport(SimpleInterface):
    input_spec = SubjectReportInputSpec
    output_spec = SubjectReportOutputSpec

    def _run_interface(self, runtime):
        conformed = nib.load(self.inputs.conformed)
        data = conformed.get_fdata(dtype=np.float32)
        mask = np.asarray(nib.load(self.inputs.brain_mask).dataobj) > 0
        box = json.loads(Path(self.inputs.box).read_text())
        rows = json.loads(Path(self.inputs.lesion_table).read_text())
        qc = json.loads(Path(self.inputs.qc).read_text())
        window = _window(data, mask)
        labels = np.asarray(resample(nib.load(self.inputs.labels), data.shape, conformed.affine,
                                     "nearest").dataobj).astype(np.int32)
        inverse = np.linalg.inv(conformed.affine)

        parts = [f"<p>Input: {escape(self.inputs.source_file)}</p>", _qc_section(qc)]
        parts.append("<h2>Input, brain mask and crop box</h2>"
                     + image_tag(figure_uri(_overview_figure(data, mask, box, window)),
                                 "input with brain mask and crop box")
                     + image_tag(figure_uri(_mosaic_figure(data, mask, window)),
                                 "axial slices with brain mask"))
        counts = mars_counts(rows)
        parts.append(f"<h2>Microbleeds: {len(rows)}</h2><p>lobar {counts['n_lobar']}, deep "
                     f"{counts['n_deep']}, infratentorial {counts['n_infratentorial']}; strictly "
                     f"lobar (Boston v2.0): {counts['strictly_lobar']}. Coordinates are scanner "
                     "RAS mm; regions from the MARS atlas registered to the image."
                     + (f" Lesions: {escape(self.inputs.lesion_rule)}." if self.inputs.lesion_rule
                        else "") + "</p>")
        parts.append(table([*LESION_COLUMNS, *REGION_COLUMNS], rows))
        thumbnails = []
        for row in rows[:MAX_THUMBNAILS]:
            index = np.round(inverse[:3, :3] @ [row["x"], row["y"], row["z"]]
                             + inverse[:3, 3]).astype(int)
            figure = image_tag(figure_uri(_lesion_figure(data, labels, row, index, window)),
                               "lesion %d" % row["label"])
            thumbnails.append(f"<figure>{figure}<figcaption>{_lesion_caption(row)}</figcaption>"
                              "</figure>")
        if len(rows) > MAX_THUMBNAILS:
            thumbnails.append(f"<p>{len(rows) - MAX_THUMBNAILS} smaller lesions not shown.</p>")
        parts.append('<div class="lesions">' + "".join(thumbnails) + "</div>")
        parts.append(_model_section(self.inputs.model_descriptor))
        versions = [{"software": name, "version": version}
                    for name, version in software_versions().items()]
        parts.append("<h2>Software</h2>" + table(["software", "version"], versions))
        parts.append(f"<h2>Command line</h2><pre>{escape(self.inputs.command_line)}</pre>")

        out_file = Path(runtime.cwd) / "report.html"
        out_file.write_text(page(f"cmb-workflow report: {self.inputs.title}", "".join(parts)))
        self._results["out_file"] = str(out_file)
        return runtime
