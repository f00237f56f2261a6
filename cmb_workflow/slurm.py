"""Running the graph through SLURM with Nipype's SLURM and SLURMGraph plugins, and the sbatch
and squeue calls of the slurm-array plugin (slurm_array.py).

sbatch arguments come from the config's `slurm` mapping. Every job of a run carries the same
`--comment`, which is how the run finds its own jobs in `squeue`.
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import subprocess
import time
import uuid
from pathlib import Path

from .configs import ConfigError

LOGGER = logging.getLogger("cmb_workflow.slurm")

SLURM_PLUGINS = ("SLURM", "SLURMGraph")
# Not a Nipype plugin: one job array per phase, submitted by slurm_array.py.
ARRAY_PLUGIN = "slurm-array"


class SbatchArgs:
    """The sbatch arguments of one run: `common` for every job, `predict` for prediction jobs."""

    def __init__(self, settings, job_log_dir: Path, job_log: str = "slurm-%j.out",
                 comment: str | None = None):
        """job_log: the log's name in job_log_dir (sbatch's patterns: %j job, %A_%a array
        task); comment: another SbatchArgs' comment, for more jobs of the same run."""
        # Underscores only: Nipype's plugins look for "-o"/"-e" in the arguments.
        self.comment = comment or f"cmb_workflow_{uuid.uuid4().hex[:12]}"
        job_log = shlex.quote(str(job_log_dir / job_log))

        def sbatch(partition, time_limit, memory, *more):
            values = {"partition": partition, "account": settings.account, "time": time_limit,
                      "mem": memory}
            # Quoted: both plugins hand these arguments to a shell.
            parts = [f"--{flag}={shlex.quote(str(value))}" for flag, value in values.items()
                     if value]
            parts += [f"--cpus-per-task={settings.cpus}", f"--comment={self.comment}",
                      f"--output={job_log}", f"--error={job_log}", *more,
                      str(settings.extra_sbatch_args or "")]
            return " ".join(parts).strip()

        self.common = sbatch(settings.partition, settings.time, settings.memory)
        self.predict = sbatch(settings.predict_partition or settings.partition,
                              settings.predict_time or settings.time,
                              settings.predict_memory,
                              *([str(settings.gpu_sbatch_args)] if settings.gpu else []))


def prepare(args: SbatchArgs, array_tasks: int = 0) -> None:
    """Check that sbatch accepts both kinds of job before anything is submitted (as arrays of
    `array_tasks` tasks, when given: a cluster's MaxArraySize may refuse them).

    Through the plugins a refused request shows up late and cryptically (an IndexError with
    SLURM, a silently missing job with SLURMGraph); `sbatch --test-only` names the problem.
    """
    # Nipype's SLURM plugin names jobs after $LOGNAME, which batch and CI shells may lack.
    if "LOGNAME" not in os.environ:
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except (KeyError, OSError):
            os.environ["LOGNAME"] = f"uid{os.getuid()}"
    for kind, sbatch_args in (("preprocessing", args.common), ("prediction", args.predict)):
        try:
            check = subprocess.run(["sbatch", "--test-only", "--wrap=true",
                                    *shlex.split(sbatch_args),
                                    *([f"--array=0-{array_tasks - 1}"] if array_tasks else [])],
                                   capture_output=True, text=True, timeout=60)
        except FileNotFoundError as exc:
            raise ConfigError("plugins SLURM, SLURMGraph and slurm-array: sbatch not found; "
                              "SLURM's client commands must be on PATH") from exc
        except subprocess.TimeoutExpired as exc:
            raise ConfigError("slurm: sbatch --test-only got no answer from the controller "
                              "in 60 s") from exc
        if check.returncode != 0:
            reason = (check.stderr.strip().splitlines() or ["no reason given"])[0]
            raise ConfigError(f"slurm: sbatch refuses the {kind} jobs ({sbatch_args}): {reason}"
                              + (" (set slurm.gpu: false on a cluster without GPUs)"
                                 if kind == "prediction" and "gres" in reason.lower() else ""))


def submit(sbatch_args: str, command: str, *, name: str, tasks: int = 0, throttle: int = 0,
           after: str = "") -> str:
    """Submit `command` with sbatch (as an array of `tasks` tasks, at most `throttle` running at
    once, when tasks > 0; starting after job `after` has ended, however it ended); returns
    the job id."""
    argv = ["sbatch", "--parsable", f"--job-name={name}", *shlex.split(sbatch_args)]
    if tasks:
        argv.append(f"--array=0-{tasks - 1}" + (f"%{throttle}" if throttle else ""))
    if after:
        argv.append(f"--dependency=afterany:{after}")
    try:
        result = subprocess.run([*argv, f"--wrap={command}"], capture_output=True, text=True,
                                timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise ConfigError("slurm: sbatch got no answer from the controller in 120 s") from exc
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no reason given"])[0]
        raise ConfigError(f"slurm: sbatch refused the {name} job: {reason}")
    # --parsable: "jobid" or "jobid;cluster".
    return result.stdout.strip().split(";")[0]


def wait_for_jobs(comment: str, poll_seconds: float = 2.0) -> None:
    """Wait until no job of this run is queued or running (SLURMGraph returns at submission).

    Jobs whose dependency failed never start unless the cluster sets kill_invalid_depend:
    they are cancelled here, so the run ends and reports those images as failed.
    """
    reported = None
    while True:
        jobs = _queued_jobs(comment)
        never = [job_id for job_id, reason in jobs if reason == "DependencyNeverSatisfied"]
        if never:
            LOGGER.info("SLURM: cancelling %d job(s) whose dependency failed: %s", len(never),
                        " ".join(never))
            subprocess.run(["scancel", *never], capture_output=True, text=True, check=False)
        waiting = [job_id for job_id, _reason in jobs if job_id not in never]
        if not waiting:
            return
        if reported is None:
            LOGGER.info("SLURM: waiting for jobs %s to %s", min(waiting, key=int),
                        max(waiting, key=int))
        if len(waiting) != reported:
            LOGGER.info("SLURM: %d job(s) of this run queued or running", len(waiting))
            reported = len(waiting)
        time.sleep(poll_seconds)


def cancel_jobs(comment: str) -> None:
    """Cancel this run's queued and running jobs (the run was stopped)."""
    job_ids = [job_id for job_id, _reason in _queued_jobs(comment)]
    if job_ids:
        LOGGER.info("SLURM: cancelling %d job(s) of this run", len(job_ids))
        subprocess.run(["scancel", *job_ids], capture_output=True, text=True, check=False)


def _queued_jobs(comment: str) -> list[tuple[str, str]]:
    """(job id, pending reason) of this run's jobs still in the queue."""
    return [(row["id"], row["reason"]) for row in queue() if row["comment"] == comment]


# squeue's format letters of the fields queue() reads.
QUEUE_FIELDS = {"id": "%i", "comment": "%k", "reason": "%r", "array_job": "%F",
                "array_task": "%K", "state": "%T"}


def queue() -> list[dict]:
    """The jobs in the queue, each as a dict of QUEUE_FIELDS (a pending array's tasks are one
    entry, its array_task a range such as "3-19%3")."""
    for attempt in range(5):
        listing = subprocess.run(["squeue", "--noheader",
                                  "--format=" + "|".join(QUEUE_FIELDS.values())],
                                 capture_output=True, text=True, check=False)
        if listing.returncode == 0:
            rows = [line.split("|") for line in listing.stdout.splitlines()]
            return [dict(zip(QUEUE_FIELDS, row)) for row in rows if len(row) == len(QUEUE_FIELDS)]
        # A busy controller times out now and then; give it a moment.
        LOGGER.warning("squeue failed (%s); retrying", listing.stderr.strip())
        time.sleep(2 ** attempt)
    raise RuntimeError(f"squeue keeps failing: {listing.stderr.strip()}")
