"""Two nodes for real: jobs through `norallm submit --cluster local --nodes 2` on a private Slurm
whose nodes are network namespaces with their own addresses and host names (tests/netns_slurm.py).

- srun mode (one task per rank): ranks on both nodes, a time-limit warning (USR1 to the batch
  shell, as ``--signal=B:USR1`` sends it) saves, exits 42 and requeues, and the continuation on
  two nodes equals a ``--standalone`` run of the same config bit for bit;
- torchrun mode (one torchrun per node, c10d): a node dies mid-run (link cut, every process
  killed). The job ends within ``train.heartbeat_timeout_s`` and a few seconds, one line names
  the lost node, the job requeues, and the next run resumes on one node (fewer ranks, same global
  batch) through the universal checkpoint: every global sample is read exactly once;
- preflight across nodes names the node that cannot read the data.

Like the Slurm tests they skip only where the machine cannot host the cluster and CI is unset;
under CI they must run. Longer node-loss drills: bench/multinode_drill.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from launch import launch_torchrun
from netns_slurm import NetnsSlurm, missing_capabilities
from slurm_fixture import missing_programs
from test_slurm import (  # noqa: F401 - data_root is a fixture
    IN_CI,
    data_root,
    job_ended,
    job_log,
    latest_step,
    read_jsonl,
    requeued,
    signal_requeue_and_finish,
    submit,
    tiny_config,
    trajectory,
    wait_for,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 40
HEARTBEAT_S = 20  # train.heartbeat_timeout_s in these jobs (default 120)
GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def cluster():
    why = f"missing {missing_programs()}" if missing_programs() else missing_capabilities()
    if why:
        if IN_CI:
            pytest.fail(f"the multi-node Slurm tests must run under CI, but this machine cannot host them: {why}")
        pytest.skip(f"no multi-node private Slurm: {why}")
    state = Path(tempfile.mkdtemp(prefix="norallm-netns-slurm-"))
    c = NetnsSlurm(state, nodes=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def config(data_root, tmp_path_factory) -> Path:  # noqa: F811
    """World size from the launch (one rank per node), a checkpoint every 10 steps."""
    raw = tiny_config(data_root, world_size=None, max_steps=STEPS, heartbeat_timeout_s=HEARTBEAT_S)
    raw["checkpoint"] = {"every_steps": 10, "keep_last": 3}
    return write_config(tmp_path_factory.mktemp("multinode") / "c.yaml", raw)


@pytest.fixture(scope="module")
def reference(config) -> list[dict]:
    """The same config under `torchrun --standalone --nproc_per_node 2` on one machine."""
    run = config.parent / "reference"
    launch = launch_torchrun("-m", "training.cli", "train", str(config), "--run-dir", str(run), nproc=2)
    assert launch.ok, launch.summary()
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def job_args(run_dir: Path, *args: str) -> list[str]:
    ext = os.environ.get("TORCH_EXTENSIONS_DIR")  # the suite's op cache (each node builds in its own subdir)
    return ["--run-dir", str(run_dir), "--nodes", "2", *args,
            *(["--set", f"slurm.env.TORCH_EXTENSIONS_DIR={ext}"] if ext else [])]


def test_srun_job_on_two_nodes_is_signalled_requeued_and_continues_exactly(cluster, config, reference, tmp_path):
    run = tmp_path / "run"
    (job,) = submit(cluster, config, *job_args(run))
    saved = signal_requeue_and_finish(cluster, job, run, after_steps=15)

    log = job_log(run)
    fields = cluster.job_fields(job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "on 2 node(s), srun mode, 1 rank(s) per node, rendezvous node1:" in log
    assert log.count("[preflight] 2 rank(s) on 2 host(s): all-reduce ok") == 2
    assert log.count("[train] ranks on 2 host(s): node1: 0; node2: 1") == 2
    assert f"[train] signal received: saved step {saved}, exiting with 42" in log
    assert f"(step exit 42): requeueing job {job}" in log and f"[train] resuming at step {saved}" in log
    assert 15 <= saved < STEPS and "Traceback" not in log
    assert trajectory(read_jsonl(run / "metrics.jsonl")) == trajectory(reference)
    # written once by rank 0 after both nodes' shards were on disk: the manifest lists node2's files too
    files = json.loads((run / "checkpoints" / f"step{STEPS:08d}" / "manifest.json").read_text())["files"]
    assert {"rng_rank00000.pt", "rng_rank00001.pt"} <= set(files)
    assert sum("optim_states" in f for f in files) == 2


def read_samples(prefix: Path) -> list[dict]:
    return [row for f in sorted(prefix.parent.glob(prefix.name + ".rank*")) for row in read_jsonl(f)]


def test_lost_node_ends_the_job_and_the_run_resumes_on_one_node_reading_every_sample_once(
        cluster, config, reference, tmp_path):
    """torchrun mode. node2 dies (link down, then SIGKILL to everything on it): rank 0 on node1
    notices within the heartbeat timeout, says so once, the step ends and the job requeues
    itself. The next job gets one node (as when no second one is free): 2 → 1 ranks."""
    run, samples = tmp_path / "run", tmp_path / "samples"
    (job,) = submit(cluster, config, *job_args(run, "--launcher", "torchrun"),
                    env={"NORALLM_TEST_SAMPLE_LOG": str(samples)})
    wait_for("15 logged steps", lambda: len(read_jsonl(run / "metrics.jsonl")) >= 15, cluster, run / "slurm")
    cluster.kill_node("node2")
    t_lost = time.monotonic()

    def ended() -> bool:  # Slurm no longer runs it, and nothing of it is left on node1 (its slurmd alone)
        return cluster.job_state(job)[0] != "RUNNING" and cluster.node_pids("node1") == [
            cluster.procs["slurmd-node1"].pid]

    # without training.liveness the ranks hung until Slurm declared node2 down (SlurmdTimeout)
    wait_for("the job to end after the node loss", ended, cluster, run / "slurm", timeout_s=HEARTBEAT_S + 60)
    print(f"node loss → job ended in {time.monotonic() - t_lost:.1f} s")
    saved = latest_step(run)
    log = job_log(run)
    assert log.count("error: lost node2 (rank 1): no heartbeat for 20 s") == 1, log
    assert f"[slurm] a node was lost: requeueing job {job}" in log and "Traceback" not in log and "Killed" not in log

    cluster.revive_node("node2")
    wait_for("the requeue", lambda: requeued(cluster, job, 1), cluster, run / "slurm", timeout_s=120)
    # The next job gets one node (scontrol update NumNodes= of a requeued job did not hold in
    # Slurm 22.05: the run still got two): the user resubmits with --nodes 1, as after a loss.
    cluster.run("scancel", job)
    wait_for("the nodes to be idle", cluster.idle, cluster, None, timeout_s=60)
    (again,) = submit(cluster, config, *job_args(run, "--launcher", "torchrun", "--nodes", "1"),
                      env={"NORALLM_TEST_SAMPLE_LOG": str(samples)})
    wait_for(f"job {again} to finish", lambda: job_ended(cluster, again), cluster, run / "slurm")
    log = job_log(run)
    fields = cluster.job_fields(again)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert f"{'step' + format(saved, '08d')} was written by 2 ranks, this launch has 1: converting" in log
    assert f"[train] resuming at step {saved}; 1 rank(s)" in log and "[train] ranks on 1 host(s)" in log

    # The data order continues: every global sample of steps 1..STEPS read exactly once, the first
    # `saved` steps by the 2-node run, the rest by the 1-node run, each step its own global batch.
    rows = read_samples(samples)
    final = [r for r in rows if (r["world_size"] == 2) == (r["step"] <= saved)]
    read = sorted(i for r in final for i in range(*r["samples"]))
    assert read == list(range(STEPS * GLOBAL_BATCH))
    for step in range(1, STEPS + 1):
        mine = sorted(i for r in final if r["step"] == step for i in range(*r["samples"]))
        assert mine == list(range((step - 1) * GLOBAL_BATCH, step * GLOBAL_BATCH)), step
    assert max(r["step"] for r in rows if r["world_size"] == 2) > saved  # the lost run had gone past it

    got = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert trajectory(got[:saved]) == trajectory(reference[:saved])  # the two-node part: bit for bit
    # after it, one rank sums the gradients in another order: fp32 data-parallel tolerance (test_reshard)
    assert [(r["lr"], r["tokens"]) for r in got] == [(r["lr"], r["tokens"]) for r in reference]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, reference, strict=True)) <= 1e-5


def test_preflight_across_nodes_names_the_node_that_cannot_read_the_shards(cluster, config, data_root,  # noqa: F811
                                                                          tmp_path):
    """node2 does not see the shards (an empty dir mounted over them there alone, as when a node
    misses a file system): the job stops before training with the rank and host named."""
    empty = tmp_path / "empty"
    empty.mkdir()
    shards = data_root / "shards"
    cluster.in_node("node2", "mount", "--bind", str(empty), str(shards))
    try:
        run = tmp_path / "run"
        (job,) = submit(cluster, config, *job_args(run))
        wait_for(f"job {job} to end", lambda: job_ended(cluster, job), cluster, run / "slurm")
    finally:
        cluster.in_node("node2", "umount", str(shards))
    log = job_log(run)
    assert cluster.job_fields(job)["JobState"] == "FAILED", log
    assert "error: preflight failed on 1 of 2 rank(s):" in log
    assert "rank 1 on node2: " in log and "rank 0 on node1" not in log
    assert "[train]" not in log and "Traceback" not in log


def test_a_node_whose_name_resolves_to_loopback_is_refused_in_one_line(cluster, config, tmp_path):
    """Each node's own name → 127.0.1.1 (Debian's default /etc/hosts line), no GLOO_SOCKET_IFNAME:
    gloo would hand that address to the other node. Before the check every rank waited for the
    collective timeout, then failed with "connectFullMesh failed ... remote=[127.0.1.1]"."""
    master = cluster.addr["node1"]
    procs = []
    for rank, node in enumerate(cluster.nodes):
        hosts = tmp_path / f"hosts-{node}"
        hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {node}\n{master} rendezvous\n")
        env = {**cluster.env(), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "rendezvous", "MASTER_PORT": "29517", "PYTHONPATH": str(REPO)}
        env.pop("GLOO_SOCKET_IFNAME", None)
        cmd = [sys.executable, "-m", "training.cli", "preflight", str(config), "--run-dir", str(tmp_path / "run"),
               "--timeout-s", "100"]
        procs.append(cluster.popen_in_node(node, cmd, hosts, env))
    for node, proc in zip(cluster.nodes, procs, strict=True):
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 2, err[-2000:]
        assert err.strip() == (f"error: this node's name '{node}' resolves to 127.0.1.1 (loopback), which gloo would "
                               "give the other nodes to connect to: set GLOO_SOCKET_IFNAME to the cluster network "
                               "interface (slurm.env, e.g. hsn0 or ib0) or map the name to the node's address."), err
