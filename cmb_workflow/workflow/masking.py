"""The brain-mask graph of one image: supplied, template-registered, model-predicted or none."""

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..configs import Settings
from ..interfaces.brainmask import BrainMask
from ..interfaces.brainmask_model import PredictBrainMask
from ..interfaces.template import RegisterTemplate


def init_brain_mask_wf(job, config: Settings, *, name: str = "brain_mask") -> pe.Workflow:
    """The brain mask of one conformed image, and the MNI152 template registered to it.

    Inputs (inputnode)
        in_file: the conformed image.
        supplied_mask: the mask supplied with the image (connected when job.mask is set).
    Outputs (outputnode)
        out_file: the brain mask on in_file's grid.
        template_transforms, registration_error: the template registration, which every mode
        has (the lesion regions need it) but only the template mask depends on.

    A mask supplied with the image is always used; without one, config brain_mask decides:
    auto (the brain-mask model if brain_mask_model is set, else the registered template),
    none (the whole image) or supplied (the image fails: a mask was required).
    """
    mode = config.brain_mask
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file", "supplied_mask"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(
        fields=["out_file", "template_transforms", "registration_error"]), name="outputnode")
    method = "supplied" if job.mask is not None else {"auto": "template"}.get(mode, mode)
    use_model = job.mask is None and mode == "auto" and config.brain_mask_model
    register = pe.Node(RegisterTemplate(required=method == "template" and not use_model),
                       name="register_template")
    workflow.connect([(inputnode, register, [("in_file", "in_file")]),
                      (register, outputnode, [("forward_transforms", "template_transforms"),
                                              ("error", "registration_error")])])

    if use_model:
        predict = pe.Node(PredictBrainMask(
            model_descriptor=str(config.brain_mask_model),
            allow_unverified=config.allow_unverified_models,
            dimensions=tuple(config.final_dimensions), top_margin=config.top_margin,
            convention=config.preprocessing,
            normalization=config.normalization, percentile=config.percentile,
            clip_max=config.clip_max), name="predict_brain_mask",
            mem_gb=config.predict_memory_gb)
        workflow.connect([(inputnode, predict, [("in_file", "in_file")]),
                          (predict, outputnode, [("out_file", "out_file")])])
        return workflow

    brain_mask = pe.Node(BrainMask(method=method, convention=config.preprocessing),
                         name="brain_mask")
    workflow.connect([(inputnode, brain_mask, [("in_file", "in_file")]),
                      (brain_mask, outputnode, [("out_file", "out_file")])])
    if job.mask is not None:
        workflow.connect(inputnode, "supplied_mask", brain_mask, "supplied_mask")
    elif method == "template":
        workflow.connect(register, "forward_transforms", brain_mask, "template_transforms")
        workflow.connect(register, "intensity_mask", brain_mask, "intensity_mask")
    return workflow
