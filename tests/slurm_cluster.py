"""A real one-node SLURM cluster on localhost (Debian's slurm-wlm and munge) for the tests.

Everything it writes (munge key and socket, slurm.conf, state, logs) lies in one folder under
/tmp; it uses free ports, so it neither touches nor collides with a cluster already on the
machine, and it stops exactly the daemons it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol")


def missing_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    # The daemons live in /usr/sbin, which is not on every user's PATH.
    missing = [name for name in DAEMONS + CLIENTS if not _which(name)]
    if missing:
        return (f"SLURM/munge not installed ({', '.join(missing)} not found; "
                "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OneNodeCluster:
    def __init__(self, cpus: int | None = None):
        """cpus: the node's CPUs (default: the machine's); more than the machine has lets
        more jobs run at once than it has cores."""
        # munged wants every folder above its socket searchable by all: not pytest's tmp_path.
        self.root = Path(tempfile.mkdtemp(prefix="cmb-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.ctld_log = self.root / "slurmctld.log"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files = []
        self.cpus = cpus or os.cpu_count() or 1

    def start(self) -> None:
        root = self.root
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = root / "munge.sock"
        self._daemon([_which("munged"), f"--key-file={key}", f"--socket={socket_path}",
                      f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                      f"--seed-file={root / 'munged.seed'}"], root / "munged.pid")
        host = socket.gethostname().split(".")[0]
        memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        (root / "state").mkdir()
        (root / "spool").mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=cmbtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            # Impossible requests fail at submission instead of queueing for ever.
            "EnforcePartLimits=ALL",
            "DefMemPerCPU=500",
            "SchedulerParameters=batch_sched_delay=0",
            # The tests read finished jobs' fields; a slow machine takes longer than the
            # default 5 minutes to get there.
            "MinJobAge=86400",
            # slurmd takes the CPUs from here, not from the hardware (cpus above).
            "SlurmdParameters=config_overrides",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory_mb} "
            "State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        self._daemon([_which("slurmctld")], root / "slurmctld.pid")
        self._daemon([_which("slurmd")], root / "slurmd.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=self.env,
                                   capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"the test cluster did not come up (node state {state!r}); "
                           f"see {self.ctld_log}")

    def _daemon(self, argv, pid_file: Path) -> None:
        """Start a daemon that forks into the background and writes `pid_file`."""
        subprocess.run(argv, env=self.env, check=True, capture_output=True, timeout=30)
        self._pid_files.append(pid_file)
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} wrote no pid file {pid_file}")
            time.sleep(0.1)

    def completed_job_ids(self) -> set[int]:
        """Jobs that slurmctld saw finish, from its log (there is no accounting storage)."""
        text = self.ctld_log.read_text()
        return {int(job) for job in re.findall(r"_job_complete: JobId=(\d+) done", text)}

    def jobs(self) -> dict[int, dict]:
        """JobId -> scontrol's fields, for the jobs slurmctld still holds (MinJobAge: a day)."""
        listing = subprocess.run(["scontrol", "show", "job", "--oneliner"], env=self.env,
                                 capture_output=True, text=True, check=True).stdout
        jobs = {}
        for line in listing.splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if "JobId" in fields:
                jobs[int(fields["JobId"])] = fields
        return jobs

    def stop(self) -> None:
        # Jobs first, so no slurmstepd outlives its slurmd.
        subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=self.env,
                       capture_output=True)
        for pid_file in reversed(self._pid_files):
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        # A daemon whose pid file was never written or read (a start that timed out on a busy
        # machine) still carries this cluster's SLURM_CONF in its environment.
        for pid in self._daemons_by_environment():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def _daemons_by_environment(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for process in Path("/proc").iterdir():
            try:
                if process.name.isdigit() and Path(process / "comm").read_text().strip() \
                        in DAEMONS and marker in (process / "environ").read_bytes().split(b"\0"):
                    found.append(int(process.name))
            except OSError:  # gone, or not ours to read
                continue
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon that exited but is not reaped yet (our child before it forked) is gone too.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
