"""One trainer per run dir: ``RUN_DIR/train.lock``, held for a job's lifetime.

Two trainers on one run dir (a double ``norallm submit``, a requeue overlapping a job still
writing) replace each other's checkpoints, delete each other's ``.tmp-*`` dirs and interleave two
trajectories in ``metrics.jsonl``. ``norallm train`` therefore takes this lock before it touches
anything in the run dir, and a second trainer is refused with one line naming the holder (exit 2).
``export``, ``eval`` and ``report`` only read and take no lock.

Why a lock *file* with a heartbeat, not ``flock``: on Lustre and NFS, ``flock`` is either not
honoured across nodes (Lustre mounted without ``-o flock``, NFS clients that emulate it locally)
or tied to a lock server that forgets it when a node dies. A file the holder keeps alive works on
any shared file system, and its content says who holds it.

How it is taken atomically: the holder record is written to a temporary file of a unique name
(``O_CREAT|O_EXCL``) and hard-linked to ``train.lock``. ``link(2)`` fails when the target exists,
atomically on the server, also on NFSv2/v3 where ``O_EXCL`` was not; and since an NFS client may
report a link that it made as failed (a retried RPC), success is read from the temporary file's
link count (2), the classic NFS-safe recipe. Readers therefore never see a partial record. Where
the file system has no hard links, an ``O_EXCL`` create of ``train.lock`` itself is the fallback.
A dead holder's lock is removed under a short-lived mutex made the same way (``_take_over``), so
that trainers racing to take over one stale lock end with exactly one holder.

Heartbeat: rank 0 rewrites the record every ``checkpoint.lock_heartbeat_s`` (30 s) from a daemon
thread (a new file renamed over the old one, so readers never see a partial record). The holder
writes its own interval and staleness threshold into the record, so another trainer judges it
by the holder's promise, not by its own config.

A held lock is taken over (with a warning) when:

- its heartbeat is older than the holder's ``checkpoint.lock_stale_s`` (300 s): the holder died
  (kill -9, a node failure) or hangs. Ages are measured on the reader's clock against the
  holder's; cluster clocks agree to well under a second, and the threshold is minutes;
- it is held by an earlier incarnation of this very job: the same ``SLURM_JOB_ID`` with a lower
  ``SLURM_RESTART_COUNT`` (Slurm requeued it, e.g. after a node failure or a preemption's
  SIGKILL), or the same torchrun launch with a lower ``TORCHELASTIC_RESTART_COUNT``. Slurm starts
  a requeued incarnation only after ending the previous one, but a node that lost contact may
  still run it, so the lock is taken once the old heartbeat has missed two beats; an old
  incarnation that is still beating is refused like any other holder;
- it was taken on this host (same PID namespace) by a process that no longer exists.

It is released on every exit that runs Python's ``finally`` (a finished run, exit 42, a user
error, a divergence stop, a second Ctrl-C); kill -9 leaves it, and the rules above recover.

A holder that finds its lock taken over (it hung for longer than the threshold) stops beating,
warns, and refuses to write its next checkpoint (``verify``, collective, called before each
save), so it can never overwrite the new holder's. Until that save it may still append rows to
``metrics.jsonl``: a hang longer than ``lock_stale_s`` that ends by itself is the one case this
lock does not fully cover.

Rank 0 decides; every rank gets the decision by a broadcast (training.distributed), so all ranks
raise the same one-line error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from norallm.errors import NorallmError

LOCK_NAME = "train.lock"
_ATTEMPTS = 50  # rounds of read → decide → create; each lost race costs one
_MUTEX_STALE_S = 60.0


class RunDirLocked(NorallmError):
    """Another trainer holds the run dir (or this one lost it to another)."""


@dataclass(frozen=True)
class Holder:
    """What ``train.lock`` says about the trainer holding it."""

    token: str
    host: str
    pid: int
    started: float  # time.time() on the holder
    heartbeat: float
    heartbeat_s: float
    stale_s: float
    job_id: str | None = None  # SLURM_JOB_ID
    restart_count: int = 0  # SLURM_RESTART_COUNT
    launch_id: str | None = None  # TORCHELASTIC_RUN_ID
    launch_restart: int = 0  # TORCHELASTIC_RESTART_COUNT
    pid_namespace: str | None = None

    def to_json(self) -> str:
        return json.dumps({"version": 1, **asdict(self)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Holder:
        raw = json.loads(text)
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def who(self) -> str:
        job = f"Slurm job {self.job_id} (restart {self.restart_count})" if self.job_id else "a trainer (no Slurm job)"
        return f"{job} on host {self.host}, pid {self.pid}"

    def how_to_stop(self) -> str:
        return f"scancel {self.job_id}" if self.job_id else f"kill {self.pid} on {self.host}"


def this_process(heartbeat_s: float, stale_s: float, now: float | None = None) -> Holder:
    """The record this process would hold."""
    now = time.time() if now is None else now
    env = os.environ
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return Holder(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                  heartbeat_s=heartbeat_s, stale_s=stale_s, job_id=env.get("SLURM_JOB_ID") or None,
                  restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
                  launch_id=env.get("TORCHELASTIC_RUN_ID") or None,
                  launch_restart=int(env.get("TORCHELASTIC_RESTART_COUNT") or 0), pid_namespace=pid_ns)


def _pid_gone(pid: int) -> bool:
    """The process no longer exists on this host (a zombie counts as gone: it runs no code)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone else's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z"
    except (OSError, ValueError, IndexError):
        return False


@dataclass(frozen=True)
class Verdict:
    take: bool
    why: str
    watch: bool = False  # an earlier incarnation of this job whose heartbeat is recent: look again


def verdict(holder: Holder, me: Holder, now: float, pid_gone=_pid_gone) -> Verdict:
    """Whether ``me`` may take the lock ``holder`` holds (the rules in the module docstring)."""
    age = now - holder.heartbeat
    if age > holder.stale_s:
        return Verdict(True, f"its last heartbeat was {age:.0f} s ago (stale after {holder.stale_s:g} s)")
    earlier = ((me.job_id is not None and holder.job_id == me.job_id and holder.restart_count < me.restart_count)
               or (me.launch_id is not None and holder.launch_id == me.launch_id
                   and holder.launch_restart < me.launch_restart))
    if earlier:
        if age >= 2 * holder.heartbeat_s:
            return Verdict(True, f"it is an earlier incarnation of this job (restart {holder.restart_count}, "
                                 f"now {me.restart_count}) whose heartbeat stopped {age:.0f} s ago")
        return Verdict(False, "an earlier incarnation of this job, still beating", watch=True)
    if holder.host == me.host and holder.pid_namespace == me.pid_namespace and holder.pid != me.pid \
            and pid_gone(holder.pid):
        return Verdict(True, f"its process {holder.pid} on this host is gone")
    return Verdict(False, "it is alive")


def _read(path: Path, fallback: Holder) -> tuple[Holder | None, bytes]:
    """(holder, raw bytes); (None, b"") when there is no lock. A record that cannot be parsed
    (damaged, or a fallback create caught mid-write) is judged by its file's age, with this
    process's thresholds."""
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None, b""
    try:
        return Holder.from_json(raw.decode()), raw
    except (ValueError, TypeError, UnicodeDecodeError):
        return replace(fallback, token="", host="?", pid=-1, started=mtime, heartbeat=mtime, job_id=None,
                       launch_id=None, pid_namespace=None), raw


def _create(path: Path, me: Holder) -> bool:
    """Make ``path`` hold ``me`` unless it exists; True when this process made it."""
    tmp = path.with_name(f".{path.name}.{me.token}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me.to_json())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return tmp.stat().st_nlink == 2  # NFS: the first try made it, a retried RPC reported EEXIST
        except OSError as e:
            if tmp.stat().st_nlink == 2:
                return True
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        try:  # a file system without hard links
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me.to_json())
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, raw: bytes, me: Holder, sleep) -> None:
    """Remove the lock judged from ``raw``, and only that one. Racing trainers that all judged it
    dead would otherwise remove each other's new lock: the removal happens under a short-lived
    mutex (``train.lock.takeover``, made by the same link recipe), after checking that the lock is
    still the one judged. A mutex left by a trainer killed in those milliseconds is removed once
    it is a minute old."""
    mutex = path.with_name(path.name + ".takeover")
    if not _create(mutex, me):
        try:
            if time.time() - mutex.stat().st_mtime > _MUTEX_STALE_S:
                mutex.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        sleep(0.1)  # another trainer is taking it over: judge its result next
        return
    try:
        try:
            if path.read_bytes() == raw:
                path.unlink()
        except FileNotFoundError:
            pass
    finally:
        mutex.unlink(missing_ok=True)


def refusal(path: Path, holder: Holder, now: float) -> str:
    """The one line a second trainer gets."""
    if not holder.token:
        return (f"run dir {path.parent} is locked by {path}, which cannot be read (last changed "
                f"{now - holder.heartbeat:.0f} s ago). Nothing in the run dir was changed. If no trainer is running "
                f"on this run dir, remove {path}; an unreadable lock is taken over {holder.stale_s:g} s after its "
                "last change.")
    return (f"run dir {path.parent} is in use by {holder.who()}: its lock {path} was taken "
            f"{now - holder.started:.0f} s ago, last heartbeat {now - holder.heartbeat:.0f} s ago. Nothing in the "
            f"run dir was changed. Wait for that trainer to finish, or stop it ({holder.how_to_stop()}); if it "
            f"is really dead, remove {path} (a lock whose heartbeat stops is taken over after "
            f"{holder.stale_s:g} s).")


def acquire(run_dir: Path, heartbeat_s: float, stale_s: float, log=print, clock=time.time,
            sleep=time.sleep) -> RunLock:
    """Take the run dir's lock for this process (no collectives; ``hold`` is the trainer's entry
    point) and start its heartbeat. Raises RunDirLocked naming the holder."""
    made_dir = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = this_process(heartbeat_s, stale_s, clock())
    for _ in range(_ATTEMPTS):
        holder, raw = _read(path, me)
        if holder is None:
            if _create(path, me):
                lock = RunLock(path, me, log)
                lock.made_dir = made_dir
                return lock.start()
            continue  # another trainer made it between the read and the link: judge that one
        decision = verdict(holder, me, clock())
        if decision.watch:
            decision = _watch(path, holder, me, clock, sleep)
            if decision is None:
                continue  # the lock changed hands while watching: start over
        if not decision.take:
            raise RunDirLocked(refusal(path, holder, clock()))
        _take_over(path, raw, me, sleep)
        if not path.exists():
            what = holder.who() if holder.token else "an unreadable lock"
            log(f"[lock] warning: taking over {path} from {what}: {decision.why}.")
    raise RunDirLocked(f"could not take {path}: it changed hands {_ATTEMPTS} times while trying (several "
                       "trainers starting on one run dir at once?). Make sure only one job uses the run dir, then retry.")


def _watch(path: Path, holder: Holder, me: Holder, clock, sleep) -> Verdict | None:
    """An earlier incarnation of this job with a recent heartbeat: wait for it to miss two beats
    (taken over) or to beat again (alive: refused). None when the lock changed hands meanwhile."""
    deadline = holder.heartbeat + 2 * holder.heartbeat_s
    while clock() < deadline:
        sleep(min(1.0, holder.heartbeat_s / 4))
        now_holder, _ = _read(path, me)
        if now_holder is None or now_holder.token != holder.token:
            return None
        if now_holder.heartbeat != holder.heartbeat:
            return Verdict(False, "an earlier incarnation of this job that is still running")
    return verdict(holder, me, max(clock(), deadline))


class RunLock:
    """A held ``train.lock`` with its heartbeat thread (rank 0), or a stand-in on other ranks."""

    def __init__(self, path: Path | None, me: Holder | None, log=print):
        self.path, self.me, self.log = path, me, log
        self.lost: str | None = None  # set by the heartbeat when another trainer took the lock
        self.made_dir = False  # the lock created the run dir: a refused start leaves no empty dir behind
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RunLock:
        self._thread = threading.Thread(target=self._beat, name="norallm-run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        complained = False
        while not self._stop.wait(self.me.heartbeat_s):
            try:
                self.refresh()
                complained = False
            except OSError as e:  # a file-system hiccup: say so once, keep trying
                if not complained:
                    print(f"[lock] warning: could not refresh {self.path} ({e}); retrying every "
                          f"{self.me.heartbeat_s:g} s", file=sys.stderr, flush=True)
                    complained = True
            if self.lost:
                return

    def refresh(self, now: float | None = None) -> None:
        """One heartbeat: rewrite the record with the current time, if it is still ours."""
        current, _ = _read(self.path, self.me)
        if current is None:  # removed by hand while this trainer runs: put it back if nobody took it
            if _create(self.path, replace(self.me, heartbeat=time.time() if now is None else now)):
                print(f"[lock] warning: {self.path} was removed while this trainer holds it; recreated",
                      file=sys.stderr, flush=True)
                return
            current, _ = _read(self.path, self.me)
        if current is None or current.token != self.me.token:
            self.lost = (f"another trainer took over {self.path} while this one ran "
                         f"({current.who() if current and current.token else 'unknown holder'}): this trainer "
                         "stops without saving, so as not to overwrite its checkpoints. Make sure only one job uses "
                         "the run dir (or raise checkpoint.lock_stale_s if this one hung that long).")
            print(f"[lock] error: {self.lost}", file=sys.stderr, flush=True)
            return
        self.me = replace(self.me, heartbeat=time.time() if now is None else now)
        tmp = self.path.with_name(f".{self.path.name}.{self.me.token}.beat")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.me.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def verify(self) -> None:
        """Collective: raise on every rank when rank 0's lock was taken over (before a save)."""
        from training import distributed  # (here, so that the lock itself needs no torch)

        lost = distributed.broadcast_object(self.lost)
        if lost:
            raise RunDirLocked(lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this trainer's."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        current, _ = _read(self.path, self.me)
        if current is not None and current.token == self.me.token:
            self.path.unlink(missing_ok=True)
        if self.made_dir:  # a start refused before it wrote anything (e.g. by training.resume_check)
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                self.path.parent.rmdir()


def hold(run_dir: Path, heartbeat_s: float, stale_s: float) -> RunLock:
    """Collective: rank 0 takes the run dir's lock (``acquire``), every rank gets its decision;
    a refusal is raised on every rank with the same message."""
    from training import distributed

    lock, refused = RunLock(None, None), None
    if distributed.rank() == 0:
        try:
            lock = acquire(Path(run_dir), heartbeat_s, stale_s)
        except RunDirLocked as e:
            refused = str(e)
        except OSError as e:
            refused = (f"cannot lock run dir {run_dir} ({e.strerror or e}); fix its permissions or quota, or choose "
                       "another --run-dir.")
    refused = distributed.broadcast_object(refused)
    if refused:
        raise RunDirLocked(refused)
    return lock
