"""Predict microbleed probabilities with an ensemble of SHIVA-convention 3D U-Nets."""

import hashlib
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, SimpleInterface, TraitedSpec, traits

from ..imageops import WORK_IMAGE_SUFFIX, read_mask, write_text_atomic
from ..models import (PRECISIONS, bfloat16_candidate, cpu_model_name, import_tensorflow,
                      load_ensemble, native_bfloat16_flags)
from ..registry import cmb_home
from .lesions import LesionRuleInputSpec, label_lesions

LOGGER = logging.getLogger("cmb_workflow.predict")
# bfloat16 is kept only if every lesion's highest probability stays this close to float32's.
BFLOAT16_MAX_PEAK_DIFFERENCE = 0.02
# Under $CMB_WORKFLOW_HOME: the outcome of each bfloat16 check, so that it runs at the first use
# of a model on a CPU (with one lesion rule), not in every prediction job (a float32 pass).
PRECISION_CHECKS = "precision_checks"


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
                            desc="auto: bfloat16 where the CPU has it natively and, at the "
                                 "model's first use on this CPU, the first image's lesions "
                                 "matched float32's; float32; bfloat16 (checked the same way, "
                                 "with the lesion rule's inputs)")


class PredictOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True),
                            desc="mean probability of the folds per image, cropped grid, float32")
    precision = traits.Dict(desc="Precision (float32 or bfloat16) the batch was predicted in "
                                 "and PrecisionReason, for the sidecars")


class Predict(SimpleInterface):
    """A batch of images with one load of the models (kept for the next batch of the process).

    A bfloat16 candidate (models.bfloat16_candidate) is checked on the first image at the
    first use of the ensemble on this CPU, TensorFlow and lesion rule: used only if its lesions
    are float32's, else float32 is, with the reason logged. The outcome is kept
    (PRECISION_CHECKS) and followed by later jobs without checking again."""

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
        record = self._check_record(ensemble) if candidate else None
        kept = self._kept_check(record) if record is not None else None
        if kept:
            (precision, reason), record = kept, None  # checked at an earlier use
        out_files = []
        for index, (in_file, mask_file) in enumerate(zip(self.inputs.in_files,
                                                         self.inputs.mask_files)):
            img = nib.load(in_file)
            mask = read_mask(mask_file)
            data = np.asarray(img.dataobj, dtype=np.float32)
            if self.inputs.mask_input:
                data = data * mask
            probability = self._probability(ensemble, data, mask, precision)
            if index == 0 and record is not None:
                difference = self._bfloat16_difference(
                    probability, self._probability(ensemble, data, mask, "float32"), mask)
                if difference:
                    precision, reason = "float32", f"{reason}, but {difference}"
                    probability = self._probability(ensemble, data, mask, precision)
                else:
                    reason = f"{reason}; its lesions were float32's at the first use"
                self._keep_record(record, precision, reason)
            out_files.append(str(Path(runtime.cwd) / f"probability_{index:03d}{WORK_IMAGE_SUFFIX}"))
            nib.save(nib.Nifti1Image(probability, img.affine), out_files[-1])
        LOGGER.info("predicted in %s: %s", precision, reason)
        self._results.update(out_files=out_files,
                             precision={"Precision": precision, "PrecisionReason": reason})
        return runtime

    def _check_record(self, ensemble) -> Path:
        """Where the bfloat16 check of this ensemble, CPU, TensorFlow and lesion rule is kept."""
        inputs = self.inputs
        what = {"models": [model_file.md5 for model_file in ensemble.descriptor.files],
                "cpu": cpu_model_name(), "flags": native_bfloat16_flags(),
                "tensorflow": import_tensorflow().__version__,
                "rule": [inputs.threshold, inputs.connectivity, inputs.min_size, inputs.min_peak,
                         inputs.floor, inputs.mask_input, inputs.mask_output]}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
        return cmb_home() / PRECISION_CHECKS / f"{digest}.json"

    @staticmethod
    def _kept_check(record: Path) -> tuple[str, str] | None:
        """The (precision, reason) an earlier check kept; None if there is none usable (then
        the check runs again and replaces it)."""
        try:
            precision, reason = json.loads(record.read_text())
        except (OSError, ValueError, TypeError):
            return None
        return (precision, str(reason)) if precision in ("float32", "bfloat16") else None

    @staticmethod
    def _keep_record(record: Path, precision: str, reason: str) -> None:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(json.dumps([precision, reason]), record)
        except OSError as exc:  # the check then runs again at the next use
            LOGGER.warning("could not keep the bfloat16 check in %s: %s", record, exc)

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
