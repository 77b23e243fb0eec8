"""Launch a multi-rank run with torchrun the way the tests and the stress bench do, keeping every
rank's full log so that a rare failure can be diagnosed from one occurrence.

Each rank's stdout and stderr go to their own files (torchrun ``--log-dir`` + ``--redirects``);
``PYTHONFAULTHANDLER=1`` makes a rank that aborts (SIGABRT, SIGSEGV) print the Python stack of
every thread first. On failure the summary names the failing rank, its exit code and last lines,
the rendezvous port, and the norallm/torchrun processes of earlier tests that were still alive.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
_OURS = ("torch.distributed.run", "training.cli", "train_and_dump.py", "torchrun")


@dataclass
class Launch:
    """What one torchrun launch left: exit codes, the agent's output and each rank's log."""

    cmd: list[str]
    returncode: int
    agent_stdout: str
    agent_stderr: str
    rank_logs: dict[int, tuple[str, str]] = field(default_factory=dict)  # local rank → (stdout, stderr)
    rank_returncodes: dict[int, int] = field(default_factory=dict)
    leftovers_before: list[str] = field(default_factory=list)
    ok: bool = True
    log_dir: Path | None = None

    @property
    def stdout(self) -> str:
        """The agent's stdout followed by every rank's, in rank order."""
        return self.agent_stdout + "".join(out for out, _ in (self.rank_logs[r] for r in sorted(self.rank_logs)))

    @property
    def stderr(self) -> str:
        return self.agent_stderr + "".join(err for _, err in (self.rank_logs[r] for r in sorted(self.rank_logs)))

    def port(self) -> str | None:
        m = re.search(r"master_port=(\d+)", self.agent_stdout + self.agent_stderr)
        return m.group(1) if m else None

    def summary(self, lines: int = 40) -> str:
        failing = [r for r, c in sorted(self.rank_returncodes.items()) if c != 0] or sorted(self.rank_logs)
        parts = [f"$ {' '.join(self.cmd)}", f"rank logs: {self.log_dir}", f"torchrun exit {self.returncode}; rank exit codes "
                 f"{self.rank_returncodes or 'unknown'}; rendezvous port {self.port() or 'unknown'}"]
        if self.leftovers_before:
            parts.append("processes of earlier launches still alive at start:\n  " + "\n  ".join(self.leftovers_before))
        alive = _leftovers(exclude=set())
        if alive:
            parts.append("norallm/torchrun processes alive after the failure:\n  " + "\n  ".join(alive))
        for r in failing[:2]:
            out, err = self.rank_logs.get(r, ("", ""))
            tail = (out + err).splitlines()[-lines:]
            parts.append(f"--- rank {r}: last {len(tail)} lines of stdout+stderr ---\n" + "\n".join(tail))
        parts.append("--- torchrun ---\n" + "\n".join((self.agent_stdout + self.agent_stderr).splitlines()[-lines:]))
        return "\n".join(parts)


def signalled_ok(launch: Launch) -> bool:
    """A signalled launch saved and asked for a requeue. torchrun reports the first rank's exit
    code 42 as its own failure and SIGTERMs the ranks still tearing down (-15); anything else (an
    abort, a crash, a rank that never got to 42) is a failure."""
    codes = set(launch.rank_returncodes.values())
    return "exiting with 42" in launch.stdout and 42 in codes and codes <= {42, -15}


def _leftovers(exclude: set[int]) -> list[str]:
    """norallm/torchrun processes on this machine (not ours), with the test that started them."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] in exclude or p.info["pid"] == me or not any(s in cmd for s in _OURS):
                continue
            test = p.environ().get("PYTEST_CURRENT_TEST", "?")
            found.append(f"pid {p.info['pid']} ({test}): {cmd[:160]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _rank_codes(text: str) -> dict[int, int]:
    """Exit codes per global rank from torchrun's failure report (``rank : 1 … exitcode : -6``)."""
    codes = {}
    for m in re.finditer(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", text):
        codes[int(m.group(1))] = int(m.group(2))
    return codes


def launch_torchrun(*args: str, nproc: int = 2, env: dict | None = None, timeout: float = 600,
                    log_root: Path | None = None, during=None, expect_returncode: int | None = 0) -> Launch:
    """Run ``torchrun --standalone --nproc_per_node=nproc ARGS`` with per-rank logs.

    ``during(proc, ranks)`` runs while the launch is alive (``ranks()`` lists the rank processes),
    e.g. to signal them. ``ok`` is set from ``expect_returncode`` (None: the caller decides).
    """
    keep = log_root is not None  # else a temporary dir, removed unless the launch fails
    if keep:
        Path(log_root).mkdir(parents=True, exist_ok=True)
    log_root = Path(tempfile.mkdtemp(prefix="torchrun-logs-", dir=log_root))  # one dir per launch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--log-dir={log_root}", "--redirects=3", *args]
    full_env = {**(env or os.environ), "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
    before = _leftovers(exclude=set())
    # a session of its own: a Ctrl-C test signals the whole group (os.killpg(proc.pid, SIGINT)), as a
    # terminal would, and nothing reaches pytest's own process group
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if during is not None:
        def ranks() -> list[psutil.Process]:
            try:
                return [c for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                return []
        during(proc, ranks)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # torchrun's workers have sessions of their own: kill them too
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        out, err = proc.communicate()
    logs: dict[int, tuple[str, str]] = {}
    for rank_dir in sorted(log_root.glob("*/attempt_*/*")):
        if rank_dir.is_dir() and rank_dir.name.isdigit():
            logs[int(rank_dir.name)] = (_read(rank_dir / "stdout.log"), _read(rank_dir / "stderr.log"))
    launch = Launch(cmd, proc.returncode, out, err, logs, _rank_codes(out + err), before)
    if expect_returncode is not None:
        launch.ok = proc.returncode == expect_returncode
    if keep or not launch.ok:
        launch.log_dir = log_root
    else:
        shutil.rmtree(log_root, ignore_errors=True)
    return launch
