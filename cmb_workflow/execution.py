"""How a run executes its graphs: the Nipype plugin and its arguments (the MultiProc plugin
itself: multiproc.py), progress lines, the run log, the lock on OUT and the work folder, and a
clean stop on SIGTERM / SIGINT. Imports no Nipype at its top, so that the command reaches
Execution.start_workers before that second of imports."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from concurrent import futures
from pathlib import Path

from .configs import ConfigError, Settings
from .slurm import SLURM_PLUGINS, SbatchArgs, cancel_jobs, prepare as prepare_slurm, wait_for_jobs

LOGGER = logging.getLogger("cmb_workflow")
# A step running longer than this is named, with its time, every so often.
STILL_RUNNING_SECONDS = 30
# How often MultiProc looks for finished steps (Nipype's default, 2 s, kept a chain of short
# steps waiting up to that long at every link: 40 % of a 4-image run's wall time).
MULTIPROC_POLL_SECONDS = 0.1
# Modules the MultiProc forkserver imports once, so that its workers (a new set for each graph
# of a run) start with them: worker_logging first (see there). Not TensorFlow (fork after it
# deadlocks). ANTsPy's import starts no thread and leaves ITK's thread count unread (ITK reads
# it at the first registration, inside registration._ants): 0.3-0.9 s less in each worker.
WORKER_PRELOAD = ["cmb_workflow.worker_logging", "cmb_workflow.workflow.base", "nilearn.datasets",
                  "ants"]
# Seconds the workers get to end after SIGTERM before they are killed.
WORKER_GRACE_SECONDS = 10
# Seconds a shared RunLock waits for another shared holder to finish writing its name.
SHARED_LOCK_WAIT_SECONDS = 5
# The run log the running forkserver's workers write to (start_workers).
_FORKSERVER_RUN_LOG: str | None = None


class Execution:
    """The Nipype plugin of a run, its arguments, and the progress lines."""

    def __init__(self, config: Settings, job_log_dir: Path, labels: dict):
        self.plugin = config.plugin
        self.sbatch = None
        self.job_log_dir = job_log_dir
        # Shared with the progress lines: the run adds the prediction batches' labels later.
        self.labels = labels
        self.args: dict = {}
        if self.plugin == "MultiProc":
            # forkserver: workers must not inherit a parent that has TensorFlow loaded (fork
            # deadlocks).
            self.args = {"n_procs": config.nprocs or os.cpu_count() or 1,
                         "mp_context": "forkserver"}
            multiprocessing.get_context("forkserver").set_forkserver_preload(WORKER_PRELOAD)
            if config.memory_gb:
                self.args["memory_gb"] = config.memory_gb
        elif self.plugin in SLURM_PLUGINS:
            self.sbatch = SbatchArgs(config.slurm, job_log_dir)
            prepare_slurm(self.sbatch)
            self.args = {"sbatch_args": self.sbatch.common}
            if self.plugin == "SLURMGraph":
                # Otherwise every finished step of a resumed run is a job of its own.
                self.args["dont_resubmit_completed_jobs"] = True
        if self.plugin != "SLURMGraph":  # Nipype's graph plugins take no status callback
            self.args["status_callback"] = Progress(labels)
        # MultiProc's plugin for the prediction graph and the job loading the models in its
        # worker, when prepare_prediction started them.
        self._prediction_plugin = None
        self._preloading = None

    def start_workers(self) -> None:
        """Start MultiProc's forkserver now, once the run log is named (name_run_log: the
        workers write there) and before Nipype is imported here: it imports WORKER_PRELOAD,
        seconds, on a core of its own while this process imports and builds the graphs, instead
        of when the first step is sent out."""
        if self.plugin != "MultiProc":
            return
        from multiprocessing import forkserver

        global _FORKSERVER_RUN_LOG
        run_log = os.environ.get("CMB_WORKFLOW_RUN_LOG")
        if _FORKSERVER_RUN_LOG != run_log:
            # A forkserver left by an earlier run in this process (a script or notebook calling
            # cli.main twice) would fork this run's workers writing to that run's log. _stop is
            # the standard library's own way to end it (Python 3.8 and later).
            forkserver._forkserver._stop()
        forkserver.ensure_running()
        _FORKSERVER_RUN_LOG = run_log

    def prepare_prediction(self, models: str, allow_unverified: bool) -> None:
        """MultiProc: start the prediction graph's first worker now, importing TensorFlow and
        loading the models (seconds, on one core) while the images are preprocessed. Started
        when the graph runs, the one prediction job of a small study spent those seconds on one
        core while the other had nothing to do. Call release_prediction when the run ends."""
        if self.plugin != "MultiProc":
            return
        from .models import preload_ensemble
        from .multiproc import WorkerLossTolerantMultiProcPlugin

        self._prediction_plugin = WorkerLossTolerantMultiProcPlugin(plugin_args=self.args)
        # The pool's first job starts its first worker. A job sent once it has ended goes to
        # that idle worker; sent earlier, it would start a new worker, which loads all again.
        self._preloading = self._prediction_plugin.pool.submit(preload_ensemble, models,
                                                               allow_unverified)

    def release_prediction(self) -> None:
        """Let the worker prepare_prediction started end if the prediction graph did not run;
        not waiting for it, so that a stop (SIGTERM, SIGINT) goes on to stop_children at once."""
        if self._prediction_plugin is not None:
            self._prediction_plugin.pool.shutdown(wait=False)
            self._prediction_plugin = None

    @property
    def predict_plugin_args(self) -> dict | None:
        """Per-node arguments of the prediction jobs (GPU, memory), replacing the common ones."""
        if self.sbatch is None:
            return None
        return {"sbatch_args": self.sbatch.predict, "overwrite": True}

    def run(self, workflow, phase: tuple | None = None, *, prediction: bool = False) -> None:
        """phase: its name, the last step of each image and the images' node names, for the
        progress lines; prediction: the prediction graph, whose worker may be started
        (prepare_prediction)."""
        progress = self.args.get("status_callback")
        if phase and progress:
            progress.start_phase(*phase)
        if self.sbatch is not None:
            self.job_log_dir.mkdir(parents=True, exist_ok=True)
        if self.plugin == "MultiProc":
            workflow.config["execution"]["poll_sleep_duration"] = MULTIPROC_POLL_SECONDS
        plugin = self.plugin
        if self.plugin == "MultiProc":
            from .multiproc import WorkerLossTolerantMultiProcPlugin

            if prediction and self._prediction_plugin is not None:
                plugin, self._prediction_plugin = self._prediction_plugin, None
                # Its outcome does not matter: the prediction job loads what is missing.
                futures.wait([self._preloading])
            else:
                plugin = WorkerLossTolerantMultiProcPlugin(plugin_args=self.args)
        try:
            with progress.watching() if progress else contextlib.nullcontext():
                workflow.run(plugin=plugin, plugin_args=self.args)
        except RuntimeError as exc:
            # Nipype raises after running everything it could when some nodes failed; the
            # progress lines and the summary name them, the run log keeps Nipype's account.
            logging.getLogger("cmb_workflow.crash").info("Nipype: %s", exc)
        except Interrupted:
            if self.sbatch is not None:
                cancel_jobs(self.sbatch.comment)
            raise
        if self.plugin == "SLURMGraph":
            wait_for_jobs(self.sbatch.comment)


class Progress:
    """Nipype's status callback: one line per image (or batch) and step as it ends; as each
    image ends its phase, how many are done, the time so far and an estimate of the rest; and,
    while steps run long (registration, prediction), which ones and for how long."""

    def __init__(self, labels: dict):
        self.labels = labels
        self.failed: set[str] = set()
        self.phase = None
        self.running: dict[str, tuple[str, float]] = {}  # node -> (its line's label, start)
        self.lock = threading.Lock()

    def start_phase(self, name: str, last_step: str, images) -> None:
        """A graph begins whose `images` (node names) each end with `last_step` or their first
        failure."""
        self.phase = {"name": name, "last_step": last_step, "images": set(images),
                      "ended": set(), "started": time.monotonic()}

    def __call__(self, node, status: str) -> None:
        unit = unit_name(node.fullname)
        label = self.labels.get(unit, unit)
        with self.lock:
            if status == "start":
                self.running[node.fullname] = (f"{label} {node.name}", time.monotonic())
                return
            self.running.pop(node.fullname, None)
        if status == "exception":
            self.failed.add(node.fullname)
            LOGGER.error("%s: %s failed", label, node.name)
        elif node.fullname not in self.failed:  # MultiProc also ends what failed
            LOGGER.info("%s: %s done", label, node.name)
        else:
            return
        phase = self.phase
        if phase and unit in phase["images"] - phase["ended"] and \
                (status == "exception" or node.name == phase["last_step"]):
            phase["ended"].add(unit)
            done, total = len(phase["ended"]), len(phase["images"])
            elapsed = time.monotonic() - phase["started"]
            left = f", about {_minutes(elapsed / done * (total - done))} left" \
                if done < total else ""
            LOGGER.info("%s: %d of %d images done, %s elapsed%s", phase["name"], done, total,
                        _minutes(elapsed), left)


    def report_running(self) -> None:
        """One line naming the steps that have been running for a while, and for how long."""
        now = time.monotonic()
        with self.lock:
            long = [f"{what} {_minutes(now - since)}" for what, since in self.running.values()
                    if now - since >= STILL_RUNNING_SECONDS]
        if long:
            LOGGER.info("still running: %s", ", ".join(long))

    @contextlib.contextmanager
    def watching(self):
        """While the block runs, a line every STILL_RUNNING_SECONDS about the long steps."""
        stop = threading.Event()

        def watch():
            while not stop.wait(STILL_RUNNING_SECONDS):
                self.report_running()
        watcher = threading.Thread(target=watch, name="cmb-workflow-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def unit_name(fullname: str) -> str:
    """'preprocess.sub_01.conform' -> 'sub_01'; 'predict.batch_0000.predict' -> 'batch_0000'."""
    return fullname.split(".")[1]


def name_run_log(log_dir: Path, name: str = "cmb-workflow") -> Path:
    """A new, empty run log, `name`_<time>.log in log_dir, named in CMB_WORKFLOW_RUN_LOG for the
    MultiProc workers (worker_logging: their forkserver, once started, reads it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # A second run started within the same second gets a log of its own.
    for repeat in itertools.count(1):
        log_file = log_dir / (f"{name}_{stamp}.log" if repeat == 1
                              else f"{name}_{stamp}-{repeat}.log")
        with contextlib.suppress(FileExistsError):
            log_file.touch(exist_ok=False)
            break
    os.environ["CMB_WORKFLOW_RUN_LOG"] = str(log_file)
    return log_file


def configure_nipype(crash_dir: Path, log_file: Path) -> None:
    """Nipype's execution settings, and the run log (name_run_log) that gets Nipype's lines."""
    from nipype import config as nipype_config, logging as nipype_logging

    nipype_config.update_config({
        "execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                      # A step is redone when an input's path, size or time changes: content
                      # hashes read every input twice per step (the scheduler and the worker
                      # each hash it), about a tenth of a 4-image run's time.
                      "hash_method": "timestamp", "stop_on_first_crash": False,
                      "remove_unnecessary_outputs": False},
        "monitoring": {"enabled": False},
    })
    nipype_logging.update_logging(nipype_config)
    # Nipype prints each node's start and end on stdout; the run log keeps them, the terminal
    # shows cmb_workflow's progress lines instead (the CLI's handler leaves Nipype out too).
    for nipype_handler in logging.getLogger("nipype").handlers:
        if type(nipype_handler) is logging.StreamHandler:
            nipype_handler.setLevel(logging.CRITICAL)
    # A plain handler: Nipype's own log file uses a lock that forked MultiProc workers break.
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in ("cmb_workflow", "cmb_workflow.crash", "nipype.workflow"):
        logger = logging.getLogger(name)
        # One run log at a time, also when several runs share a process (demo, tests).
        for old in [h for h in logger.handlers if getattr(h, "cmb_run_log", False)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
    handler.cmb_run_log = True
    # The run log gets the progress lines whatever the embedding program's root level is.
    LOGGER.setLevel(logging.INFO)


class RunLockedError(ConfigError):
    """Another run holds OUT or the work folder."""


class RunLock:
    """A lock on a folder for the whole run, held through an open file: exclusive, or shared
    among the tasks of slurm-array jobs (each works on images of its own), which still keeps
    an ordinary run out.

    The kernel drops a POSIX lock when its process ends, however it ends, so a killed run
    leaves nothing that blocks the next one; the file only says who held it last.
    """

    NAME = ".cmb-workflow.lock"

    def __init__(self, folder: Path, lock_dir: Path | None = None, *, shared: bool = False):
        """folder: what the lock guards; lock_dir: where its file lies (default: folder)."""
        self.folder = folder
        self.path = (lock_dir or folder) / self.NAME
        self.shared = shared
        self.handle = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            # A shared holder holds it exclusively for the moment it writes its name.
            if self.shared and _lock_within(handle, fcntl.LOCK_SH, SHARED_LOCK_WAIT_SECONDS):
                # Other array tasks hold it; the file names the first of them.
                self.handle = handle
                return self
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(f"{self.folder}: in use by {holder}; wait for that run "
                                 "to end or stop it (a killed run's lock is released at once)")
        handle.seek(0)
        handle.truncate()
        handle.write(("SLURM array tasks (cmb-workflow status), the first " if self.shared
                      else "") + f"process {os.getpid()} on {socket.gethostname()} "
                     f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        if self.shared:
            fcntl.lockf(handle, fcntl.LOCK_SH)  # now that the file says who holds it
        self.handle = handle
        return self

    def __exit__(self, *exc_info):
        # Closing releases the lock; the file stays so that a reader never races its removal.
        self.handle.close()


def _lock_within(handle, operation: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.lockf(handle, operation | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; a BaseException so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_on_signals():
    """Turn SIGTERM and SIGINT into Interrupted in the main thread; returns a function that
    restores the previous handlers."""
    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(signum, old) for signum, old in previous.items()]


def stop_children(grace_seconds: float = WORKER_GRACE_SECONDS) -> list[int]:
    """Terminate every process this one started (MultiProc workers, their forkserver, the
    resource tracker), wait for them, kill what is left; returns the pids that were stopped."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(children, timeout=grace_seconds)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_seconds)
    return [child.pid for child in children]
