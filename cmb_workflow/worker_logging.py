"""Preloaded by the MultiProc forkserver, so that every worker forked from it writes to the run
log (named by CMB_WORKFLOW_RUN_LOG when the forkserver started) and not to the terminal:
Nipype's lines (Nipype adds its stdout handler only to a logger that has none) and whatever
libraries print on the process's own stdout and stderr (TensorFlow's CUDA probing)."""

import logging
import os

_RUN_LOG = os.environ.get("CMB_WORKFLOW_RUN_LOG")
if _RUN_LOG:
    _log_fd = os.open(_RUN_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(_log_fd, 1)
    os.dup2(_log_fd, 2)
    _handler = logging.FileHandler(_RUN_LOG)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
else:
    _handler = logging.NullHandler()
logging.getLogger("nipype").addHandler(_handler)
