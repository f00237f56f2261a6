"""Per-image graphs on either side of the batched prediction.

preprocessing: conform -> brain mask (and template registration) -> crop -> normalise -> handoff;
post-processing: lesions -> mimic scores -> regions -> native -> QC -> derivatives -> report.
"""

import json
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..configs import Settings
from ..interfaces.conform import Conform
from ..interfaces.crop import CropToBrain
from ..interfaces.deface import Deface
from ..interfaces.derivatives import WriteDerivatives
from ..interfaces.handoff import Handoff
from ..interfaces.lesions import LabelLesions
from ..interfaces.mimics import ScoreMimics
from ..interfaces.native import ToNative
from ..interfaces.normalize import Normalize
from ..interfaces.qc import QualityControl
from ..interfaces.regions import LesionRegions
from ..interfaces.report import SubjectReport
from .masking import init_brain_mask_wf


def init_preprocess_wf(job, config: Settings, handoff_file: str, *, name: str) -> pe.Workflow:
    """Workflow for one image up to the models' input, prepared as config.preprocessing says
    (preprocessing.py): conform -> brain mask -> [shivai: deface] -> crop -> normalise ->
    handoff (the record the prediction graph reads).

    Inputs (inputnode, filled from `job`)
        in_file: the raw image; mask_file: its supplied brain mask, when job.mask is set.
    Outputs
        none: the Handoff node writes handoff_file (image, mask, box, conformed, brain_mask,
        template_transforms, registration_error).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "mask_file"]), name="inputnode")
    inputnode.inputs.in_file = str(job.source)

    convention = config.preprocessing
    conform = pe.Node(Conform(echo=config.echo, convention=convention,
                              interpolation=config.interpolation,
                              limits=config.as_dict()["input_limits"]), name="conform")
    brain_mask = init_brain_mask_wf(job, config)
    if job.mask is not None:
        inputnode.inputs.mask_file = str(job.mask)
        workflow.connect(inputnode, "mask_file", brain_mask, "inputnode.supplied_mask")
    crop = pe.Node(CropToBrain(dimensions=tuple(config.final_dimensions),
                               top_margin=config.top_margin, convention=convention),
                   name="crop")
    normalize = pe.Node(Normalize(method=config.normalization, percentile=config.percentile,
                                  clip_max=config.clip_max), name="normalize")
    handoff = pe.Node(Handoff(out_file=handoff_file), name="handoff",
                      run_without_submitting=True)
    # Written by every run that gets here (see Handoff); the file is a few bytes.
    handoff.overwrite = True

    workflow.connect([
        (inputnode, conform, [("in_file", "in_file")]),
        (conform, brain_mask, [("out_file", "inputnode.in_file")]),
        (brain_mask, crop, [("outputnode.out_file", "mask_file")]),
        (crop, normalize, [("out_file", "in_file"), ("out_mask", "mask_file")]),
        (normalize, handoff, [("out_file", "image")]),
        (crop, handoff, [("out_mask", "mask"), ("box_file", "box")]),
        (conform, handoff, [("out_file", "conformed")]),
        (brain_mask, handoff, [("outputnode.out_file", "brain_mask"),
                               ("outputnode.template_transforms", "template_transforms"),
                               ("outputnode.registration_error", "registration_error")]),
    ])
    if convention == "shivai":
        deface = pe.Node(Deface(), name="deface")
        workflow.connect([(conform, deface, [("out_file", "in_file")]),
                          (brain_mask, deface, [("outputnode.out_file", "mask_file")]),
                          (deface, crop, [("out_file", "in_file")])])
    else:
        workflow.connect(conform, "out_file", crop, "in_file")
    return workflow


def init_postprocess_wf(job, prepared: dict, config: Settings, model: dict, out_dir: str, *,
                        command_line: str = "", name: str) -> pe.Workflow:
    """Workflow for one image from its probability map to OUT: lesions -> mimic scores ->
    regions -> native grid -> QC -> report -> derivatives.

    prepared: the image's Handoff record; model: the model's provenance for the sidecars.

    Inputs (inputnode)
        probability: the ensemble's probability map on the model's grid (Predict).
        precision: Predict's Precision and PrecisionReason, recorded in the probseg sidecar.
    Outputs
        none: the write_derivatives node writes the image's files into out_dir.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["probability", "precision"]),
                        name="inputnode")
    lesions = pe.Node(LabelLesions(threshold=config.threshold,
                                   connectivity=config.connectivity,
                                   min_size=config.min_lesion_size,
                                   min_peak=config.min_peak_probability,
                                   brain_mask=prepared["mask"]), name="lesions")
    mimics = pe.Node(ScoreMimics(image=prepared["image"], brain_mask=prepared["mask"],
                                 drop_likely_mimics=config.drop_likely_mimics), name="mimics")
    regions = pe.Node(LesionRegions(brain_mask=prepared["mask"],
                                    template_transforms=prepared["template_transforms"],
                                    registration_error=prepared["registration_error"]),
                      name="regions")
    to_native = pe.Node(ToNative(reference=str(job.source), brain_mask=prepared["brain_mask"]),
                        name="to_native")
    qc = pe.Node(QualityControl(image=prepared["image"], mask=prepared["mask"],
                                box=prepared["box"], limits=config.as_dict()["qc"]), name="qc")
    write = pe.Node(WriteDerivatives(out_dir=out_dir, relative_prefix=job.relative_prefix,
                                     source_file=str(job.source), modality=job.modality,
                                     settings=_recorded_settings(config, model)),
                    name="write_derivatives", run_without_submitting=True)
    if config.save_model_input:
        write.inputs.model_input = prepared["image"]
        write.inputs.model_input_mask = prepared["mask"]
        write.inputs.model_input_masked = config.mask_input
        write.inputs.model_input_description = _model_input_description(config, prepared)
    # Outputs are cheap to copy; writing them every run restores a deleted or edited OUT.
    write.overwrite = True
    report = pe.Node(SubjectReport(
        title=Path(job.relative_prefix).name, source_file=str(job.source),
        conformed=prepared["conformed"], brain_mask=prepared["brain_mask"], box=prepared["box"],
        model_descriptor=str(config.models), command_line=command_line,
        lesion_rule=_lesion_rule(config), qc_limits=config.as_dict()["qc"],
        orientation=config.report.orientation), name="report")

    workflow.connect([
        (inputnode, lesions, [("probability", "in_file")]),
        (inputnode, to_native, [("probability", "probability")]),
        (inputnode, write, [("precision", "prediction")]),
        (lesions, mimics, [("out_labels", "labels"), ("out_table", "lesion_table")]),
        (mimics, regions, [("out_labels", "labels"), ("out_table", "lesion_table")]),
        (mimics, to_native, [("out_labels", "labels"), ("out_table", "lesion_table")]),
        (to_native, write, [("probability", "probability"), ("labels", "labels"),
                            ("brain_mask", "brain_mask"),
                            ("brain_mask_quality", "brain_mask_quality")]),
        (to_native, qc, [("brain_mask_quality", "brain_mask_quality")]),
        (regions, qc, [("out_quality", "registration_quality"), ("out_table", "lesion_table")]),
        (regions, write, [("out_table", "lesion_table")]),
        (qc, write, [("out_file", "qc")]),
        (mimics, report, [("out_labels", "labels"), ("out_dropped", "dropped_table")]),
        (regions, report, [("out_table", "lesion_table")]),
        (qc, report, [("out_file", "qc")]),
        (report, write, [("out_file", "report")]),
    ])
    return workflow


def _lesion_rule(config) -> str:
    rule = (f"probability above {config.threshold:g}, {config.connectivity}-connected, "
            f"at least {config.min_lesion_size} voxel(s)")
    if config.min_peak_probability:
        rule += f", highest probability at least {config.min_peak_probability:g}"
    return rule


def _model_input_description(config: Settings, prepared: dict) -> dict:
    box = json.loads(Path(prepared["box"]).read_text())
    return {"Preprocessing": config.preprocessing,
            "CropStart": box["start"], "CropDimensions": box["dimensions"],
            "Normalization": {"Method": config.normalization, "Percentile": config.percentile,
                              "ClipMax": config.clip_max}}


def _recorded_settings(config, model: dict) -> dict:
    keys = ("threshold", "connectivity", "min_lesion_size", "min_peak_probability",
            "preprocessing", "normalization", "percentile", "interpolation", "mask_input",
            "mask_output", "brain_mask", "brain_mask_model", "drop_likely_mimics")
    return {"Model": model, **{key: getattr(config, key) for key in keys}}
