"""Nothing lost: a broken ``latest`` or a corrupt checkpoint falls back to the newest checkpoint
that verifies (never a silent start from step 0), and a run dir whose checkpoints are all unusable
is refused with its files untouched."""

from __future__ import annotations

import builtins
import contextlib
import errno
import fnmatch
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from training import distributed
from training.checkpoint import manifest, store
from training.checkpoint.store import CHECKPOINTS, LATEST, CheckpointError, resolve, step_name


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
    from training.data.pretraining import run_prepare

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
    assert "saving checkpoint step 4 under" in full.stderr and " free there and a checkpoint needs about " in full.stderr
    assert "checkpoints/latest still names step00000002" in full.stderr and "Traceback" not in full.stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000002"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert again.returncode == 0 and "resuming at step 2" in again.stdout, again.stderr[-3000:]
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


def _set_health(ckpt: Path, healthy: bool) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "healthy": healthy, "unhealthy": "a test's blow-up"}))
    manifest.refresh(ckpt, "meta.json")  # as training.checkpoint.store.mark_unhealthy does


def test_rotation_never_deletes_the_last_healthy_checkpoint(tmp_path):
    """keep_last 2 with checkpoints 2..10: after a blow-up at 6 every newer one is unhealthy, and
    the newest healthy one (4) survives however many unhealthy saves follow; the one just written
    is never pruned, and with keep_last 1 the newest healthy checkpoint before it stays too (the
    just-written one cannot be known healthy yet)."""
    from training.checkpoint.store import _prune

    root = tmp_path / CHECKPOINTS
    for step in (2, 4, 6, 8, 10):
        ckpt = make_checkpoint(tmp_path, step)
        _set_health(ckpt, step <= 4)
        _prune(root, keep_last=2, newest=ckpt)
    assert sorted(p.name for p in root.glob("step*")) == ["step00000004", "step00000008", "step00000010"]
    ckpt = make_checkpoint(tmp_path, 12)
    _prune(root, keep_last=1, newest=ckpt)  # healthy again (recovered): 4 is no longer needed
    assert sorted(p.name for p in root.glob("step*")) == ["step00000004", "step00000012"]
    ckpt = make_checkpoint(tmp_path, 14)
    _prune(root, keep_last=1, newest=ckpt)
    assert sorted(p.name for p in root.glob("step*")) == ["step00000012", "step00000014"]


def test_a_resume_from_an_unhealthy_checkpoint_warns_and_names_the_healthy_one(run, capsys):
    """Resolution does not change (latest rules), but the resume says what it resumes from and
    where the last healthy checkpoint is."""
    from training.checkpoint.store import choose

    _set_health(run / CHECKPOINTS / "step00000006", False)
    assert choose(run).name == "step00000006"
    out = capsys.readouterr().out
    assert "resuming from a checkpoint saved in trouble: step00000006 is not healthy" in out
    assert f"--from-checkpoint {run / CHECKPOINTS / 'step00000004'}" in out


def test_export_of_a_run_refuses_a_corrupt_newest_checkpoint_and_names_the_older_one(run, capsys):
    """`norallm export RUN` means the newest checkpoint: a corrupt one is an error naming it and
    the command for the older one, not an older model exported with exit 0."""
    from training.cli import main

    shard = run / CHECKPOINTS / "step00000006" / "optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:20])
    out = run.parent / "export"
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert "the newest checkpoint of" in err and "step00000006, does not verify" in err and str(shard) in err
    assert f"`norallm export {run / CHECKPOINTS / 'step00000004'} OUT`" in err and "Nothing was exported" in err
    assert not out.exists()


def test_export_of_a_run_with_a_broken_latest_takes_the_newest_with_a_warning(run):
    from training.export import resolve_checkpoint

    (run / CHECKPOINTS / LATEST).write_text("garbage")
    warnings: list[str] = []
    assert resolve_checkpoint(run, warn=warnings.append).name == "step00000006"
    assert "holds 'garbage'" in warnings[0] and "exporting step00000006, the newest checkpoint" in warnings[0]


def test_parallel_hashing_writes_the_manifest_a_serial_hash_writes(tmp_path, monkeypatch):
    """Files hashed by a thread pool, each read ahead of its hash, give the sha256 of each whole
    file: sizes around the chunk boundary, an empty file, nested dirs, every rank's share."""
    import hashlib
    import os

    chunk = 4096
    monkeypatch.setattr(manifest, "_CHUNK", chunk)
    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, 10 * chunk]
    for i, size in enumerate(sizes):
        (ckpt / ("tokenizer" if i % 2 else ".") / f"f{i}.bin").write_bytes(os.urandom(size))
    serial = {str(p.relative_to(ckpt)): [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
              for p in ckpt.rglob("*") if p.is_file()}
    assert manifest.hash_share(ckpt, 0, 1) == serial
    shares = [manifest.hash_share(ckpt, r, 3) for r in range(3)]
    assert sorted(k for s in shares for k in s) == sorted(serial)
    manifest.write(ckpt, shares)
    assert manifest.read(ckpt) == serial
    assert [manifest.verify_share(ckpt, serial, r, 3) for r in range(3)] == [[], [], []]
    flipped = ckpt / "f6.bin"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    problems = [p for r in range(3) for p in manifest.verify_share(ckpt, serial, r, 3)]
    assert problems == [f"{flipped} does not match its sha256 in the manifest (corrupted)"]


def test_a_file_that_cannot_be_read_fails_its_digest(tmp_path):
    """An error in the reader thread reaches the caller instead of a digest of what was read."""
    with pytest.raises(IsADirectoryError):
        manifest.digest(tmp_path)
class FakeWriter:
    """DeepSpeed's checkpoint engine as store.save uses it: ``save(state_dict, path)``."""

    def save(self, state_dict, path):
        with open(path, "wb") as f:  # through Python's open, so that disk_full_at reaches it
            torch.save(state_dict, f)


class FakeEngine:
    """What store.save needs of a DeepSpeed engine: a save that writes each rank's shard
    through its checkpoint engine (no model, no optimizer: fast)."""

    def __init__(self):
        self.checkpoint_engine = FakeWriter()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        ckpt = Path(save_dir) / tag
        ckpt.mkdir(parents=True, exist_ok=True)
        distributed.barrier()  # as DeepSpeed's save has collectives inside
        self.checkpoint_engine.save({"w": torch.ones(256), "step": client_state["step"]},
                                    ckpt / f"zero_pp_rank_{distributed.rank()}_mp_rank_00_optim_states.pt")
        distributed.barrier()


@contextlib.contextmanager
def disk_full_at(pattern: str):
    """Every file whose name matches ``pattern`` fails to open for writing with ENOSPC, as on a full disk."""
    real = builtins.open

    def open_or_full(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and set(mode) & set("wax") and fnmatch.fnmatch(Path(file).name, pattern):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real(file, mode, *args, **kwargs)

    with mock.patch("builtins.open", open_or_full), mock.patch("io.open", open_or_full):
        yield


def save_files(run: Path) -> dict[str, Path]:
    """The extra files a trainer's save copies in: the run's config.yaml and the tokenizer dir."""
    (run / "tok").mkdir(parents=True, exist_ok=True)
    (run / "tok" / "tokenizer.json").write_text("{}")
    (run / "config.yaml").write_text("name: test\n")
    return {"config.yaml": run / "config.yaml", "tokenizer": run / "tok"}


@pytest.mark.parametrize("pattern", ["meta.json", "config.yaml", "tokenizer.json", "manifest.json*", "latest*"])
def test_a_full_disk_after_the_shards_is_one_clear_error_and_leaves_nothing(tmp_path, pattern):
    """Writing meta.json, config.yaml, the tokenizer, the manifest or `latest` raised a raw [Errno 28]
    and left the .tmp- dir; now it is the save's one error, with the free space in the right unit."""
    run = tmp_path / "run"
    extra = save_files(run)
    store.save(FakeEngine(), run, 2, {"step": 2, "tokens_consumed": 20}, 3, extra)
    with disk_full_at(pattern), pytest.raises(CheckpointError) as e:
        store.save(FakeEngine(), run, 4, {"step": 4, "tokens_consumed": 40}, 3, extra)
    msg = str(e.value)
    assert msg.startswith(f"saving checkpoint step 4 under {run / CHECKPOINTS} failed ([Errno 28] No space left"), msg
    assert "checkpoints/latest still names step00000002" in msg
    size = sum(f.stat().st_size for f in (run / CHECKPOINTS / "step00000002").rglob("*") if f.is_file())
    assert f"a checkpoint needs about {size / 1024:.1f} KiB" in msg  # the last one's size: ~3 KiB, not "0.0 GiB"
    assert " free there" in msg and "0 bytes free" not in msg
    root = run / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000002"]  # no .tmp-*, no latest.*.tmp
    assert (root / LATEST).read_text() == "step00000002\n" and resolve(run).name == "step00000002"
    store.save(FakeEngine(), run, 4, {"step": 4, "tokens_consumed": 40}, 3, extra)  # space again: it saves
    assert resolve(run).name == "step00000004"


@pytest.mark.parametrize("n,text", [(0, "0 bytes"), (1, "1 byte"), (1023, "1,023 bytes"), (2_000_000, "1.9 MiB"),
                                    (1536, "1.5 KiB"), (3 * 2**30 + 2**29, "3.5 GiB"), (2**40 * 1.1, "1.1 TiB"),
                                    (1024**2 - 1, "1.0 MiB")])
def test_sizes_are_given_in_the_unit_that_fits(n, text):
    from norallm.files import human_bytes

    assert human_bytes(n) == text


def test_the_free_space_warning_says_megabytes_when_there_are_megabytes(tmp_path, monkeypatch):
    """It said "0.0 GiB free ... 0.0 GiB more" for a disk with 2 MB left and checkpoints of 1 MB."""
    ckpt = make_checkpoint(tmp_path, 2, payload=b"w" * 2**20)
    monkeypatch.setattr(store, "_free_bytes", lambda path: 2_000_000)
    messages: list[str] = []
    store.check_free_space(tmp_path, 0, keep_last=3, log=messages.append)
    assert messages and messages[0].startswith(f"[checkpoint] warning: 1.9 MiB free under {ckpt.parent}")
    assert "checkpoints of ~1.0 MiB" in messages[0] and "(3.0 MiB more)" in messages[0]


@pytest.mark.slow
def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank_alike(tmp_path):
    """2 ranks (gloo, no DeepSpeed): rank 0's meta.json, rank 1's shard, rank 0's `latest` each fail
    once. Every rank raises the same error, none hangs at a barrier or prints a traceback, and the
    saves between them work (tests/dist/save_fails.py)."""
    from launch import REPO, launch_torchrun

    run = tmp_path / "run"
    launch = launch_torchrun(str(REPO / "tests" / "dist" / "save_fails.py"), str(run), timeout=300)
    assert launch.ok, launch.summary()
    results = [[json.loads(line) for line in launch.rank_logs[r][0].splitlines() if line.startswith("{")]
               for r in (0, 1)]
    assert results[0] == results[1] and [row["step"] for row in results[0]] == [2, 4, 6, 8, 10], results
    by_step = {row["step"]: row for row in results[0]}
    for step in (4, 6, 8):
        assert by_step[step]["error"].startswith(f"saving checkpoint step {step} under"), by_step[step]
        assert "still names step00000002" in by_step[step]["error"] and by_step[step]["latest"] == "step00000002"
    assert by_step[10] == {"step": 10, "error": None, "latest": "step00000010"}
    assert not any("Traceback" in err for _, err in launch.rank_logs.values())
    assert not list((run / CHECKPOINTS).glob(".tmp-*"))
