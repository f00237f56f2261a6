"""The per-image graph: conform -> brain mask -> crop -> normalise -> predict -> lesions -> native."""

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.brainmask import BrainMask
from ..interfaces.conform import Conform
from ..interfaces.crop import CropToBrain
from ..interfaces.derivatives import WriteDerivatives
from ..interfaces.lesions import LabelLesions
from ..interfaces.native import ToNative
from ..interfaces.normalize import Normalize
from ..interfaces.predict import Predict


def init_image_wf(job, config: dict, out_dir: str, *, name: str) -> pe.Workflow:
    """Workflow for one image; its inputnode is filled from `job` (source and optional mask)."""
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "mask_file"]), name="inputnode")
    inputnode.inputs.in_file = str(job.source)
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files", "n_lesions"]),
                         name="outputnode")

    conform = pe.Node(Conform(echo=config["echo"], interpolation=config["interpolation"]),
                      name="conform")
    brain_mask = pe.Node(BrainMask(method=config["brain_mask"]), name="brain_mask")
    if job.mask is not None:
        inputnode.inputs.mask_file = str(job.mask)
        workflow.connect(inputnode, "mask_file", brain_mask, "supplied_mask")
    crop = pe.Node(CropToBrain(dimensions=tuple(config["final_dimensions"]),
                               top_margin=config["top_margin"]), name="crop")
    normalize = pe.Node(Normalize(method=config["normalization"], percentile=config["percentile"],
                                  clip_max=config["clip_max"]), name="normalize")
    predict = pe.Node(Predict(model_descriptor=str(config["models"]),
                              allow_unverified=config["allow_unverified_models"],
                              mask_input=config["mask_input"], mask_output=config["mask_output"]),
                      name="predict", mem_gb=config["predict_memory_gb"])
    lesions = pe.Node(LabelLesions(threshold=config["threshold"],
                                   connectivity=config["connectivity"],
                                   min_size=config["min_lesion_size"]), name="lesions")
    to_native = pe.Node(ToNative(), name="to_native")
    write = pe.Node(WriteDerivatives(out_dir=out_dir, relative_prefix=job.relative_prefix,
                                     settings=_recorded_settings(config)),
                    name="write_derivatives", run_without_submitting=True)
    # Outputs are cheap to copy; writing them every run restores a deleted or edited OUT.
    write.overwrite = True

    workflow.connect([
        (inputnode, conform, [("in_file", "in_file")]),
        (conform, brain_mask, [("out_file", "in_file")]),
        (conform, crop, [("out_file", "in_file")]),
        (brain_mask, crop, [("out_file", "mask_file")]),
        (crop, normalize, [("out_file", "in_file"), ("out_mask", "mask_file")]),
        (normalize, predict, [("out_file", "in_file")]),
        (crop, predict, [("out_mask", "mask_file")]),
        (predict, lesions, [("out_file", "in_file")]),
        (inputnode, to_native, [("in_file", "reference")]),
        (predict, to_native, [("out_file", "probability")]),
        (lesions, to_native, [("out_labels", "labels"), ("out_table", "lesion_table")]),
        (brain_mask, to_native, [("out_file", "brain_mask")]),
        (inputnode, write, [("in_file", "source_file")]),
        (to_native, write, [("probability", "probability"), ("labels", "labels"),
                            ("brain_mask", "brain_mask")]),
        (lesions, write, [("out_table", "lesion_table")]),
        (write, outputnode, [("out_files", "out_files"), ("n_lesions", "n_lesions")]),
    ])
    return workflow


def _recorded_settings(config: dict) -> dict:
    keys = ("threshold", "connectivity", "min_lesion_size", "normalization", "percentile",
            "interpolation", "mask_input", "mask_output")
    return {"ModelDescriptor": str(config["models"]), **{key: config[key] for key in keys}}
