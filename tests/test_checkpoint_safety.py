"""Nothing lost: a broken ``latest`` or a corrupt checkpoint falls back to the newest checkpoint
that verifies (never a silent start from step 0), and a run dir whose checkpoints are all unusable
is refused with its files untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training import manifest
from training.checkpoint import CHECKPOINTS, LATEST, CheckpointError, resolve, step_name


def make_checkpoint(run: Path, step: int, payload: bytes = b"weights" * 100) -> Path:
    ckpt = run / CHECKPOINTS / step_name(step)
    ckpt.mkdir(parents=True)
    (ckpt / "optim_states.pt").write_bytes(payload + bytes([step]))
    (ckpt / "rng_rank00000.pt").write_bytes(b"rng")
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "world_size": 1}))
    manifest.write(ckpt, [manifest.hash_share(ckpt, 0, 1)])
    (run / CHECKPOINTS / LATEST).write_text(step_name(step) + "\n")
    return ckpt


@pytest.fixture()
def run(tmp_path) -> Path:
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    return tmp_path


def resolved(run: Path) -> tuple[str, str]:
    messages: list[str] = []
    return resolve(run, log=messages.append).name, " ".join(messages)


def test_a_fresh_run_dir_has_nothing_to_resume(tmp_path):
    assert resolve(tmp_path) is None


def test_a_good_latest_is_used(run):
    (run / CHECKPOINTS / LATEST).write_text("step00000004\n")  # latest may name an older one: it rules
    assert resolved(run) == ("step00000004", "")


@pytest.mark.parametrize("content,why", [
    (b"garbage", "holds 'garbage'"), (b"\xff\xfe\x00\x9c", "unreadable (UnicodeDecodeError)"),
    (b"", "holds ''"), (b"step00000099\n", "names step00000099, which does not exist"), (None, "is missing"),
])
def test_a_broken_latest_falls_back_to_the_newest_good_checkpoint(run, content, why):
    pointer = run / CHECKPOINTS / LATEST
    if content is None:
        pointer.unlink()
    else:
        pointer.write_bytes(content)
    name, warning = resolved(run)
    assert name == "step00000006" and why in warning and "Resuming from step00000006" in warning


@pytest.mark.parametrize("damage,why", [
    ("flip", "does not match its sha256"), ("truncate", "bytes, the manifest says"), ("delete", "is missing"),
    ("meta", "incomplete (no meta.json)"), ("manifest", "manifest.json is unreadable"),
])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(run, damage, why):
    ckpt = run / CHECKPOINTS / "step00000006"
    target = ckpt / "optim_states.pt"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[10:74] = bytes(b ^ 0xFF for b in data[10:74])  # 64 flipped bytes, same size
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:50])
    elif damage == "delete":
        target.unlink()
    elif damage == "meta":
        (ckpt / "meta.json").unlink()
    else:
        (ckpt / manifest.MANIFEST).write_text("{not json")
    name, warning = resolved(run)
    assert name == "step00000004" and why in warning, warning
    if damage in ("flip", "truncate", "delete"):
        assert str(target) in warning  # the file is named


def test_checkpoints_that_are_all_unusable_are_refused_and_left_alone(run):
    for ckpt in (run / CHECKPOINTS).glob("step*"):
        (ckpt / "optim_states.pt").write_bytes(b"x")
    (run / CHECKPOINTS / LATEST).write_text("nonsense")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="none can be resumed from") as e:
        resolve(run)
    assert "step00000002" in str(e.value) and "new --run-dir" in str(e.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_older_checkpoint_without_manifest_is_accepted_with_a_note(tmp_path):
    ckpt = make_checkpoint(tmp_path, 3)
    (ckpt / manifest.MANIFEST).unlink()
    name, note = resolved(tmp_path)
    assert name == "step00000003" and "not verified" in note


# Secrets by the words in their names, not on any list (training.config.is_secret_name)
SECRETS = {"GITHUBTOKEN": "ghp-s3cr3t-one", "MY_APIKEY": "s3cr3t-two"}


def prepared_run(tmp_path: Path, max_steps: int, keep_last: int) -> tuple[str, Path]:
    """A tiny prepared corpus and a config checkpointing every 2 steps: (config path, run dir)."""
    from test_training import tiny_config, write_config

    from training.config import parse_config
    from training.data import run_prepare

    raw = tiny_config(tmp_path, max_steps=max_steps, warmup_steps=1)
    raw["checkpoint"] = {"every_steps": 2, "keep_last": keep_last}
    raw["eval"] = {"every_steps": 0, "max_samples": 2}
    raw["slurm"] = {"env": dict(SECRETS)}  # must never reach a file the run writes (test_safe_load checks)
    cfg = parse_config(raw)
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    return str(write_config(tmp_path / "c.yaml", raw)), tmp_path / "run"


@pytest.mark.slow
def test_training_resumes_from_the_last_good_checkpoint_exactly_and_refuses_when_none_is(tmp_path):
    """2 ranks, ZeRO-2: garbage in `latest` and a flipped optimizer shard in the newest checkpoint.
    The resume starts from the checkpoint before, keeps metrics.jsonl's earlier rows, and ends on
    the straight run's losses; with every checkpoint corrupt, `norallm train` refuses (exit 2)."""
    from launch import launch_torchrun
    from test_training import read_jsonl, torchrun

    config, run = prepared_run(tmp_path, max_steps=6, keep_last=3)
    torchrun("-m", "training.cli", "train", config, "--run-dir", str(run))
    straight = [m["loss"] for m in read_jsonl(run / "metrics.jsonl")]
    root = run / CHECKPOINTS
    (root / LATEST).write_text("garbage\n")
    shard = sorted((root / "step00000006").glob("*optim_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[200:264] = bytes(b ^ 0xFF for b in data[200:264])
    shard.write_bytes(bytes(data))
    resumed = torchrun("-m", "training.cli", "train", config, "--run-dir", str(run))
    assert "resuming at step 4" in resumed.stdout and "does not match its sha256" in resumed.stdout
    assert str(shard) in resumed.stdout
    assert [m["loss"] for m in read_jsonl(run / "metrics.jsonl")] == straight  # rows 1–4 kept, 5–6 equal

    for ckpt in root.glob("step*"):
        for f in ckpt.glob("*optim_states.pt"):
            f.write_bytes(f.read_bytes()[:100])
    metrics_before = (run / "metrics.jsonl").read_bytes()
    refused = launch_torchrun("-m", "training.cli", "train", config, "--run-dir", str(run), expect_returncode=None)
    assert set(refused.rank_returncodes.values()) == {2}, refused.summary()
    assert "none can be resumed from" in refused.stderr and "Traceback" not in refused.rank_logs[0][1]
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    shutil.rmtree(run)


@pytest.mark.slow
def test_a_save_that_cannot_be_written_says_why_and_leaves_latest_alone(tmp_path):
    """A file-size limit stands in for a full disk (the write fails inside torch.save): one clear
    error naming the path and the bytes, the partial checkpoint removed, `latest` on the last good
    one, and a later resume continues from it."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    from test_training import REPO, read_jsonl

    config, run = prepared_run(tmp_path, max_steps=4, keep_last=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    cmd = [sys.executable, "-m", "training.cli", "train", config, "--run-dir", str(run)]
    first = subprocess.run([*cmd, "--stop-at", "2"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr[-3000:]  # --stop-at is a planned stop, not a signal

    def small_files():  # no file over 64 KiB: the next checkpoint's shards cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    full = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env, preexec_fn=small_files)
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
    assert "saving checkpoint step 4 under" in full.stderr and "bytes are free there" in full.stderr
    assert "checkpoints/latest still names step00000002" in full.stderr and "Traceback" not in full.stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000002"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert again.returncode == 0 and "resuming at step 2" in again.stdout, again.stderr[-3000:]
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
