"""Divergence is caught: non-finite steps are counted, never checkpointed over the last good
state, reported as valid JSON, and past train.max_nonfinite_steps the run stops with a message."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from training.guard import DivergenceError, NonFiniteGuard, finite_or_none


def test_guard_counts_nonfinite_steps_until_a_save():
    guard, log = NonFiniteGuard(limit=10, device=torch.device("cpu")), []
    guard.observe(torch.tensor(2.5), 1.0)
    assert guard.check(1, "p", log.append) == 0 and not log
    guard.observe(torch.tensor(float("nan")), 1.0)
    guard.observe(torch.tensor(2.0), float("inf"))
    guard.observe(torch.tensor(2.0), torch.tensor(float("inf")))  # DeepSpeed may hand back a tensor
    assert guard.check(4, "p", log.append) == 3 and "3 step(s) up to step 4" in log[0]
    guard.saved()
    guard.observe(torch.tensor(2.0), 0.5)
    assert guard.check(5, "p", log.append) == 0 and guard.total == 3


def test_guard_raises_with_step_and_position():
    guard = NonFiniteGuard(limit=2, device=torch.device("cpu"))
    guard.observe(torch.tensor(float("inf")), None)
    assert guard.check(7, "p", lambda _: None) == 1
    guard.observe(torch.tensor(1.0), float("nan"))
    with pytest.raises(DivergenceError, match=r"2 steps .* step 9 \(data position: 1,024 tokens\)"):
        guard.check(9, "1,024 tokens", lambda _: None)


def test_metrics_rows_stay_json():
    row = finite_or_none({"step": 3, "loss": float("inf"), "grad_norm": float("nan"), "lr": 1e-3})
    assert row == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "nonfinite": ["loss", "grad_norm"]}
    json.loads(json.dumps(row, allow_nan=False))


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    from test_training import REPO, tiny_config, write_config

    from training.config import parse_config
    from training.data import run_prepare

    raw = tiny_config(tmp_path, max_steps=30, lr=100.0, min_lr=0.0, warmup_steps=0, schedule="constant",
                      max_nonfinite_steps=3, grad_clip=0.0)
    raw["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    raw["eval"] = {"every_steps": 0, "max_samples": 2}
    cfg = parse_config(raw)
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", str(write_config(tmp_path / "c.yaml", raw)),
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "training diverged: 3 steps with a non-finite loss or gradient norm" in proc.stderr
    assert "Traceback" not in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    bad = [r["step"] for r in rows if r.get("nonfinite")]
    assert len(bad) >= 1 and all(r["grad_norm"] is None or math.isfinite(r["grad_norm"]) for r in rows)
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert int(latest.removeprefix("step")) < bad[0]  # the last checkpoint predates the first bad step
