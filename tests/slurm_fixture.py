"""A private single-machine Slurm (Debian's slurm-wlm 22.05 + munge) for tests, run as root.

Every file lives under one temporary state directory; munged, slurmctld and slurmd run in the
foreground of their own processes, and ``stop()`` ends exactly those PIDs. Clients find this
cluster through ``SLURM_CONF`` (``env()``), and sbatch passes that on to the jobs.

Usable without pytest too (``python tests/slurm_fixture.py DIR`` starts one and waits), which
helps when debugging a job by hand.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
MUNGE_KEY = Path("/etc/munge/munge.key")

SLURM_CONF = """\
# Written by tests/slurm_fixture.py: a one-node cluster whose state lives under {state}
ClusterName=norallm-test
SlurmctldHost={host}({ctld_addr})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state}/munge/munge.socket.2
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={state}/state
SlurmdSpoolDir={state}/spool/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout={slurmd_timeout_s}
InactiveLimit=0
KillWait=10
MinJobAge=600
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


def missing_programs() -> list[str]:
    """Programs this fixture needs that are not installed (empty: Slurm can be started)."""
    missing = [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    if not MUNGE_KEY.is_file():
        missing.append(str(MUNGE_KEY))
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 3 // 4  # leave room for the OS
    return 4000


def _which(program: str) -> str:
    return shutil.which(program) or str(Path("/usr/sbin") / program)


class LocalSlurm:
    """Start with ``start()``, stop with ``stop()`` (idempotent; kills only the PIDs it started).

    One node, called ``localhost`` so that MASTER_ADDR (its name) resolves without DNS; its slurmd
    runs beside slurmctld. tests/netns_slurm.py derives a cluster of several nodes from it."""

    slurmd_timeout_s = 300
    ctld_addr = "127.0.0.1"

    def __init__(self, state_dir: str | Path):
        self.state = Path(state_dir).resolve()
        self.host = socket.gethostname().split(".")[0]  # slurmctld must run on the host it is told
        self.nodes = ["localhost"]  # Slurm node names (NodeAddr 127.0.0.1)
        self.conf = self.state / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def node(self) -> str:
        """The first node's Slurm name (the one node of a one-node cluster)."""
        return self.nodes[0]

    def node_lines(self) -> str:
        return (f"NodeName=localhost NodeHostname={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} "
                f"RealMemory={_memory_mb()} State=UNKNOWN")

    def start_nodes(self) -> None:
        """Start every node's slurmd (here the one, beside slurmctld)."""
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])

    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (and, through sbatch, for the jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60) -> LocalSlurm:
        if os.geteuid() != 0:
            raise RuntimeError("the private Slurm runs as root (slurmd must start jobs as the submitting user)")
        for d in ("munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.state / d).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.state / "munge", "munge", "munge")
        os.chmod(self.state / "munge", 0o755)  # munged refuses a socket dir others cannot traverse
        os.chmod(self.state, 0o755)
        self.conf.write_text(SLURM_CONF.format(
            state=self.state, host=self.host, ctld_addr=self.ctld_addr, ctld_port=_free_port(),
            slurmd_port=_free_port(), slurmd_timeout_s=self.slurmd_timeout_s, node_lines=self.node_lines(),
            node_names=",".join(self.nodes),
        ))
        m = self.state / "munge"
        self._spawn("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", _which("munged"),
                               "-F", f"--socket={m}/munge.socket.2", f"--key-file={MUNGE_KEY}",
                               f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid",
                               f"--seed-file={m}/munged.seed"])
        self._wait_for(lambda: (m / "munge.socket.2").exists(), timeout_s, "munged did not create its socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self.start_nodes()
        self._wait_for(self._idle, timeout_s, "the nodes did not become idle")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.state / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 - owned by the process
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)
        log.close()

    def _idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {self.state / 'log'}:\n{self.logs()}")
        return self.idle()

    def node_states(self) -> dict[str, str]:
        """Slurm's state of each node, e.g. {'node1': 'idle', 'node2': 'down*'}."""
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%T"], capture_output=True, text=True, env=self.env())
        return dict(line.split("|", 1) for line in out.stdout.split()) if out.returncode == 0 else {}

    def idle(self) -> bool:
        """Whether every node is idle."""
        states = self.node_states()
        return sorted(states) == sorted(self.nodes) and set(states.values()) == {"idle"}

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"private Slurm: {what} within {timeout_s:.0f} s; logs:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail_chars: int = 4000) -> str:
        out = []
        for f in sorted((self.state / "log").glob("*")) + sorted((self.state / "munge").glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail_chars:]}")
        return "\n".join(out)

    def cancel_all(self, timeout_s: float = 60) -> None:
        """Cancel every job and wait until none runs (their slurmstepd processes then exit too)."""
        if "slurmctld" not in self.procs:
            return
        ids = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout_s
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs, then stop the daemons this object started (slurmd first)."""
        try:
            self.cancel_all()
        except (OSError, subprocess.SubprocessError):
            pass  # stopping must not fail: the daemons below are killed either way
        self.stop_daemons()

    def stop_daemons(self) -> None:
        """Stop the daemons this object started (slurmd first)."""
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)

    def run(self, *cmd: str, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env(), timeout=timeout_s)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def job_state(self, job_id: str) -> tuple[str, str]:
        """(state, reason) of a job, e.g. ('PENDING', 'BeginTime') or ('COMPLETED', 'None')."""
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T|%r", check=False).stdout.strip()
        if out:
            state, reason = out.splitlines()[0].split("|", 1)
            return state, reason
        info = self.run("scontrol", "show", "job", job_id, "-o", check=False).stdout
        fields = dict(kv.split("=", 1) for kv in info.split() if "=" in kv)
        return fields.get("JobState", "UNKNOWN"), fields.get("Reason", "")

    def job_fields(self, job_id: str) -> dict[str, str]:
        info = self.run("scontrol", "show", "job", job_id, "-o").stdout
        return dict(kv.split("=", 1) for kv in info.split() if "=" in kv)


def serve(cluster: LocalSlurm, note: str) -> None:
    """Start ``cluster``, print how to reach it, and keep it until Ctrl-C or TERM (then stop it)."""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the daemons on TERM as on Ctrl-C
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}  # {note}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    serve(LocalSlurm(sys.argv[1]), "one node, localhost")
