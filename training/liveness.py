"""Lost ranks and lost nodes: found within ``train.heartbeat_timeout_s``, named in one line, and the
job ended for requeue, whatever collective the other ranks are waiting in.

A node that loses power or its network sends nothing, not even a TCP reset: the ranks waiting for
it in an all-reduce or a barrier would wait for the collective timeout, which must be long (a 7B
save or its universal conversion keeps the other ranks at a barrier for minutes), and Slurm's
``srun`` waits for the dead node's tasks until slurmctld declares the node down (``SlurmdTimeout``,
a site setting, often 300 s). So every rank beats a counter in the launch's TCPStore (the one at
MASTER_ADDR:MASTER_PORT: rank 0's under srun, torchrun's agent on the first node under torchrun)
from a daemon thread, every ``timeout / 6`` seconds, and reads all counters in one request. A
counter that has not moved for the timeout is a lost rank (the wait is measured on this rank's
own clock, so clock skew between nodes does not matter); a store that has not answered for the
timeout is a lost first node. The first rank to notice prints one line naming the lost node(s)
and ranks (``rank → host`` was gathered at start-up) and leaves it in the store for the others;
every surviving rank exits with ``EXIT_NODE_LOST``, and a rank on the node of the batch script
(``NORALLM_BATCH_HOST``) sends it SIGUSR2, which ends the step there and then (the script kills
the hung ``srun``) and requeues the job: the next run resumes from ``checkpoints/latest``.

A rank whose process died while its node lives (a crash, the OOM killer) closes its connections:
the others' collectives fail at once, and ``peer_failure`` turns that error into one line naming
the peer instead of a traceback on every rank (exit 2: a crash is not requeued, it would repeat).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from norallm.exits import EXIT_NODE_LOST, EXIT_USER_ERROR

_KEY = "norallm/liveness"
BATCH_PID, BATCH_HOST = "NORALLM_BATCH_PID", "NORALLM_BATCH_HOST"  # exported by slurm/train.sbatch


def describe(lost: list[int], hosts: list[str]) -> str:
    """``node2 (ranks 2, 3)``, or ``rank 3 on node2`` when the host's other ranks still answer."""
    by_host: dict[str, list[int]] = {}
    for r in lost:
        by_host.setdefault(hosts[r], []).append(r)
    parts = []
    for host, ranks in by_host.items():
        whole = len(ranks) == hosts.count(host)
        listed = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
        parts.append(f"{host} (rank{'s' if len(ranks) > 1 else ''} {listed})" if whole
                     else f"rank{'s' if len(ranks) > 1 else ''} {listed} on {host}")
    return ", ".join(parts)


def rank_map(hosts: list[str], limit: int = 16) -> str:
    """``node1: 0-7, node2: 8-15`` (the ranks of each host, as ranges), for the start-up line."""
    ranges: dict[str, list[list[int]]] = {}
    for r, host in enumerate(hosts):
        spans = ranges.setdefault(host, [])
        if spans and spans[-1][1] == r - 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    items = [f"{host}: " + ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
             for host, spans in ranges.items()]
    return "; ".join(items[:limit]) + (f"; … {len(items) - limit} more hosts" if len(items) > limit else "")


class Heartbeat:
    """One rank's beats and its view of everyone else's (``round()``), without the thread: the
    watchdog calls ``round()`` periodically; tests call it with their own clock."""

    def __init__(self, store, rank: int, hosts: list[str], timeout_s: float, clock=time.monotonic):
        self.store, self.rank, self.hosts, self.timeout_s, self.clock = store, rank, hosts, timeout_s, clock
        self.keys = [f"{_KEY}/beat/{r}" for r in range(len(hosts))]
        now = clock()
        self.seen = [(-1, now)] * len(hosts)  # (counter, when it last moved on our clock)
        self.store_ok = now

    def beat(self) -> None:
        """Announce this rank (called once by every rank before any of them reads the others)."""
        self.store.add(self.keys[self.rank], 1)

    def round(self) -> str | None:
        """Beat, read everyone's counters; a description of what is lost, or None."""
        now = self.clock()
        try:
            self.store.add(self.keys[self.rank], 1)
            counters = [int(v) for v in self.store.multi_get(self.keys)]
            self.store_ok = now
        except (RuntimeError, OSError, ValueError):  # the store's host did not answer in time
            if now - self.store_ok > self.timeout_s:
                master = os.environ.get("MASTER_ADDR", "?")
                return (f"{master} (the first node, which holds the rendezvous store) stopped answering "
                        f"{now - self.store_ok:.0f} s ago")
            return None
        for r, value in enumerate(counters):
            if value != self.seen[r][0]:
                self.seen[r] = (value, now)
        lost = [r for r, (_, moved) in enumerate(self.seen) if r != self.rank and now - moved > self.timeout_s]
        if not lost:
            return None
        return f"{describe(lost, self.hosts)}: no heartbeat for {self.timeout_s:.0f} s"

    def claim_report(self, node_lost: str | None = None) -> bool:
        """True for the one rank that should print the failure; a lost node's description is left
        for the other ranks (``peer_failure``), which then exit without a word."""
        try:
            if node_lost is not None:
                self.store.set(f"{_KEY}/lost", node_lost)
            return self.store.add(f"{_KEY}/reported", 1) == 1
        except (RuntimeError, OSError):  # no store (the first node is the lost one): one line per node
            return int(os.environ.get("LOCAL_RANK", "0")) == 0


_watchdog: tuple[threading.Thread, threading.Event, Heartbeat] | None = None


def lost_message(what: str) -> str:
    return (f"lost {what} (train.heartbeat_timeout_s); stopping this job so that it is requeued: the next "
            "run resumes from checkpoints/latest")


_before_exit: list = []


def before_exit(fn) -> None:
    """Run ``fn()`` when the watchdog ends this rank for a lost node (``os._exit`` skips ``finally``
    and atexit): the trainer releases its run-dir lock here, so the next job (requeued, or
    resubmitted on other nodes) does not wait for the lock's heartbeat to go stale."""
    _before_exit.append(fn)


def _run_before_exit() -> None:
    for fn in _before_exit:
        try:
            fn()
        except Exception:  # noqa: BLE001 - leaving is what matters now; the lock then goes stale
            pass


def start(rank: int, hosts: list[str], timeout_s: float, barrier) -> None:
    """Beat for this rank and watch the others from a daemon thread (``timeout_s`` 0: off, as is a
    one-host launch, where a lost host ends the whole job anyway). Collective: every rank beats
    once before ``barrier()``, so no rank reads a counter before it exists."""
    global _watchdog
    if not timeout_s or len(set(hosts)) < 2:
        return
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=max(5.0, timeout_s / 4)))
    hb = Heartbeat(store, rank, hosts, timeout_s)
    hb.beat()
    barrier()
    stop_event = threading.Event()

    def watch() -> None:
        while not stop_event.wait(timeout_s / 6):
            try:
                what = hb.round()
            except Exception:  # noqa: BLE001 - the watchdog must never end a healthy run
                continue
            if what is not None and not stop_event.is_set():
                message = lost_message(what)
                if hb.claim_report(node_lost=message):
                    print(f"error: {message}", file=sys.stderr, flush=True)
                    time.sleep(2)  # srun forwards the line before the batch script ends it (end_step)
                _run_before_exit()
                end_step()
                sys.stdout.flush()
                os._exit(EXIT_NODE_LOST)  # the main thread is stuck in a collective with the lost rank

    thread = threading.Thread(target=watch, name="norallm-heartbeat", daemon=True)
    thread.start()
    _watchdog = (thread, stop_event, hb)


def stop() -> None:
    """Stop watching (after the final barrier: ranks that are done no longer beat)."""
    global _watchdog
    if _watchdog is not None:
        _watchdog[1].set()
        _watchdog = None


def end_step() -> None:
    """On the batch script's node: SIGUSR2 to it, so that it ends the step now and requeues the
    job, instead of waiting in ``srun`` until Slurm declares the lost node down."""
    pid, host = os.environ.get(BATCH_PID), os.environ.get(BATCH_HOST)
    if pid and host == socket.gethostname():
        try:
            os.kill(int(pid), signal.SIGUSR2)
        except (ProcessLookupError, PermissionError, ValueError):
            pass  # another PID namespace (a container without the host's): Slurm ends the job later


@dataclass(frozen=True)
class PeerFailure:
    """What a rank whose collective failed prints (when ``report``) and exits with."""

    message: str
    exit_code: int
    report: bool


_PEER_ERROR = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Timed out waiting|[Cc]onnection refused|"
                         r"NCCL (error|communicator was aborted)|DistNetworkError|DistBackendError")
_ADDRESS = re.compile(r"\[(\d+\.\d+\.\d+\.\d+|[0-9a-fA-F:]+)\]:\d+")


def peer_failure(error: BaseException, rank: int, hosts: list[str], collective_timeout_s: float) -> PeerFailure | None:
    """The one line for a collective that failed because another rank went away (None: it did
    not, and the error stays as it is). A node loss another rank has reported is not reported
    again: this rank exits with ``EXIT_NODE_LOST`` quietly."""
    text = f"{type(error).__name__}: {error}"
    if not _PEER_ERROR.search(text):
        return None
    here = f"rank {rank} on {hosts[rank] if rank < len(hosts) else socket.gethostname()}"
    watch = _watchdog[2] if _watchdog is not None else None
    if watch is not None:
        try:
            watch.store.set_timeout(timedelta(seconds=5))
            if watch.store.check([f"{_KEY}/lost"]):
                end_step()
                return PeerFailure(watch.store.get(f"{_KEY}/lost").decode(), EXIT_NODE_LOST, report=False)
        except (RuntimeError, OSError):
            pass
    if "Timed out waiting" in text:
        what = (f"a collective waited longer than train.collective_timeout_s = {collective_timeout_s:.0f} s: a rank "
                "is stuck while its heartbeat goes on (a hung file system, a deadlock); its log says where")
    else:
        peers = sorted({_host_of(a, hosts) for a in _ADDRESS.findall(text)})
        who = ", ".join(peers) if peers else "another rank"
        what = f"lost the connection to {who}: that rank's process ended; its own log says why"
    report = watch.claim_report() if watch is not None else int(os.environ.get("LOCAL_RANK", "0")) == 0
    return PeerFailure(f"{here}: {what}", EXIT_USER_ERROR, report)


def _host_of(address: str, hosts: list[str]) -> str:
    for host in dict.fromkeys(hosts):
        try:
            if address in socket.gethostbyname_ex(host)[2]:
                return f"{host} ({address})"
        except OSError:
            continue
    return address
