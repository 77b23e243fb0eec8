"""The benchmark scripts keep running (tiny shapes, CPU); their figures come from the real runs
recorded under bench/results/, not from here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_throughput_runs_at_tiny_shapes_and_checks_correctness(tmp_path):
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--tiny", "--steps", "1", "--warmup", "1",
                           "--arch", "mistral,bloom", "--rows", "hf_eager,hf_ds_zero1,norallm", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {(r["arch"], r["row"]) for r in report["rows"] if "tokens_per_s" in r} == {
        (a, r) for a in ("mistral", "bloom") for r in ("hf_eager", "hf_ds_zero1", "norallm")}
    assert all(c["ok"] for c in report["checks"].values())
    assert "vs HF eager" in proc.stdout
