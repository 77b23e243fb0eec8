"""Multi-rank DeepSpeed training on CPU (gloo): learning, exact resume, export parity.

Each test launches real processes with torchrun, as a user would; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from launch import Launch, launch_torchrun

from training.config import parse_config
from training.data.pretraining import run_prepare

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "data_pipeline" / "smoke_corpus"
pytestmark = pytest.mark.slow


def tiny_config(root: Path, **train) -> dict:
    return {
        "name": "test",
        "seed": 7,
        "model": {"flavor": "tiny-mistral"},
        "tokenizer": {"path": str(root / "tokenizer"), "train": True, "vocab_size": 512},
        "data": {
            "sources": [
                {"name": "nob", "language": "nob", "paths": [str(EMBEDDED / "nob.jsonl")]},
                {"name": "nno", "language": "nno", "paths": [str(EMBEDDED / "nno.jsonl")]},
            ],
            "shards_dir": str(root / "shards"),
            "seq_len": 64,
            "valid_fraction": 0.1,
        },
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "precision": "fp32", **train},
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "eval": {"every_steps": 3, "max_samples": 8},
    }


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    cfg = parse_config(tiny_config(root))
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    return root


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def torchrun(*args: str, nproc: int = 2) -> Launch:
    """A successful torchrun launch; on failure the failing rank's log tail, the port and any
    leftover processes of earlier tests (tests/launch.py)."""
    launch = launch_torchrun(*args, nproc=nproc)
    assert launch.ok, launch.summary()
    return launch


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_rank_zero2_learns_and_export_matches_engine(data_root, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.cli import main

    raw = tiny_config(data_root, max_steps=16, world_size=2)
    raw["checkpoint"]["every_steps"] = 8
    raw["eval"]["every_steps"] = 8
    config = write_config(tmp_path / "c.yaml", raw)
    run = tmp_path / "run"
    dump = tmp_path / "logits.pt"
    torchrun(str(REPO / "tests" / "dist" / "train_and_dump.py"), str(config), str(run), str(dump))

    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 17))
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    evals = [e for e in read_jsonl(run / "eval.jsonl") if e["source"] == "all"]
    assert [e["step"] for e in evals] == [0, 8, 16]
    per_source = {(e["source"], e["language"]) for e in read_jsonl(run / "eval.jsonl") if e["step"] == 16}
    assert {("nob", "nob"), ("nno", "nno"), ("all", "all")} <= per_source
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000016"

    out = tmp_path / "export"
    from training.checkpoint.run_lock import acquire

    trainer = acquire(run, heartbeat_s=30, stale_s=300)  # a trainer on the run dir: export only reads
    try:
        capsys.readouterr()
        assert main(["export", str(run), str(out), "--dtype", "fp32"]) == 0
    finally:
        trainer.release()
    assert f"[export] {run / 'checkpoints' / 'step00000016'} (step 16, 8,192 tokens)" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()} == {
        f.name: 0o666 & ~umask for f in out.iterdir() if f.is_file()}  # the model too, not 0600
    # `norallm eval`: at the trained length (64, from training_config.yaml), the whole file, coverage said
    capsys.readouterr()
    assert main(["eval", str(out), "--data", f"bm={EMBEDDED / 'nob.jsonl'}", str(EMBEDDED / "nno.jsonl")]) == 0
    rows = {r["source"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"bm", "nno", "all"} and all(r["seq_len"] == 64 and r["split"] == "file" for r in rows.values())
    assert all(0.95 <= r["coverage"] <= 1 for r in rows.values()), rows  # all full windows of the file
    assert main(["eval", str(out), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "no file matches" in capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "</s>"
    ref = torch.load(dump, weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=ref["inputs"]).logits
    assert torch.max(torch.abs(logits - ref["logits"])).item() <= 1e-5


def test_exact_resume_is_bit_identical(data_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(data_root, max_steps=6))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli = ["-m", "training.cli", "train", str(config), "--run-dir"]
    torchrun(*cli, str(straight))
    first = torchrun(*cli, str(resumed), "--stop-at", "3")
    assert "starting" in first.stdout
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step00000003"
    second = torchrun(*cli, str(resumed))
    assert "resuming at step 3" in second.stdout
    assert "[train] step 6/6: loss " in second.stdout and "tokens/s" in second.stdout and "ETA 0:00:00" in second.stdout
    again = torchrun(*cli, str(resumed))
    assert "this run already finished: step 6 of train.max_steps 6" in again.stdout

    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 7))
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert read_jsonl(straight / "eval.jsonl") == read_jsonl(resumed / "eval.jsonl")


def test_plain_process_trains_as_a_world_of_one(data_root, tmp_path):
    """`norallm train` without torchrun/srun must not fall into DeepSpeed's MPI discovery; wandb logs
    offline into the run dir; `norallm report` draws the plots."""
    from training.cli import main

    raw = tiny_config(data_root, max_steps=2)
    raw["logging"] = {"wandb": True, "wandb_mode": "offline"}
    config = write_config(tmp_path / "c.yaml", raw)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", str(config), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 rank(s)" in proc.stdout
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 2
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "memory_gib"} <= set(metrics[0])
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert main(["report", str(tmp_path / "run")]) == 0
    for name in ("loss.png", "lr.png", "throughput.png", "grad_norm.png", "eval_loss.png"):
        assert (tmp_path / "run" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_user_error_under_the_launcher_is_one_line_and_exit_2(tmp_path):
    """The README's launch command with a config whose tokenizer does not exist: what the user sees."""
    raw = tiny_config(tmp_path, max_steps=2)
    raw["tokenizer"] = {"path": str(tmp_path / "no-tokenizer")}
    config = write_config(tmp_path / "c.yaml", raw)
    launcher = Path(sys.executable).parent / "norallm-torchrun"
    proc = subprocess.run([str(launcher), "--standalone", "--nproc_per_node=2", "-m", "training.cli", "train",
                           str(config), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no-tokenizer" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert "built successfully" not in proc.stdout + proc.stderr
