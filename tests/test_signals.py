"""A stop request during start-up (Slurm's time-limit warning while torch and DeepSpeed still
import) is kept: the run trains one step, saves and exits for requeue, instead of dying unsaved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_usr1_during_start_up_saves_after_the_first_step(tmp_path):
    from test_checkpoint_safety import prepared_run

    config, run = prepared_run(tmp_path, max_steps=50, keep_last=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "train", config, "--run-dir", str(run)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGUSR1):  # norallm train's first act; torch is not imported yet
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.005)
    assert "torch" not in Path(f"/proc/{proc.pid}/maps").read_text()  # still starting up
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 42, out[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000001", out[-3000:]
    assert "[train] signal received" in out
