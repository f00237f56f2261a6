"""Quality-control metrics of one image and the flags they raise (configs/default.yml, qc)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

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


def quality_flags(metrics: dict, limits: dict) -> list[str]:
    low, high = limits["brain_volume_ml"]
    checks = {
        "brain_volume_out_of_range": not low <= metrics["brain_volume_ml"] <= high,
        "brain_cut_by_fov": metrics["mask_fov_edge_fraction"] > limits["max_fov_edge_fraction"],
        "brain_cut_by_crop_box":
            metrics["brain_outside_crop_fraction"] > limits["max_outside_crop_fraction"],
        "unusual_intensity_histogram":
            metrics["saturated_fraction"] > limits["max_saturated_fraction"]
            or metrics["dark_fraction"] > limits["max_dark_fraction"],
        "many_clusters": metrics["n_clusters"] > limits["max_lesions"],
        "very_large_cluster": metrics["largest_cluster_mm3"] > limits["max_lesion_volume_mm3"],
        "registration_failure": bool(metrics["registration_error"])
            or (metrics["template_brain_dice"] or 0.0) < limits["min_template_brain_dice"],
    }
    return [flag for flag, raised in checks.items() if raised]


class QualityControl(SimpleInterface):
    input_spec = QualityControlInputSpec
    output_spec = QualityControlOutputSpec

    def _run_interface(self, runtime):
        mask = np.asarray(nib.load(self.inputs.mask).dataobj) > 0
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
