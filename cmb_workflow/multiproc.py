"""Nipype's MultiProc plugin, made to survive the loss of a worker process. Its own module, so
that the command can start MultiProc's forkserver before importing Nipype (execution.py)."""

import gc
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer, run_node

LOGGER = logging.getLogger("cmb_workflow")
# A step whose worker process died is started this many times in all before it fails: a dead
# worker breaks the whole pool, so the steps running beside it die too through no fault of theirs.
WORKER_LOSS_TRIES = 2


class WorkerLossTolerantMultiProcPlugin(MultiProcPlugin):
    """Nipype's MultiProc, except that a step whose worker process died (killed by the system,
    out of memory, a crash in a library) ends instead of being waited for forever: Nipype's
    callback raises on the broken pool, so the step would never finish and the run would hang.
    The pool is replaced and every step it lost starts again, up to WORKER_LOSS_TRIES times in
    all, then fails with the reason."""

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._started: dict[int, tuple] = {}  # taskid -> (node, updatehash, tries)
        self._lost: set[int] = set()
        self._lost_lock = threading.Lock()

    def run(self, graph, config, updatehash=False):
        # Nipype runs a full gc.collect() at every poll while a core is free: over the graph's
        # many objects that kept a third of a core busy beside the prediction job. The objects
        # alive now live as long as the run: keep them out of the collector's scans.
        gc.collect()
        gc.freeze()
        try:
            return super().run(graph, config, updatehash=updatehash)
        finally:
            gc.unfreeze()

    def _submit_job(self, node, updatehash=False):
        self._taskid += 1
        # As Nipype's: no streamed output from a worker.
        if getattr(node.interface, "terminal_output", "") == "stream":
            node.interface.terminal_output = "allatonce"
        self._start(self._taskid, node, updatehash, 1)
        return self._taskid

    def _start(self, taskid, node, updatehash, tries):
        self._started[taskid] = (node, updatehash, tries)
        try:
            future = self.pool.submit(run_node, node, updatehash, taskid)
        except BrokenProcessPool:
            self._replace_pool()
            future = self.pool.submit(run_node, node, updatehash, taskid)
        self._task_obj[taskid] = future
        future.add_done_callback(lambda done: self._ended(taskid, done))

    def _ended(self, taskid, future):
        try:
            self._taskresult[taskid] = future.result()
        except BrokenProcessPool:
            with self._lost_lock:
                self._lost.add(taskid)

    def _replace_pool(self):
        self.pool.shutdown(wait=False)
        self.pool = ProcessPoolExecutor(
            max_workers=self.processors, initializer=process_initializer, initargs=(self._cwd,),
            mp_context=multiprocessing.get_context(self.plugin_args.get("mp_context")))

    def _get_result(self, taskid):
        with self._lost_lock:
            lost = taskid in self._lost
            self._lost.discard(taskid)
        if not lost:
            return super()._get_result(taskid)
        node, updatehash, tries = self._started[taskid]
        if tries < WORKER_LOSS_TRIES:
            LOGGER.warning("%s: its worker process ended abruptly; starting it again",
                           node.fullname)
            self._start(taskid, node, updatehash, tries + 1)
            return None
        # An exception's line, which the summary gives as the reason.
        return {"result": None, "traceback": [
            f"WorkerProcessError: {node.name}'s worker process ended abruptly {tries} times "
            "(killed by the system, out of memory, a crash; or a script that runs cmb-workflow "
            "when imported: guard its call with `if __name__ == \"__main__\":`)\n"]}

    def _clear_task(self, taskid):
        super()._clear_task(taskid)
        self._started.pop(taskid, None)
