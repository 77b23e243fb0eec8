"""Multi-node facts that need no cluster: lost ranks found and named (training.liveness), the
collective timeout reaching DeepSpeed's own process groups, and JIT builds that never take another
node's live build lock for a stale one (training.distributed). The jobs on two real Slurm nodes:
tests/test_multinode.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from training import distributed, liveness

REPO = Path(__file__).resolve().parents[1]


class FakeStore:
    """The two TCPStore calls a heartbeat makes, on a dict; ``down`` makes them fail as a store
    on a lost node does (a timeout)."""

    def __init__(self):
        self.values: dict[str, int] = {}
        self.down = False

    def add(self, key: str, amount: int) -> int:
        if self.down:
            raise RuntimeError("Socket Timeout")
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        if self.down:
            raise RuntimeError("Socket Timeout")
        return [str(self.values[k]).encode() for k in keys]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


HOSTS = ["node1", "node1", "node2", "node2"]


def cluster(timeout_s: float = 60) -> tuple[FakeStore, Clock, list[liveness.Heartbeat]]:
    store, clock = FakeStore(), Clock()
    beats = [liveness.Heartbeat(store, r, HOSTS, timeout_s, clock) for r in range(len(HOSTS))]
    for hb in beats:
        hb.beat()
    return store, clock, beats


def test_a_node_whose_heartbeats_stop_is_named_after_the_timeout_and_not_before():
    store, clock, beats = cluster()
    for _ in range(5):  # everyone beats: nothing is lost, however long it runs
        clock.now += 10
        assert all(hb.round() is None for hb in beats)
    # node2 goes silent after its beats at 1050 s, which rank 0 reads at 1060 s (a counter's time
    # is when this rank saw it move: the timeout plus one read interval at most)
    for _ in range(7):
        clock.now += 10
        assert beats[0].round() is None and beats[1].round() is None
    clock.now += 10
    assert beats[0].round() == "node2 (ranks 2, 3): no heartbeat for 60 s"


def test_one_silent_rank_of_a_node_whose_other_ranks_answer_is_named_with_its_host():
    store, clock, beats = cluster()
    for _ in range(8):  # rank 3's counter moved last when first read, at 1010 s
        clock.now += 10
        found = [hb.round() for hb in beats[:3]]
    assert found[0] == "rank 3 on node2: no heartbeat for 60 s" == found[2]


def test_a_store_that_stops_answering_is_the_first_node_lost(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node1")
    store, clock, beats = cluster()
    store.down = True
    clock.now += 50
    assert beats[2].round() is None  # a slow store is not a lost node
    clock.now += 20
    assert beats[2].round().startswith("node1 (the first node, which holds the rendezvous store) stopped answering")


def test_rank_map_lists_each_hosts_ranks_as_ranges():
    assert liveness.rank_map(["a", "a", "b", "b", "a"]) == "a: 0-1,4; b: 2-3"
    assert liveness.rank_map([f"n{i // 2}" for i in range(40)], limit=2) == "n0: 0-1; n1: 2-3; … 18 more hosts"


def test_a_collective_broken_by_a_dead_peer_becomes_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:538] Connection closed by peer "
                         "[127.0.0.1]:47311")
    failure = liveness.peer_failure(error, 0, ["localhost", "localhost"], 3600)
    assert failure == liveness.PeerFailure(
        "rank 0 on localhost: lost the connection to localhost (127.0.0.1): that rank's process ended; its own "
        "log says why", 2, True)
    stuck = liveness.peer_failure(RuntimeError("[gloo] Timed out waiting 3600000ms for recv operation to complete"),
                                  1, ["a", "b"], 3600)
    assert stuck.message.startswith("rank 1 on b: a collective waited longer than train.collective_timeout_s = 3600 s")
    assert liveness.peer_failure(RuntimeError("CUDA out of memory"), 0, ["a"], 60) is None  # not ours to explain


def test_the_watchdog_names_the_lost_rank_ends_the_batch_step_and_exits_for_requeue(tmp_path):
    """A real TCPStore and a rank process whose peer never beats: within the timeout it prints the
    line once, sends SIGUSR2 to the batch script of its node and exits EXIT_NODE_LOST."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    store.add("norallm/liveness/beat/1", 1)  # rank 1's first beat (before the barrier), then silence
    batch = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for the batch shell
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           liveness.BATCH_PID: str(batch.pid), liveness.BATCH_HOST: socket.gethostname()}
    code = ("from training import liveness; from training.checkpoint import run_lock; import time, pathlib\n"
            f"lock = run_lock.hold(pathlib.Path({str(tmp_path / 'run')!r}), 30, 300)\n"
            "liveness.before_exit(lock.release)\n"
            "liveness.start(0, ['node1', 'node2'], 3, barrier=lambda: None)\n"
            "time.sleep(60)\n")
    (tmp_path / "run").mkdir()  # a run dir of earlier jobs (one the lock creates is removed again if left empty)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    took_s = time.monotonic() - t0
    if proc.returncode != liveness.EXIT_NODE_LOST:
        batch.kill()
    assert proc.returncode == liveness.EXIT_NODE_LOST, proc.stderr
    batch.wait(timeout=10)
    assert proc.stderr.count("error: lost node2 (rank 1): no heartbeat for 3 s (train.heartbeat_timeout_s)") == 1
    assert "Traceback" not in proc.stderr and batch.returncode == -signal.SIGUSR2
    assert took_s < 50  # far from the sleep: the watchdog ended it
    assert store.get("norallm/liveness/lost").decode().startswith("lost node2 (rank 1)")
    # the run-dir lock goes with the rank: the next job, on any node, takes the run dir at once
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").glob("train.lock*"))


def test_the_collective_timeout_reaches_the_groups_deepspeed_creates(tmp_path):
    """torch gives a group made by new_group() its own 30-minute default, not the default group's
    timeout; DeepSpeed's data-parallel groups are made so. A lost-but-silent peer would hang ZeRO's
    gradient reduction for 30 minutes whatever train.collective_timeout_s said."""
    code = ("import torch, torch.distributed as dist\n"
            "from training import distributed\n"
            "distributed.init(collective_timeout_s=77)\n"
            "from deepspeed.utils import groups\n"
            "def timeout(g): return g._get_backend(torch.device('cpu')).options._timeout.total_seconds()\n"
            "print(timeout(dist.group.WORLD), timeout(dist.new_group([0])), timeout(groups._clone_world_group()))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["77.0", "77.0", "77.0"]


class FakeBuilder:
    NAME = "fake_op"

    def __init__(self, loads: list):
        self.loads = loads

    def is_compatible(self, verbose=False) -> bool:
        return True

    def load(self, verbose=False) -> None:
        self.loads.append(os.environ["TORCH_EXTENSIONS_DIR"])


def test_a_build_dir_shared_by_nodes_never_loses_another_nodes_live_lock(tmp_path, monkeypatch):
    """TORCH_EXTENSIONS_DIR on a shared file system where flock is not honoured (Lustre may ignore
    it): another node is building the op (its torch lock file exists). This node must neither
    remove that lock as stale nor build into the same dir."""
    import fcntl

    import deepspeed.accelerator

    shared = tmp_path / "shared-extensions"
    live = shared / "fake_op" / "lock"
    live.parent.mkdir(parents=True)
    live.write_text("")  # node A's build in progress
    loads: list[str] = []

    class Accelerator:
        def create_op_builder(self, name):
            return FakeBuilder(loads)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(shared))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)  # not honoured
    distributed.build_ops_once_per_node(("FakeBuilder",), shared_by_hosts=True)
    assert live.exists(), "another node's live build lock was removed as stale"
    assert loads == [str(shared / socket.gethostname())]  # this host builds in its own dir
    assert not str(distributed._node_local_lock(shared / "fake_op")).startswith(str(shared))


@pytest.mark.parametrize("hosts, expected", [(["n1", "n2"], "n2 (rank 1)"), (["n1", "n1", "n2"], "rank 1 on n1")])
def test_describe(hosts, expected):
    assert liveness.describe([1], hosts) == expected
