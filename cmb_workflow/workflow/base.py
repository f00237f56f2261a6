"""The study graph: one per-image workflow for each input image."""

from nipype.pipeline import engine as pe

from .image import init_image_wf


def init_cmb_wf(jobs, config: dict, out_dir: str, work_dir: str) -> pe.Workflow:
    workflow = pe.Workflow(name="cmb_wf", base_dir=str(work_dir))
    workflow.add_nodes([init_image_wf(job, config, str(out_dir), name=job.node_name)
                        for job in jobs])
    return workflow
