"""Quality-control metrics of one image and the flags they raise (configs/default.yml, qc)."""

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..imageops import read_mask

# Normalised intensities: the ceiling is 1; "dark" is below a tenth of it.
SATURATED_LEVEL, DARK_LEVEL = 0.999, 0.1


class QualityControlInputSpec(BaseInterfaceInputSpec):
    image = File(exists=True, mandatory=True, desc="cropped image scaled to [0, 1] (Normalize)")
    mask = File(exists=True, mandatory=True, desc="cropped brain mask")
    box = File(exists=True, mandatory=True, desc="CropToBrain's box JSON")
    brain_mask_quality = File(exists=True, mandatory=True,
                              desc="JSON: native brain volume and field-of-view edge fraction")
    registration_quality = File(exists=True, mandatory=True, desc="LesionRegions' out_quality")
    lesion_table = File(exists=True, mandatory=True, desc="JSON lesion rows")
    limits = traits.Dict(mandatory=True, desc="the config's qc block")


class QualityControlOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="JSON: the metrics and qc_flags, a list of flag names")


@dataclass(frozen=True)
class QCMetric:
    label: str
    unit: str  # "%": a fraction, shown times 100
    # Key of the config's qc block: [low, high], max_* (at most) or min_* (at least); None: the
    # metric passes when empty (an error message).
    limit: str | None
    flag: str  # raised when the metric fails


# Every metric of qc.json, in the order of its keys: the one description of the QC columns, their
# limits and flags, for the flags, the report and qc.tsv.
QC_METRICS = {
    "brain_volume_ml": QCMetric("Brain volume (native mask)", "mL", "brain_volume_ml",
                                "brain_volume_out_of_range"),
    "mask_fov_edge_fraction": QCMetric("Mask surface on the field-of-view edge", "%",
                                       "max_fov_edge_fraction", "brain_cut_by_fov"),
    "brain_outside_crop_fraction": QCMetric("Brain outside the model's crop box", "%",
                                            "max_outside_crop_fraction", "brain_cut_by_crop_box"),
    "saturated_fraction": QCMetric("Brain voxels at the intensity ceiling", "%",
                                   "max_saturated_fraction", "unusual_intensity_histogram"),
    "dark_fraction": QCMetric("Brain voxels below a tenth of the ceiling", "%",
                              "max_dark_fraction", "unusual_intensity_histogram"),
    "n_clusters": QCMetric("Lesions found", "", "max_lesions", "many_clusters"),
    "largest_cluster_mm3": QCMetric("Largest lesion", "mm³", "max_lesion_volume_mm3",
                                    "very_large_cluster"),
    "template_brain_dice": QCMetric("Registered template brain vs. mask (Dice)", "",
                                    "min_template_brain_dice", "registration_failure"),
    "registration_error": QCMetric("Template registration error", "", None,
                                   "registration_failure"),
}


def metric_passes(key: str, value, limits: dict) -> bool:
    limit_key = QC_METRICS[key].limit
    if limit_key is None:
        return not value
    if value is None:  # not measured (no registration): nothing vouches for it
        return False
    limit = limits[limit_key]
    if isinstance(limit, (list, tuple)):
        return limit[0] <= value <= limit[1]
    return value <= limit if limit_key.startswith("max_") else value >= limit


def quality_flags(metrics: dict, limits: dict) -> list[str]:
    flags = [meta.flag for key, meta in QC_METRICS.items()
             if not metric_passes(key, metrics[key], limits)]
    return list(dict.fromkeys(flags))


class QualityControl(SimpleInterface):
    """Gather one image's QC metrics (QC_METRICS) into a JSON with the flags its limits raise."""

    input_spec = QualityControlInputSpec
    output_spec = QualityControlOutputSpec

    def _run_interface(self, runtime):
        mask = read_mask(self.inputs.mask)
        brain = np.asarray(nib.load(self.inputs.image).dataobj)[mask]
        box = json.loads(Path(self.inputs.box).read_text())
        rows = json.loads(Path(self.inputs.lesion_table).read_text())
        outside = box["brain_voxels_outside_box"]
        metrics = {
            **json.loads(Path(self.inputs.brain_mask_quality).read_text()),
            "brain_outside_crop_fraction": round(outside / (outside + int(mask.sum())), 4)
            if mask.any() else 1.0,
            "saturated_fraction": round(float(np.mean(brain >= SATURATED_LEVEL)), 4)
            if brain.size else 0.0,
            "dark_fraction": round(float(np.mean(brain < DARK_LEVEL)), 4) if brain.size else 1.0,
            "n_clusters": len(rows),
            "largest_cluster_mm3": max((row["volume_mm3"] for row in rows), default=0.0),
            **json.loads(Path(self.inputs.registration_quality).read_text()),
        }
        metrics["qc_flags"] = quality_flags(metrics, self.inputs.limits)
        out_file = Path(runtime.cwd) / "qc.json"
        out_file.write_text(json.dumps(metrics, indent=2) + "\n")
        self._results["out_file"] = str(out_file)
        return runtime
