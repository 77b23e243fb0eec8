"""One trainer per run dir (training.checkpoint.run_lock): a second one is refused naming the holder and
changes nothing; a dead, stale or earlier-incarnation holder is taken over; racing trainers end
with exactly one holder; the heartbeat notices a takeover."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.checkpoint.run_lock import LOCK_NAME, Holder, RunDirLocked, acquire, verdict

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def foreign(**fields) -> Holder:
    """A holder on another host, beating now, unless ``fields`` say otherwise."""
    now = time.time()
    base = dict(token="f" * 32, host="gpu-17", pid=4242, started=now - 3600, heartbeat=now, heartbeat_s=30.0,
                stale_s=300.0, job_id="123456", restart_count=0)
    return Holder(**{**base, **fields})


def write_lock(run: Path, holder: Holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(holder.to_json())
    return run / LOCK_NAME


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)


def test_a_lock_is_taken_held_and_released(tmp_path):
    run = tmp_path / "run"
    lock = acquire(run, heartbeat_s=30, stale_s=300)
    holder = Holder.from_json((run / LOCK_NAME).read_text())
    assert (holder.pid, holder.host, holder.heartbeat_s, holder.stale_s) == (os.getpid(), socket.gethostname(), 30, 300)
    assert [p.name for p in run.iterdir()] == [LOCK_NAME]  # no temporary file is left
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_a_run_dir_the_lock_made_is_removed_only_while_empty(tmp_path):
    """A start refused after the lock (another shape: training.resume_check) leaves no empty run dir;
    a run dir that was there, or that the run wrote into, stays."""
    acquire(tmp_path / "refused", heartbeat_s=30, stale_s=300).release()
    assert not (tmp_path / "refused").exists()
    (tmp_path / "earlier").mkdir()
    acquire(tmp_path / "earlier", heartbeat_s=30, stale_s=300).release()
    assert (tmp_path / "earlier").is_dir()
    lock = acquire(tmp_path / "wrote", heartbeat_s=30, stale_s=300)
    (tmp_path / "wrote" / "config.yaml").write_text("name: x\n")
    lock.release()
    assert [p.name for p in (tmp_path / "wrote").iterdir()] == ["config.yaml"]


def test_a_live_holder_elsewhere_is_refused_in_one_line_and_nothing_changes(tmp_path):
    run = tmp_path / "run"
    path = write_lock(run, foreign(heartbeat=time.time() - 12))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoints" / ".tmp-step00000002").mkdir(parents=True)
    before = snapshot(run)
    with pytest.raises(RunDirLocked) as e:
        acquire(run, heartbeat_s=30, stale_s=300)
    message = str(e.value)
    assert "\n" not in message
    assert "Slurm job 123456 (restart 0) on host gpu-17, pid 4242" in message
    assert "last heartbeat 12 s ago" in message or "last heartbeat 13 s ago" in message
    assert "scancel 123456" in message and f"remove {path}" in message and "Nothing in the run dir was changed" in message
    assert snapshot(run) == before and (run / "checkpoints" / ".tmp-step00000002").is_dir()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    run = tmp_path / "run"
    write_lock(run, foreign(heartbeat=time.time() - 400))
    said = []
    lock = acquire(run, heartbeat_s=30, stale_s=300, log=said.append)
    assert Holder.from_json((run / LOCK_NAME).read_text()).pid == os.getpid()
    assert "taking over" in said[0] and "Slurm job 123456" in said[0] and "stale after 300 s" in said[0]
    lock.release()


def test_staleness_is_judged_by_the_holders_own_threshold(tmp_path):
    run = tmp_path / "run"
    write_lock(run, foreign(heartbeat=time.time() - 60, stale_s=600.0))  # the holder promised 600 s
    with pytest.raises(RunDirLocked):
        acquire(run, heartbeat_s=1, stale_s=10)  # our own short threshold does not apply to it


def test_a_requeued_job_takes_over_its_earlier_incarnation(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_lock(run, foreign(heartbeat=time.time() - 100))  # job 123456, restart 0, killed 100 s ago
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    said = []
    acquire(run, heartbeat_s=30, stale_s=300, log=said.append).release()
    assert "earlier incarnation of this job (restart 0, now 1)" in said[0]
    # another job's lock, equally recent, is refused
    write_lock(run, foreign(job_id="999", heartbeat=time.time() - 100))
    with pytest.raises(RunDirLocked, match="Slurm job 999"):
        acquire(run, heartbeat_s=30, stale_s=300)


def test_an_earlier_incarnation_that_still_beats_is_refused_and_one_that_stopped_is_taken(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    old = acquire(run, heartbeat_s=0.2, stale_s=60)  # beating every 0.2 s
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunDirLocked, match="Slurm job 55 \\(restart 0\\)"):
        acquire(run, heartbeat_s=0.2, stale_s=60)
    old._stop.set()  # the old incarnation stops beating (its node went away), its lock stays
    old._thread.join()
    said = []
    acquire(run, heartbeat_s=0.2, stale_s=60, log=said.append).release()  # after two missed beats
    assert "earlier incarnation" in said[0]


def test_verdict_rules():
    me = foreign(token="m" * 32, host="here", pid=1, job_id="7", restart_count=2, pid_namespace="pid:[1]")
    now = time.time()
    assert verdict(foreign(heartbeat=now - 301), me, now).take
    assert not verdict(foreign(heartbeat=now - 299), me, now).take
    assert verdict(foreign(job_id="7", restart_count=1, heartbeat=now - 61), me, now).take
    assert verdict(foreign(job_id="7", restart_count=1, heartbeat=now - 5), me, now).watch
    assert not verdict(foreign(job_id="7", restart_count=2, heartbeat=now - 61), me, now).take  # not earlier
    same_host = foreign(host="here", pid=99, pid_namespace="pid:[1]", heartbeat=now)
    assert verdict(same_host, me, now, pid_gone=lambda pid: True).take
    assert not verdict(same_host, me, now, pid_gone=lambda pid: False).take
    assert not verdict(foreign(host="here", pid=99, pid_namespace="pid:[2]"), me, now, pid_gone=lambda p: True).take
    elastic = replace_fields(me, job_id=None, launch_id="abc", launch_restart=1)
    assert verdict(foreign(job_id=None, launch_id="abc", launch_restart=0, heartbeat=now - 61), elastic, now).take


def replace_fields(holder: Holder, **fields) -> Holder:
    from dataclasses import replace

    return replace(holder, **fields)


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from training.checkpoint.run_lock import acquire; acquire(Path(sys.argv[1]), 30, 300); "
                               "print('held', flush=True); time.sleep(600)", str(run)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
            acquire(run, heartbeat_s=30, stale_s=300)
    finally:
        holder.kill()
        holder.wait()
    said = []
    acquire(run, heartbeat_s=30, stale_s=300, log=said.append).release()  # kill -9 left the lock
    assert f"its process {holder.pid} on this host is gone" in said[0]


def _race(run: str, barrier, results, release) -> None:
    barrier.wait()
    try:
        lock = acquire(Path(run), heartbeat_s=30, stale_s=300, log=lambda _: None)
    except RunDirLocked:
        results.put("refused")
        return
    results.put("held")
    release.wait(60)  # hold until every racer has decided
    lock.release()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lock"])
def test_racing_trainers_end_with_exactly_one_holder(tmp_path, stale):
    run = tmp_path / "run"
    if stale:
        write_lock(run, foreign(heartbeat=time.time() - 1000))  # every racer wants to take this one over
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results, release = ctx.Barrier(n), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(str(run), barrier, results, release)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=120) for _ in range(n))
    release.set()
    for p in procs:
        p.join(60)
    assert outcomes == ["held"] + ["refused"] * (n - 1)
    assert not (run / LOCK_NAME).exists()  # the holder released it


def test_the_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    run = tmp_path / "run"
    lock = acquire(run, heartbeat_s=3600, stale_s=36000)
    first = Holder.from_json((run / LOCK_NAME).read_text()).heartbeat
    lock.refresh(now=first + 5)
    assert Holder.from_json((run / LOCK_NAME).read_text()).heartbeat == first + 5
    (run / LOCK_NAME).unlink()  # removed by hand while the trainer runs: put back
    lock.refresh()
    assert Holder.from_json((run / LOCK_NAME).read_text()).token == lock.me.token
    write_lock(run, foreign())  # another trainer took it over (this one hung past the threshold)
    lock.refresh()
    assert lock.lost and "Slurm job 123456" in lock.lost
    with pytest.raises(RunDirLocked, match="stops without saving"):
        lock.verify()  # one process: no group, so the check is local
    lock.release()
    assert Holder.from_json((run / LOCK_NAME).read_text()).job_id == "123456"  # the new holder's lock stays


def test_an_unreadable_lock_is_refused_until_it_is_old(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text("{garbage")
    with pytest.raises(RunDirLocked, match="cannot be read"):
        acquire(run, heartbeat_s=30, stale_s=300)
    old = time.time() - 1000
    os.utime(run / LOCK_NAME, (old, old))
    said = []
    acquire(run, heartbeat_s=30, stale_s=300, log=said.append).release()
    assert "an unreadable lock" in said[0]


def test_lock_settings_are_checked(tmp_path):
    from test_training import tiny_config

    from training.config import ConfigError, parse_config

    raw = tiny_config(tmp_path)
    raw["checkpoint"].update(lock_heartbeat_s=30, lock_stale_s=60)
    with pytest.raises(ConfigError, match="checkpoint.lock_stale_s: 60 is under 3 × lock_heartbeat_s"):
        parse_config(raw)
    raw["checkpoint"]["lock_stale_s"] = 90
    assert parse_config(raw).checkpoint.lock_stale_s == 90


@pytest.mark.slow
def test_a_second_trainer_is_refused_on_every_rank_and_touches_nothing(tmp_path):
    """2 ranks against a run dir whose lock this test holds: every rank exits 2 with the holder's
    one line, before anything in the run dir changes (config.yaml, metrics.jsonl, resumes.jsonl,
    a .tmp-* dir that a save would delete)."""
    from launch import launch_torchrun
    from test_checkpoint_safety import prepared_run

    config, run = prepared_run(tmp_path, max_steps=2, keep_last=2)
    run.mkdir()
    (run / "config.yaml").write_text("name: the holder's\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n{"step": 2, "loss": 5.9}\n')
    (run / "resumes.jsonl").write_text('{"step": 1, "world_size": 2}\n')
    (run / "checkpoints" / ".tmp-step00000003").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step00000003" / "shard.pt").write_bytes(b"half written")
    lock = acquire(run, heartbeat_s=30, stale_s=300)
    before = snapshot(run)
    try:
        refused = launch_torchrun("-m", "training.cli", "train", config, "--run-dir", str(run),
                                  expect_returncode=None)
    finally:
        after = snapshot(run)
        lock.release()
    assert set(refused.rank_returncodes.values()) == {2}, refused.summary()
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(f"pid {os.getpid()}" in line and "is in use by" in line for line in errors), errors
    assert all("Traceback" not in err for _, err in refused.rank_logs.values())
    assert after == before
