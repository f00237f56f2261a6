"""Predict microbleed probabilities with an ensemble of SHIVA-convention 3D U-Nets."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, SimpleInterface, TraitedSpec, traits

from ..imageops import WORK_IMAGE_SUFFIX, read_mask
from ..models import PRECISIONS, bfloat16_candidate, load_ensemble
from .lesions import LesionRuleInputSpec, label_lesions

LOGGER = logging.getLogger("cmb_workflow.predict")
# bfloat16 is kept only if every lesion's highest probability stays this close to float32's.
BFLOAT16_MAX_PEAK_DIFFERENCE = 0.02


class PredictInputSpec(LesionRuleInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, minlen=1,
                           desc="cropped images scaled to [0, 1], one per image of the batch")
    mask_files = traits.List(File(exists=True), mandatory=True, minlen=1,
                             desc="cropped brain masks, in the order of in_files")
    model_descriptor = File(exists=True, mandatory=True, desc="model_info*.json of the ensemble")
    allow_unverified = traits.Bool(False, usedefault=True,
                                   desc="load model files whose md5 does not match (unsafe)")
    mask_input = traits.Bool(True, usedefault=True, desc="zero the image outside the brain first")
    floor = traits.Range(0.0, 1.0, 0.0, usedefault=True,
                         desc="each fold's probabilities below this count as 0")
    mask_output = traits.Bool(True, usedefault=True,
                              desc="zero the probabilities outside the brain")
    precision = traits.Enum(*PRECISIONS, usedefault=True,
                            desc="auto: bfloat16 where the CPU has it natively and the first "
                                 "image's lesions match float32's; float32; bfloat16 (checked "
                                 "the same way, with the lesion rule's inputs)")


class PredictOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True),
                            desc="mean probability of the folds per image, cropped grid, float32")
    precision = traits.Dict(desc="Precision (float32 or bfloat16) the batch was predicted in "
                                 "and PrecisionReason, for the sidecars")


class Predict(SimpleInterface):
    """A batch of images with one load of the models (kept for the next batch of the process).

    A bfloat16 candidate (models.bfloat16_candidate) is first checked on the batch's first
    image: used only if its lesions are float32's, else float32 is, with the reason logged."""

    input_spec = PredictInputSpec
    output_spec = PredictOutputSpec

    def _run_interface(self, runtime):
        if len(self.inputs.in_files) != len(self.inputs.mask_files):
            raise ValueError(f"{len(self.inputs.in_files)} images but "
                             f"{len(self.inputs.mask_files)} brain masks")
        ensemble = load_ensemble(self.inputs.model_descriptor,
                                 allow_unverified=self.inputs.allow_unverified)
        candidate, reason = bfloat16_candidate(self.inputs.precision)
        precision = "bfloat16" if candidate else "float32"
        out_files = []
        for index, (in_file, mask_file) in enumerate(zip(self.inputs.in_files,
                                                         self.inputs.mask_files)):
            img = nib.load(in_file)
            mask = read_mask(mask_file)
            data = np.asarray(img.dataobj, dtype=np.float32)
            if self.inputs.mask_input:
                data = data * mask
            probability = self._probability(ensemble, data, mask, precision)
            if index == 0 and precision == "bfloat16":
                difference = self._bfloat16_difference(
                    probability, self._probability(ensemble, data, mask, "float32"), mask)
                if difference:
                    precision, reason = "float32", f"{reason}, but {difference}"
                    probability = self._probability(ensemble, data, mask, precision)
            out_files.append(str(Path(runtime.cwd) / f"probability_{index:03d}{WORK_IMAGE_SUFFIX}"))
            nib.save(nib.Nifti1Image(probability, img.affine), out_files[-1])
        LOGGER.info("predicted in %s: %s", precision, reason)
        self._results.update(out_files=out_files,
                             precision={"Precision": precision, "PrecisionReason": reason})
        return runtime

    def _probability(self, ensemble, data, mask, precision):
        probability = ensemble.predict(data[np.newaxis, ..., np.newaxis], floor=self.inputs.floor,
                                       precision=precision)[0]
        if self.inputs.mask_output:
            probability = probability * mask
        return np.clip(probability, 0.0, 1.0).astype(np.float32)

    def _bfloat16_difference(self, bfloat16, float32, mask) -> str:
        """How bfloat16's lesions differ from float32's on one image; empty when they agree:
        the same voxels in every lesion, and each lesion's highest probability (and every
        voxel's) close."""
        rule = dict(threshold=self.inputs.threshold, connectivity=self.inputs.connectivity,
                    min_size=self.inputs.min_size, min_peak=self.inputs.min_peak, brain=mask)
        identity = np.eye(4)
        labels, rows = label_lesions(bfloat16, identity, **rule)
        reference_labels, reference_rows = label_lesions(float32, identity, **rule)
        if not np.array_equal(labels, reference_labels):
            return (f"its lesions on the first image differ from float32's ({len(rows)} against "
                    f"{len(reference_rows)} lesions, or not the same voxels)")
        worst = max((abs(row["max_prob"] - reference["max_prob"])
                     for row, reference in zip(rows, reference_rows)), default=0.0)
        if worst > BFLOAT16_MAX_PEAK_DIFFERENCE:
            return (f"a lesion's highest probability on the first image moved by {worst:.3f} "
                    f"(more than {BFLOAT16_MAX_PEAK_DIFFERENCE})")
        # A first image with no lesion proves nothing by its lesions: no voxel may move more.
        anywhere = float(np.abs(bfloat16 - float32).max())
        if anywhere > BFLOAT16_MAX_PEAK_DIFFERENCE:
            return (f"a probability on the first image moved by {anywhere:.3f} "
                    f"(more than {BFLOAT16_MAX_PEAK_DIFFERENCE})")
        return ""
