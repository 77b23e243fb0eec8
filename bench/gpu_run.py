"""How bench/gpu_check.py runs its checks unattended: one deadline for the whole card, every
child process bounded by what is left of it, each failure named for what it is, and the
results file rewritten (atomically) after every check, so a lease cut short still leaves
everything done until then.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from norallm.files import write_text_atomic  # noqa: E402


class CheckFailed(Exception):
    """A check's failure, already named (``timeout: …``, ``OOM: …``, ``deepspeed import failed: …``)."""


class Skip(Exception):
    """The check cannot run here, for the reason given (the disk is too small, the deadline is near)."""


class Deadline:
    """Seconds left of one budget shared by every check."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self._clock = clock
        self.end = clock() + seconds

    def left(self) -> float:
        return self.end - self._clock()


# Text a failed child printed → what the failure is. The first match names it.
_CAUSES = [
    (re.compile(r"OutOfMemoryError|CUDA out of memory|HIP out of memory|CUBLAS_STATUS_ALLOC_FAILED"), "OOM"),
    (re.compile(r"No space left on device|Disk quota exceeded|basic_ios::clear"), "disk full"),
    (re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'"), "missing module"),
    (re.compile(r"^error: .*", re.M), "norallm error"),
    (re.compile(r"NCCL error|ncclInternalError|ProcessGroupNCCL"), "NCCL failure"),
]


def name_failure(output: str, code: int | None) -> str:
    """One line saying what went wrong in a child's ``output`` (it exited with ``code``)."""
    for pattern, cause in _CAUSES:
        match = pattern.search(output)
        if match:
            if cause == "missing module":
                return f"missing module {match.group(1)}"
            start = output.rfind("\n", 0, match.start()) + 1
            end = output.find("\n", match.end())
            return f"{cause}: {output[start:end if end >= 0 else None].strip()[:300]}"
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    last = [x for x in output.strip().splitlines() if x.strip()][-1:] or ["(no output)"]
    return f"exit {code}: {last[0][:300]}"


def run(cmd: list[str], deadline: Deadline, env: dict | None = None, reserve_s: float = 5.0) -> str:
    """Run ``cmd`` from the repo root with what is left of the deadline (less ``reserve_s`` for
    writing results) as its timeout; its output, or CheckFailed naming the failure. A child that
    overruns is killed with its whole process group (torchrun's ranks too), so no rank keeps the
    GPU busy for the checks after it."""
    timeout = deadline.left() - reserve_s
    if timeout <= 1:
        raise Skip(f"deadline: {max(0.0, deadline.left()):.0f} s left, not enough to start {' '.join(cmd[:4])} …")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise CheckFailed(f"timeout: {' '.join(cmd[:6])} … still running after {timeout:.0f} s (the deadline); "
                          f"last output: {(output or '').strip()[-500:]}") from None
    if proc.returncode != 0:
        raise CheckFailed(f"{name_failure(output, proc.returncode)} [{' '.join(cmd[:6])} …]\n{output[-2500:]}")
    return output


class Results:
    """The card's results, ``OUT/gpu_check_<card>.json``, rewritten after every check."""

    def __init__(self, path: Path, deadline: Deadline, header: dict):
        self.path, self.deadline = path, deadline
        self.report = {**header, "checks": [], "finished": False}
        self.save()

    def save(self) -> None:
        checks = self.report["checks"]
        self.report["all_ok"] = bool(checks) and all(c["status"] == "ok" for c in checks)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.report, indent=2, ensure_ascii=False) + "\n")

    def run(self, name: str, fn, min_seconds: float = 0.0) -> dict | None:
        """Run check ``fn`` (returns its details; ``ok: False`` among them fails it) unless the
        deadline leaves less than ``min_seconds``; record it and save. Returns the details when ok."""
        t0 = time.perf_counter()
        try:
            if self.deadline.left() < min_seconds:
                raise Skip(f"deadline: {max(0.0, self.deadline.left()):.0f} s left, the check needs ~{min_seconds:.0f} s")
            detail = fn()
            status = "ok" if detail.pop("ok", True) else "failed"
        except Skip as e:
            detail, status = {"reason": str(e)}, "skipped"
        except CheckFailed as e:
            detail, status = {"error": str(e)[-3000:]}, "failed"
        except Exception as e:  # every check is recorded; one failing does not hide the others
            detail, status = {"error": describe(e)}, "failed"
        entry = {"name": name, "status": status, "ok": status == "ok",
                 "seconds": round(time.perf_counter() - t0, 1), **detail}
        self.report["checks"].append(entry)
        self.save()
        print(f"[gpu_check] {name}: {status.upper()} ({entry['seconds']} s, {max(0.0, self.deadline.left()):.0f} s "
              f"left) {json.dumps(detail, ensure_ascii=False)[:600]}", flush=True)
        return detail if status == "ok" else None

    def rename(self, path: Path, **header) -> None:
        """Move the results to ``path`` (once the card's name is known), adding ``header``."""
        old, self.path = self.path, path
        self.report.update(header)
        self.save()
        if old != path:
            old.unlink(missing_ok=True)

    def finish(self) -> None:
        self.report["finished"] = True
        self.save()


def describe(e: BaseException) -> str:
    """An in-process exception named for what it is."""
    text = f"{type(e).__name__}: {str(e)[-1500:]}"
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e):
        return f"OOM: {text}"
    if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT
        return f"disk full: {text}"
    return text
