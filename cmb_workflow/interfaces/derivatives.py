"""Write one image's results into the BIDS-Derivatives output folder, atomically."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, Directory, File, SimpleInterface,
                                    TraitedSpec, isdefined, traits)

from ..imageops import (copy_atomic, read_mask, remove_stale_temporaries, save_atomic,
                        write_text_atomic)
from ..mars import MARS_CLASSES, MNI_COLUMNS, REGION_COLUMNS, REGIONS
from ..mimics import MIMIC_COLUMNS, MIMIC_SIDECAR
from .lesions import DEFINITE_MIN_PROB, LESION_COLUMNS

LESION_SIDECAR = {
    "label": {"Description": "Lesion number; equals the voxel value in the desc-cmb_dseg map"},
    "x": {"Description": "Centroid, scanner RAS x", "Units": "mm"},
    "y": {"Description": "Centroid, scanner RAS y", "Units": "mm"},
    "z": {"Description": "Centroid, scanner RAS z", "Units": "mm"},
    "volume_mm3": {"Description": "Lesion volume on the 1 mm analysis grid", "Units": "mm^3"},
    "max_prob": {"Description": "Highest ensemble probability inside the lesion"},
    "mean_prob": {"Description": "Mean ensemble probability inside the lesion"},
    "confidence": {"Description": "Grade of the lesion from its max_prob", "Levels": {
        "definite": f"max_prob at least {DEFINITE_MIN_PROB}",
        "possible": f"max_prob below {DEFINITE_MIN_PROB}"}},
    "region": {"Description": "MARS region covering most of the lesion's voxels (the centroid "
                              "breaks ties), from the bundled atlas registered to the image",
               "Levels": {name: name.replace("_", " ") for name in (*REGIONS, "unknown")}},
    "mars_class": {"Description": "Microbleed Anatomical Rating Scale class of the region",
                   "Levels": {name: name for name in (*MARS_CLASSES, "unknown")}},
    "hemisphere": {"Description": "Side of the region", "Levels": {
        "left": "left", "right": "right", "unknown": "no atlas region (registration failed or "
                                                     "the lesion lies outside the atlas)"}},
    **{column: {"Description": f"Centroid, MNI152 2009 {column[0]} through the template "
                              "registration (n/a without one)", "Units": "mm"}
       for column in MNI_COLUMNS},
    **MIMIC_SIDECAR,
}


def report_name(relative_prefix: str) -> str:
    """OUT-relative name of an image's report: OUT/sub-01_ses-1[_run-1]_report.html."""
    return Path(relative_prefix).name + "_report.html"


class WriteDerivativesInputSpec(BaseInterfaceInputSpec):
    out_dir = Directory(mandatory=True, desc="root of the derivatives dataset")
    relative_prefix = traits.Str(mandatory=True,
                                 desc="e.g. sub-01/ses-1/anat/sub-01_ses-1; validated labels only")
    source_file = File(exists=True, mandatory=True, desc="raw input image")
    probability = File(exists=True, mandatory=True)
    labels = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    brain_mask_quality = File(exists=True, mandatory=True,
                              desc="JSON: brain volume and field-of-view edge fraction")
    lesion_table = File(exists=True, mandatory=True, desc="JSON rows from LesionRegions")
    qc = File(exists=True, mandatory=True, desc="QualityControl's JSON")
    report = File(exists=True, mandatory=True, desc="SubjectReport's HTML")
    settings = traits.Dict(desc="settings recorded in the sidecars (threshold, model, ...)")
    prediction = traits.Dict(desc="how the prediction ran (Precision, PrecisionReason), for "
                                  "the probseg sidecar")
    modality = traits.Str("swi", usedefault=True, desc="the input's suffix (swi, T2starw)")
    model_input = File(exists=True, desc="the normalised crop (Normalize); given, the array the "
                                         "model saw is written as desc-modelinput")
    model_input_mask = File(exists=True, desc="the crop's brain mask")
    model_input_masked = traits.Bool(False, usedefault=True,
                                     desc="the model saw the crop multiplied by its brain mask")
    model_input_description = traits.Dict(desc="how the model input was made, for its sidecar")


class WriteDerivativesOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))
    n_lesions = traits.Int()


class WriteDerivatives(SimpleInterface):
    """Copy one image's maps, lesion table, QC, sidecars and report into OUT under its BIDS
    prefix, each file written atomically."""

    input_spec = WriteDerivativesInputSpec
    output_spec = WriteDerivativesOutputSpec

    def _run_interface(self, runtime):
        root = Path(self.inputs.out_dir).resolve()
        prefix = (root / self.inputs.relative_prefix).resolve()
        if root not in prefix.parents:
            raise ValueError(f"output prefix {self.inputs.relative_prefix!r} leaves {root}")
        written = []

        def target(suffix):
            path = prefix.parent / f"{prefix.name}_{suffix}"
            # A run killed (SIGKILL) while writing here left its temporary file behind.
            remove_stale_temporaries(path)
            written.append(str(path))
            return path

        for source, suffix in ((self.inputs.probability, "desc-cmb_probseg.nii.gz"),
                               (self.inputs.labels, "desc-cmb_dseg.nii.gz"),
                               (self.inputs.brain_mask, "desc-brain_mask.nii.gz")):
            copy_atomic(source, target(suffix))

        sources = [f"bids:raw:{Path(self.inputs.source_file).name}"]
        quality = json.loads(Path(self.inputs.brain_mask_quality).read_text())
        write_text_atomic(json.dumps({"Type": "Brain", "Sources": sources, **quality}, indent=2)
                          + "\n", target("desc-brain_mask.json"))
        settings = dict(self.inputs.settings) if self.inputs.settings else {}
        prediction = dict(self.inputs.prediction) if self.inputs.prediction else {}
        write_text_atomic(json.dumps({"Sources": sources, **settings, **prediction}, indent=2)
                          + "\n",
                          target("desc-cmb_probseg.json"))

        rows = json.loads(Path(self.inputs.lesion_table).read_text())
        columns = (*LESION_COLUMNS, *REGION_COLUMNS, *MIMIC_COLUMNS)
        lines = ["\t".join(columns)]
        lines += ["\t".join(str(row[column]) for column in columns) for row in rows]
        write_text_atomic("\n".join(lines) + "\n", target("desc-cmb_lesions.tsv"))
        write_text_atomic(json.dumps(LESION_SIDECAR, indent=2) + "\n",
                          target("desc-cmb_lesions.json"))
        copy_atomic(self.inputs.qc, target("desc-cmb_qc.json"))
        if isdefined(self.inputs.model_input):
            self._write_model_input(target, sources)
        report = root / report_name(self.inputs.relative_prefix)
        remove_stale_temporaries(report)
        copy_atomic(self.inputs.report, report)
        written.append(str(report))

        self._results.update(out_files=written, n_lesions=len(rows))
        return runtime

    def _write_model_input(self, target, sources) -> None:
        """The array given to the model and its mask, on the model's grid (--save-model-input)."""
        image = nib.load(self.inputs.model_input)
        data = np.asarray(image.dataobj, dtype=np.float32)
        mask = read_mask(self.inputs.model_input_mask)
        if self.inputs.model_input_masked:
            data = data * mask  # as Predict computes it
        suffix = self.inputs.modality
        save_atomic(nib.Nifti1Image(data, image.affine),
                    target(f"desc-modelinput_{suffix}.nii.gz"))
        save_atomic(nib.Nifti1Image(mask.astype(np.uint8), image.affine),
                    target("desc-modelinput_mask.nii.gz"))
        description = {"Sources": sources, "Description":
                       "The array given to the model, on the model's grid (the crop box of the "
                       "conformed image), and its brain mask", "MaskApplied":
                       bool(self.inputs.model_input_masked),
                       **dict(self.inputs.model_input_description or {})}
        write_text_atomic(json.dumps(description, indent=2) + "\n",
                          target(f"desc-modelinput_{suffix}.json"))
