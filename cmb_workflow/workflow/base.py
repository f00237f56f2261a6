"""The study graphs. A run executes them one after the other: preprocessing of every image,
then prediction in batches (with each image's post-processing), so that an image failing
preprocessing cannot stop the prediction of the other images of its batch."""

from nipype.pipeline import engine as pe

from ..configs import PREDICTION_FLOOR, Settings
from ..interfaces.predict import Predict
from .image import init_postprocess_wf, init_preprocess_wf

# The graphs' folders in the work folder.
WORK_GRAPHS = ("preprocess", "predict")


def init_preprocess_study_wf(jobs, config: Settings, handoff_dir: str, work_dir: str) -> pe.Workflow:
    """One init_preprocess_wf per job, side by side, each writing its Handoff record to
    handoff_dir/<job.node_name>.json.

    Inputs: none (each image's inputnode is filled from its job). Outputs: none (the handoff
    records are what the prediction graph reads).
    """
    workflow = pe.Workflow(name=WORK_GRAPHS[0], base_dir=str(work_dir))
    workflow.add_nodes([init_preprocess_wf(job, config, f"{handoff_dir}/{job.node_name}.json",
                                           name=job.node_name) for job in jobs])
    return workflow


def init_predict_study_wf(batches: dict, prepared: dict, config: Settings, model: dict,
                          out_dir: str, work_dir: str, predict_plugin_args: dict | None = None,
                          command_line: str = "") -> pe.Workflow:
    """A Predict node per batch, feeding an init_postprocess_wf per image of the batch.

    batches: node name -> the jobs it predicts; prepared: job.node_name -> Handoff record;
    model: the CMB model's provenance (registry.model_provenance), recorded in the sidecars.

    Inputs: none (the Predict nodes take the prepared images). Outputs: none (each image's
    results are written into out_dir by its WriteDerivatives node).
    """
    workflow = pe.Workflow(name=WORK_GRAPHS[1], base_dir=str(work_dir))
    for batch_name, batch in batches.items():
        # A workflow per batch names its node like the images' ones: predict.<batch>.predict
        batch_wf = pe.Workflow(name=batch_name)
        predict = pe.Node(Predict(in_files=[prepared[job.node_name]["image"] for job in batch],
                                  mask_files=[prepared[job.node_name]["mask"] for job in batch],
                                  model_descriptor=str(config.models),
                                  allow_unverified=config.allow_unverified_models,
                                  mask_input=config.mask_input,
                                  floor=PREDICTION_FLOOR[config.preprocessing],
                                  mask_output=config.mask_output, precision=config.precision,
                                  threshold=config.threshold, connectivity=config.connectivity,
                                  min_size=config.min_lesion_size,
                                  min_peak=config.min_peak_probability),
                          name="predict", mem_gb=config.predict_memory_gb)
        if predict_plugin_args:
            predict.plugin_args = predict_plugin_args
        batch_wf.add_nodes([predict])
        for index, job in enumerate(batch):
            image_wf = init_postprocess_wf(job, prepared[job.node_name], config, model,
                                           str(out_dir), command_line=command_line,
                                           name=job.node_name)
            workflow.connect([(batch_wf, image_wf, [
                (("predict.out_files", _pick, index), "inputnode.probability"),
                ("predict.precision", "inputnode.precision")])])
    return workflow


def _pick(items, index):
    # A connection function: Nipype stores its source and runs it where the inputs are set.
    return items[index]
