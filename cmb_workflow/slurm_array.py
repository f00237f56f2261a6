"""--plugin slurm-array: a study as three SLURM submissions, queued by `run`, which then returns.

1. preprocessing: a job array, one task per image;
2. prediction and post-processing: a job array, one task per batch of images, with the
   prediction job settings (GPU), started once every preprocessing task has ended (afterany);
   a batch predicts those of its images whose preprocessing succeeded;
3. the summary: one job, after both arrays (afterany).
Both arrays run at most slurm.array_throttle tasks at once (--array=0-N%throttle). The plan
(images, batches, settings) lies in OUT/logs/array/<submission>/, where each task
(`cmb-workflow run-task PLAN PHASE`) reads it. A task runs its graph in its own process
(Linear, or MultiProc on the job's CPUs), built by the same factories as with every other
plugin, so the results are the same; it records its images' summary rows itself
(summary.record_rows), and the summary job rebuilds the summary files from all rows
(summary.summarize). Running the same command again submits only the images that are not done
with the same settings.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from .bids import ImageJob
from .configs import ConfigError, load_config, results_digest, save_settings
from .execution import Execution, RunLock, configure_nipype, name_run_log
from .imageops import write_text_atomic
from .runner import make_folder, read_handoffs
from .slurm import SbatchArgs, cancel_jobs, prepare as prepare_slurm, queue, submit as sbatch
from .summary import (read_rows, record_rows, save_row, summarize, summary_rows,
                      write_dataset_description)

LOGGER = logging.getLogger("cmb_workflow")
# How `status` names the states of an image's row; pending ones are told apart with squeue.
STATES = ("done", "failed", "skipped", "running", "pending", "unfinished")


def submit(jobs, rejected, out_dir: Path, work_dir: Path, models: list[dict], config,
           command_line: str) -> int:
    """Queue the arrays and the summary job for the images not yet done with these settings."""
    log_dir = out_dir / "logs" / "slurm"
    tasks = SbatchArgs(config.slurm, log_dir, job_log="slurm-%A_%a.out")
    # Before OUT exists: a cluster that refuses the jobs leaves nothing behind.
    prepare_slurm(tasks, array_tasks=len(jobs))
    submission = tasks.comment
    make_folder(out_dir)
    make_folder(work_dir)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch starts no job whose log it cannot open
    with _locks(out_dir, work_dir):
        digest = results_digest(config)
        todo = _not_done(jobs, out_dir, digest)
        write_dataset_description(out_dir, models)
        plan_dir = out_dir / "logs" / "array" / submission
        # Files found but not usable are known now; no task will see them (and they have
        # no crash files: plan_dir holds none).
        record_rows(out_dir, [], rejected, plan_dir, {}, {}, config.models, digest)
        if not todo:
            summarize(out_dir)
            print(f"all {len(jobs)} image(s) are done with these settings; nothing was "
                  f"submitted. Summary: {out_dir / 'cmb_summary.tsv'}")
            return 0
        size = config.predict_batch_size
        plan = {"submission": submission, "out_dir": str(out_dir), "work_dir": str(work_dir),
                "models": models, "command_line": command_line,
                "images": [{"source": str(job.source), "modality": job.modality,
                            "entities": job.entities, "mask": job.mask and str(job.mask)}
                           for job in todo],
                "batches": [list(range(start, min(start + size, len(todo))))
                            for start in range(0, len(todo), size)]}
        save_settings(config, plan_dir / "settings.yml")
        plan_file = write_text_atomic(json.dumps(plan, indent=1) + "\n", plan_dir / "plan.json")
        for job in todo:
            # Handoff records prove that this submission prepared the image.
            (work_dir / "handoff" / f"{job.node_name}.json").unlink(missing_ok=True)
            # The row a task replaces; one still pending when the arrays end did not finish.
            row = summary_rows([job], [], out_dir, {}, {}, {})[0][0]
            row.update(status="pending", message="queued as a SLURM array task")
            save_row(out_dir, job.node_name, row, None, config.models, digest, submission)

        def command(phase):
            base = config.slurm.task_command or shlex.join([sys.executable, "-m",
                                                             "cmb_workflow.cli"])
            return f"{base} run-task {shlex.quote(str(plan_file))} {phase}"

        throttle = config.slurm.array_throttle
        ids: dict[str, str] = {}
        try:
            ids["preprocess"] = sbatch(tasks.common, command("preprocess"),
                                       name="cmb-preprocess", tasks=len(todo),
                                       throttle=throttle)
            ids["predict"] = sbatch(tasks.predict, command("predict"), name="cmb-predict",
                                    tasks=len(plan["batches"]), throttle=throttle,
                                    after=ids["preprocess"])
            one_job = SbatchArgs(config.slurm, log_dir, comment=submission)
            ids["summary"] = sbatch(one_job.common, command("summary"), name="cmb-summary",
                                    after=f"{ids['preprocess']}:{ids['predict']}")
        except ConfigError:
            if ids:  # half a submission would leave images without a summary
                cancel_jobs(submission)
            raise
        write_text_atomic(json.dumps(ids) + "\n", plan_dir / "jobs.json")
    print(f"submitted {len(todo)} image(s) ({len(jobs) - len(todo)} already done): "
          f"preprocessing array {ids['preprocess']} ({len(todo)} tasks), prediction array "
          f"{ids['predict']} ({len(plan['batches'])} tasks), at most {throttle} running at once "
          f"per array; summary job {ids['summary']}")
    print(f"progress: cmb-workflow status {shlex.quote(str(out_dir))}")
    return 0


def _not_done(jobs, out_dir: Path, digest: str) -> list:
    """The images to submit: all but those done with these settings; refuses images that an
    earlier submission still has in the queue."""
    records = read_rows(out_dir)
    queued = {job["comment"] for job in queue()}
    todo = []
    for job in jobs:
        record = records.get(job.node_name)
        row = record["row"] if record else {}
        if row.get("status") == "pending" and record["submission"] in queued:
            raise ConfigError(f"{job.prefix} is still queued by an earlier submission; wait for "
                              f"its jobs to end or cancel them (cmb-workflow status {out_dir})")
        if not (row.get("status") == "ok" and record["digest"] == digest
                and row["source"] == str(job.source)):
            todo.append(job)
    return todo


def _locks(out_dir: Path, work_dir: Path) -> ExitStack:
    """Shared locks on OUT and the work folder: the tasks work on images of their own, and an
    ordinary run cannot start while they hold them."""
    stack = ExitStack()
    stack.enter_context(RunLock(out_dir, out_dir / "logs", shared=True))
    if work_dir != out_dir:
        stack.enter_context(RunLock(work_dir, shared=True))
    return stack


def run_task(plan_file, phase: str, index: int | None) -> int:
    """One task of a submission; returns 1 when one of its images failed."""
    plan_file = Path(plan_file).resolve()
    plan_dir = plan_file.parent
    plan = json.loads(plan_file.read_text())
    out_dir, work_dir = Path(plan["out_dir"]), Path(plan["work_dir"])
    config = load_config(plan_dir / "settings.yml")
    images = _plan_images(plan)
    with _locks(out_dir, work_dir):
        if phase == "summary":
            return _finish(plan, plan_dir, images)
        name = f"{phase}-{index:05d}"
        # The task's own crash folder: its failures are its images' reasons.
        crash_dir = work_dir / "crash" / plan["submission"] / name
        shutil.rmtree(crash_dir, ignore_errors=True)
        configure_nipype(crash_dir, name_run_log(plan_dir, name))
        # The job's CPUs (--cpus-per-task): MultiProc on more than one.
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 1)
        task_config = config.replace(plugin="MultiProc" if cpus > 1 else "Linear", nprocs=cpus)
        handoff_dir = work_dir / "handoff"
        from .workflow.base import init_predict_study_wf, init_preprocess_study_wf

        if phase == "preprocess":
            job = images[index]
            Execution(task_config, plan_dir, {job.node_name: job.prefix}).run(
                init_preprocess_study_wf([job], config, str(handoff_dir), str(work_dir)))
            if read_handoffs(handoff_dir, [job]):
                return 0  # its row comes with its prediction
            done, prepared, batch_of = [job], {}, {}
        else:
            batch = [images[i] for i in plan["batches"][index]]
            prepared = read_handoffs(handoff_dir, batch)
            # The others failed in preprocessing, and have their row from that task.
            done = [job for job in batch if job.node_name in prepared]
            if not done:
                return 0
            # Named after its first image: unique among submissions sharing the work folder.
            batch_name = f"batch_{batch[0].node_name}"
            batch_of = {job.node_name: batch_name for job in done}
            labels = {job.node_name: job.prefix for job in done}
            labels[batch_name] = ", ".join(job.prefix for job in done)
            Execution(task_config, plan_dir, labels).run(init_predict_study_wf(
                {batch_name: done}, prepared, config, plan["models"][0], str(out_dir),
                str(work_dir), command_line=plan["command_line"]))
        rows = record_rows(out_dir, done, [], crash_dir, prepared, batch_of, config.models,
                           results_digest(config), plan["submission"])
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed:
        LOGGER.error("FAILED %s: %s", row["source"], row["message"])
    return 1 if failed else 0


def _plan_images(plan: dict) -> list[ImageJob]:
    return [ImageJob(Path(image["source"]), image["modality"],
                     tuple(tuple(pair) for pair in image["entities"]),
                     Path(image["mask"]) if image["mask"] else None)
            for image in plan["images"]]


def _finish(plan: dict, plan_dir: Path, images: list) -> int:
    """The summary job: an image still pending lost its task (cancelled, out of time or
    memory); it fails with the task's log named. Then the summary files."""
    out_dir, submission = Path(plan["out_dir"]), plan["submission"]
    ids = json.loads((plan_dir / "jobs.json").read_text())
    batch_of = {image: number for number, batch in enumerate(plan["batches"]) for image in batch}
    records = read_rows(out_dir)
    for index, job in enumerate(images):
        record = records.get(job.node_name)
        if not record or record["submission"] != submission or \
                record["row"]["status"] != "pending":
            continue
        prepared = (Path(plan["work_dir"]) / "handoff" / f"{job.node_name}.json").exists()
        phase, task = ("predict", batch_of[index]) if prepared else ("preprocess", index)
        log = out_dir / "logs" / "slurm" / f"slurm-{ids[phase]}_{task}.out"
        row = {**record["row"], "status": "failed",
               "message": f"its {phase} task ended before finishing (cancelled, out of time or "
                          f"memory, or its node failed); log: {log}"}
        save_row(out_dir, job.node_name, row, None, record["model"], record["digest"],
                 submission)
    rows = summarize(out_dir)
    failed = sum(row["status"] != "ok" for row in rows)
    LOGGER.info("%d image(s) done, %d failed or skipped; summary: %s", len(rows) - failed,
                failed, out_dir / "cmb_summary.tsv")
    return 0


def status(out_dir) -> int:
    """Print how many images are done, failed, running... and why the failed ones failed."""
    out_dir = Path(out_dir).resolve()
    records = read_rows(out_dir)
    if not records:
        raise ConfigError(f"{out_dir}: no image recorded (OUT/logs/rows is empty); is this a "
                          "cmb-workflow OUT?")
    try:
        queued = queue()
    except (OSError, RuntimeError) as exc:  # no SLURM client here (e.g. in the container)
        LOGGER.warning("squeue: %s; pending images are not told apart", exc)
        queued = None
    live = {job["comment"] for job in queued or ()}
    running = _running_images(out_dir, queued or (), live)
    states = Counter()
    for key, record in records.items():
        state = {"ok": "done"}.get(record["row"]["status"], record["row"]["status"])
        if state == "pending":
            state = ("running" if key in running else "pending"
                     if queued is None or record["submission"] in live else "unfinished")
        states[state] += 1
    print(f"{out_dir}: {len(records)} image(s)")
    for state in STATES:
        print(f"  {state:<11}{states[state]:>6}")
    for record in records.values():
        if record["row"]["status"] in ("failed", "skipped"):
            print(f"{record['row']['status']} {record['row']['source']}: "
                  f"{record['row']['message']}")
    if states["unfinished"]:
        print("unfinished: their jobs are gone without a result; run the same command again")
    for submission in sorted(live & {record["submission"] for record in records.values()}):
        jobs = sorted({job["array_job"] for job in queued if job["comment"] == submission})
        print(f"queued or running: job(s) {' '.join(jobs)} (submission {submission})")
    return 0


def _running_images(out_dir: Path, queued, live: set) -> set[str]:
    """Node names of the images whose array task is running now."""
    running = set()
    for plan_dir in (out_dir / "logs" / "array").glob("*"):
        if plan_dir.name not in live or not (plan_dir / "jobs.json").exists():
            continue
        plan = json.loads((plan_dir / "plan.json").read_text())
        ids = json.loads((plan_dir / "jobs.json").read_text())
        names = [job.node_name for job in _plan_images(plan)]
        for job in queued:
            if job["state"] != "RUNNING" or not job["array_task"].isdigit():
                continue
            task = int(job["array_task"])
            if job["array_job"] == ids["preprocess"]:
                running.add(names[task])
            elif job["array_job"] == ids["predict"]:
                running.update(names[image] for image in plan["batches"][task])
    return running
