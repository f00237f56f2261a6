"""Run the study: find images, run the graphs (preprocessing, then batched prediction and
post-processing), and write the summary; or, with the slurm-array plugin, submit them as job
arrays (slurm_array.py)."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path

from .bids import find_images
from .configs import MASK_INPUT, ConfigError, Settings, results_digest, save_settings
from .execution import (Execution, Interrupted, RunLock, configure_nipype, name_run_log,
                        raise_on_signals, stop_children)
from .models import read_descriptor, verify
from .registry import model_provenance
from .slurm import ARRAY_PLUGIN

LOGGER = logging.getLogger("cmb_workflow")


def run_study(in_dir, out_dir, config: Settings, command_line: str = "") -> int:
    """Process every image; returns 0 when all succeeded, 1 when some failed or were skipped.

    command_line: how the run was started, recorded in the reports. SIGTERM or SIGINT stops
    the workers, leaves the work folder resumable and raises Interrupted. With the
    slurm-array plugin it returns once the jobs are queued (slurm_array.submit)."""
    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir).resolve()
    work_dir = Path(config.work_dir or out_dir / "work").resolve()
    check_folders(in_dir, out_dir, work_dir)
    descriptor = read_descriptor(config.models)
    # Refuse a tampered model here, once, before any subject starts.
    verify(descriptor, allow_unverified=config.allow_unverified_models)
    config = with_model_defaults(config, descriptor)
    models = [model_provenance(descriptor)]
    if config.brain_mask_model:
        brain_mask_descriptor = read_descriptor(config.brain_mask_model,
                                                expected_target="brain_mask")
        verify(brain_mask_descriptor, allow_unverified=config.allow_unverified_models)
        models.append(model_provenance(brain_mask_descriptor))

    jobs, rejected = find_images(in_dir, input_type=config.input_type,
                                 participant_label=config.participant_label,
                                 session_label=config.session_label, echo=config.echo,
                                 masks_dir=config.masks_dir)
    if config.plugin == ARRAY_PLUGIN:
        from .slurm_array import submit

        return submit(jobs, rejected, out_dir, work_dir, models, config, command_line)
    labels = {job.node_name: job.prefix for job in jobs}
    # Before OUT exists: a cluster that refuses the jobs leaves nothing behind.
    execution = Execution(config, out_dir / "logs" / "slurm", labels)
    make_folder(out_dir)
    make_folder(work_dir)
    restore_signals = raise_on_signals()
    try:
        # The workers are stopped before the locks are released.
        # OUT's lock file lies in its logs/, beside the run logs, not among the results.
        with RunLock(out_dir, out_dir / "logs"), \
                RunLock(work_dir) if work_dir != out_dir else nullcontext():
            try:
                status = _run_locked(jobs, rejected, out_dir, work_dir, models, config,
                                     execution, command_line)
                if status == 0 and config.clean_work:
                    clean_work_folder(work_dir)
                return status
            except Interrupted as stop:
                stopped = stop_children()
                LOGGER.error("stopped by %s%s; the work folder %s is kept: run the same command "
                             "again to resume", stop, f" ({len(stopped)} worker process(es) "
                             "ended)" if stopped else "", work_dir)
                raise
    finally:
        restore_signals()


def with_model_defaults(config: Settings, descriptor) -> Settings:
    """The settings left unset that the model decides: min_peak_probability (the descriptor's
    own, else none: 0), preprocessing (the descriptor's), mask_input (the preprocessing's),
    drop_likely_mimics (the descriptor's, else no)."""
    min_peak = config.min_peak_probability
    preprocessing = config.preprocessing or descriptor.preprocessing
    mask_input = config.mask_input
    drop_likely_mimics = config.drop_likely_mimics
    return config.replace(
        min_peak_probability=descriptor.min_peak_probability or 0.0 if min_peak is None
        else min_peak, preprocessing=preprocessing,
        mask_input=MASK_INPUT[preprocessing] if mask_input is None else mask_input,
        drop_likely_mimics=descriptor.drop_likely_mimics if drop_likely_mimics is None
        else drop_likely_mimics)


def clean_work_folder(work_dir: Path) -> None:
    """Delete what runs keep in the work folder; only their own entries, since --work-dir may
    name a folder that holds other things too."""
    from .workflow.base import WORK_GRAPHS

    for name in (*WORK_GRAPHS, "handoff", "crash"):
        shutil.rmtree(work_dir / name, ignore_errors=True)
    LOGGER.info("work folder %s cleaned (--clean-work)", work_dir)


def check_folders(in_dir: Path, out_dir: Path, work_dir: Path) -> None:
    """Refuse an OUT or work folder that would write into IN (its derivatives/ excepted), or
    that holds IN."""
    for name, folder in (("OUT", out_dir), ("work folder", work_dir)):
        inside = folder == in_dir or folder.is_relative_to(in_dir)
        if inside and not folder.is_relative_to(in_dir / "derivatives"):
            raise ConfigError(f"{folder}: the {name} lies in the input folder {in_dir}; results "
                              f"go outside it or under {in_dir / 'derivatives'}")
        if in_dir.is_relative_to(folder):
            raise ConfigError(f"{folder}: the {name} holds the input folder {in_dir}; choose "
                              "another one")


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".cmb-workflow-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot write there ({exc.strerror or exc})") from exc


def _run_locked(jobs, rejected, out_dir: Path, work_dir: Path, models: list[dict],
                config: Settings, execution: Execution, command_line: str) -> int:
    log_file = name_run_log(out_dir / "logs")
    execution.start_workers()
    # Imported once the forkserver has started: Nipype and the step interfaces take about a
    # second to import, which its own imports need not wait for.
    from .summary import write_dataset_description, write_summary

    labels = execution.labels
    write_dataset_description(out_dir, models)
    crash_dir = work_dir / "crash"
    # Handoff records prove that this run (not an earlier one) prepared an image.
    handoff_dir = work_dir / "handoff"
    for folder in (crash_dir, handoff_dir):
        shutil.rmtree(folder, ignore_errors=True)
    configure_nipype(crash_dir, log_file)
    save_settings(config, log_file.with_name(log_file.stem + "_settings.yml"))

    for job in jobs:
        LOGGER.info("%s: %s%s", job.prefix, job.source,
                    f" (brain mask {job.mask})" if job.mask else "")
    prepared: dict[str, dict] = {}
    batch_of: dict[str, str] = {}
    if jobs:
        from .workflow.base import init_predict_study_wf, init_preprocess_study_wf

        # No early model loading for a re-run whose batches were all predicted before: it would
        # only wait for it (2.5 s on a finished 4-image study).
        every = {job.node_name for job in jobs}
        if not predicted_before(work_dir, _batches(jobs, every, config.predict_batch_size)):
            execution.prepare_prediction(str(config.models), config.allow_unverified_models)
        try:
            execution.run(init_preprocess_study_wf(jobs, config, str(handoff_dir),
                                                   str(work_dir)),
                          ("preprocessing", "handoff", labels))
            prepared = read_handoffs(handoff_dir, jobs)
            batches = _batches(jobs, prepared, config.predict_batch_size)
            for name, batch in batches.items():
                labels[name] = ", ".join(job.prefix for job in batch)
                batch_of.update({job.node_name: name for job in batch})
            if batches:
                execution.run(init_predict_study_wf(batches, prepared, config, models[0],
                                                    str(out_dir), str(work_dir),
                                                    execution.predict_plugin_args,
                                                    command_line),
                              ("prediction and results", "write_derivatives", prepared),
                              prediction=True)
        finally:
            execution.release_prediction()

    rows = write_summary(out_dir, jobs, rejected, crash_dir, prepared, batch_of, config.models,
                         results_digest(config))
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed:
        LOGGER.error("%s %s: %s", row["status"].upper(), row["source"], row["message"])
    LOGGER.info("%d image(s) processed, %d failed or skipped; summary: %s; log: %s",
                len(rows) - len(failed), len(failed), out_dir / "cmb_summary.tsv", log_file)
    return 1 if failed else 0


def read_handoffs(handoff_dir: Path, jobs) -> dict[str, dict]:
    """node name -> Handoff record, for the images whose preprocessing wrote one."""
    return {job.node_name: json.loads(record.read_text()) for job in jobs
            if (record := handoff_dir / f"{job.node_name}.json").exists()}


def predicted_before(work_dir: Path, batches) -> bool:
    """Whether every one of the prediction batches has a result in the work folder (Nipype then
    reuses it unless its inputs changed)."""
    from .workflow.base import WORK_GRAPHS

    return all((work_dir / WORK_GRAPHS[1] / name / "predict" / "result_predict.pklz").exists()
               for name in batches)


def _batches(jobs, prepared, size: int) -> dict[str, list]:
    """Prediction batches: fixed slices of the image list, keeping the prepared images
    (`prepared` holds their node names).

    Fixed slices mean an image that fails preprocessing changes only its own batch, so the
    other batches' cached predictions stay valid when the run is repeated.
    """
    batches = {}
    for start in range(0, len(jobs), size):
        batch = [job for job in jobs[start:start + size] if job.node_name in prepared]
        if batch:
            batches[f"batch_{start // size:04d}"] = batch
    return batches
