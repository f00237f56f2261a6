"""Score every lesion for how much it looks like a microbleed mimic (cmb_workflow.mimics), and
optionally drop the likely mimics from the labels and the table."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..imageops import read_mask
from ..mimics import score_lesions


class ScoreMimicsInputSpec(BaseInterfaceInputSpec):
    labels = File(exists=True, mandatory=True, desc="lesion labels 1..N (LabelLesions)")
    lesion_table = File(exists=True, mandatory=True, desc="JSON lesion rows (LabelLesions)")
    image = File(exists=True, mandatory=True, desc="the model's input image, on the labels' grid")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask on the labels' grid")
    drop_likely_mimics = traits.Bool(False, usedefault=True,
                                     desc="remove lesions flagged likely_mimic")


class ScoreMimicsOutputSpec(TraitedSpec):
    out_labels = File(exists=True, desc="lesion labels, numbered 1..M in the table's order")
    out_table = File(exists=True, desc="JSON lesion rows with the mimic features and score")
    out_dropped = File(exists=True, desc="JSON rows of the lesions dropped as likely mimics")


class ScoreMimics(SimpleInterface):
    """Add the mimic features, mimic_score and likely_mimic to every lesion row; with
    drop_likely_mimics, renumber the kept lesions in their order and list the dropped ones."""

    input_spec = ScoreMimicsInputSpec
    output_spec = ScoreMimicsOutputSpec

    def _run_interface(self, runtime):
        labels_img = nib.load(self.inputs.labels)
        labels = np.asarray(labels_img.dataobj).astype(np.int32)
        rows = json.loads(Path(self.inputs.lesion_table).read_text())
        if rows:
            image = np.asarray(nib.load(self.inputs.image).dataobj, dtype=np.float32)
            brain = read_mask(self.inputs.brain_mask)
            rows = score_lesions(rows, image, labels, brain, labels_img.affine)
        dropped = [row for row in rows
                   if self.inputs.drop_likely_mimics and row["likely_mimic"] == "yes"]
        if dropped:
            kept = [row for row in rows if row["likely_mimic"] != "yes"]
            lookup = np.zeros(len(rows) + 1, np.int32)
            for new_label, row in enumerate(kept, start=1):
                lookup[row["label"]] = new_label
            labels = lookup[labels]
            rows = [{**row, "label": new_label} for new_label, row in enumerate(kept, start=1)]
        cwd = Path(runtime.cwd)
        nib.save(nib.Nifti1Image(labels, labels_img.affine), cwd / "lesion_labels.nii.gz")
        (cwd / "lesions.json").write_text(json.dumps(rows, indent=1))
        (cwd / "dropped.json").write_text(json.dumps(dropped, indent=1))
        self._results.update(out_labels=str(cwd / "lesion_labels.nii.gz"),
                             out_table=str(cwd / "lesions.json"),
                             out_dropped=str(cwd / "dropped.json"))
        return runtime
