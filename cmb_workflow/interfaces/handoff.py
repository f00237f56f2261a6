"""Record where an image's preprocessed files are, for the run's prediction phase."""

import json

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..imageops import write_text_atomic


class HandoffInputSpec(BaseInterfaceInputSpec):
    out_file = traits.Str(mandatory=True, desc="JSON to write; the runner clears these every run")
    image = File(exists=True, mandatory=True, desc="cropped image scaled to [0, 1]")
    mask = File(exists=True, mandatory=True, desc="cropped brain mask")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask on the conformed grid")
    conformed = File(exists=True, mandatory=True, desc="conformed image (for the report)")
    box = File(exists=True, mandatory=True, desc="CropToBrain's box JSON")
    template_transforms = traits.List(File(exists=True), mandatory=True,
                                      desc="template -> image transforms; empty if none")
    registration_error = traits.Str(mandatory=True, desc="why there are no transforms, or ''")


class HandoffOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class Handoff(SimpleInterface):
    """Written in every run that got this far, so its presence proves this run's preprocessing
    of the image succeeded (Nipype's own result files may be left over from an earlier run)."""

    input_spec = HandoffInputSpec
    output_spec = HandoffOutputSpec

    def _run_interface(self, runtime):
        record = {key: getattr(self.inputs, key) for key in (
            "image", "mask", "brain_mask", "conformed", "box", "template_transforms",
            "registration_error")}
        write_text_atomic(json.dumps(record, indent=1) + "\n", self.inputs.out_file)
        self._results["out_file"] = self.inputs.out_file
        return runtime
