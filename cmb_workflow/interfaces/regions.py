"""Give every lesion its MARS region and MNI coordinates: the bundled atlas brought onto the lesion
grid, and the lesion's centroid taken to the template, with the template registration of the
brain-mask step (no second registration)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..imageops import read_mask
from ..mars import MNI_COLUMNS, UNKNOWN, assign_regions, mars_atlas
from ..registration import mni152, to_template, warp_to_subject


class LesionRegionsInputSpec(BaseInterfaceInputSpec):
    labels = File(exists=True, mandatory=True, desc="lesion labels (LabelLesions' grid)")
    lesion_table = File(exists=True, mandatory=True, desc="JSON lesion rows (LabelLesions)")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask on the labels' grid")
    template_transforms = traits.List(File(exists=True), mandatory=True,
                                      desc="template -> image transforms; empty: no registration")
    registration_error = traits.Str("", usedefault=True, desc="why there are no transforms")


class LesionRegionsOutputSpec(TraitedSpec):
    out_table = File(exists=True, desc="the lesion rows with region, mars_class, hemisphere and "
                                       "the centroid in MNI space (x_mni, y_mni, z_mni)")
    out_quality = File(exists=True, desc="JSON: registration_error and template_brain_dice, the "
                                         "overlap of the registered template brain and the mask")


class LesionRegions(SimpleInterface):
    """Add each lesion's MARS region and MNI coordinates to its row, and score the template
    registration (Dice of the template's brain with the image's mask)."""

    input_spec = LesionRegionsInputSpec
    output_spec = LesionRegionsOutputSpec

    def _run_interface(self, runtime):
        rows = json.loads(Path(self.inputs.lesion_table).read_text())
        transforms = list(self.inputs.template_transforms)
        quality = {"registration_error": self.inputs.registration_error or "",
                   "template_brain_dice": None}
        if transforms:
            template = np.asarray(warp_to_subject(mni152("brain_mask"), self.inputs.labels,
                                                  transforms).dataobj) >= 0.5
            mask = read_mask(self.inputs.brain_mask)
            overlap = 2.0 * np.count_nonzero(template & mask)
            total = np.count_nonzero(template) + np.count_nonzero(mask)
            quality["template_brain_dice"] = round(overlap / total, 4) if total else 0.0
        if transforms and rows:  # the atlas only for lesions: most scans have none
            atlas = np.asarray(warp_to_subject(mars_atlas(), self.inputs.labels, transforms,
                                               "nearestNeighbor").dataobj).astype(np.uint8)
            labels_img = nib.load(self.inputs.labels)
            labels = np.asarray(labels_img.dataobj)
            inverse = np.linalg.inv(labels_img.affine)
            centroids = {}
            for row in rows:
                voxel = np.round(nib.affines.apply_affine(
                    inverse, [row["x"], row["y"], row["z"]])).astype(int)
                centroids[row["label"]] = np.clip(voxel, 0, np.array(labels.shape) - 1)
            regions = assign_regions(labels, atlas, centroids)
            mni = to_template([[row["x"], row["y"], row["z"]] for row in rows], transforms)
            for row, point in zip(rows, mni):
                regions[row["label"]].update(zip(MNI_COLUMNS, (round(float(v), 1) for v in point)))
        else:
            regions = {row["label"]: {**UNKNOWN, **dict.fromkeys(MNI_COLUMNS, "n/a")}
                       for row in rows}
        rows = [{**row, **regions[row["label"]]} for row in rows]
        cwd = Path(runtime.cwd)
        (cwd / "lesions_regions.json").write_text(json.dumps(rows, indent=1))
        (cwd / "registration_quality.json").write_text(json.dumps(quality, indent=1))
        self._results.update(out_table=str(cwd / "lesions_regions.json"),
                             out_quality=str(cwd / "registration_quality.json"))
        return runtime
