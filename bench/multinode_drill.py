"""Node-loss drill: a 2-node training job on a private 3-node Slurm (network namespaces,
tests/netns_slurm.py) loses one of its nodes at a random moment of training; the job must end
within a bounded time, requeue, resume on two nodes and end with the uninterrupted run's metrics.

    python bench/multinode_drill.py --trials 10     # as root; prints "k of N identical", writes JSON

Each trial submits the job (srun and torchrun launch modes in turn), waits until a random step
of training has been logged and a random fraction of a step more (a checkpoint every 10 steps, so
some losses fall into saves), then cuts one of the job's two nodes (chosen at random) off the
network and SIGKILLs everything on it. Measured: seconds from the loss to the job's end (Slurm no longer runs
it and nothing of it is left on the surviving node). A lost second node is found by the ranks'
heartbeats (train.heartbeat_timeout_s); a lost first node takes the batch script and the
rendezvous store with it, so only Slurm can end the job: SlurmdTimeout (here --slurmd-timeout-s).
The node then comes back, the requeued job is started at once (its BeginTime skipped) and runs to
the end; its metrics.jsonl (loss, grad norm, lr, tokens per step) must equal a `torchrun
--standalone` run of the same config bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from netns_slurm import NetnsSlurm  # noqa: E402

from training.config import parse_config  # noqa: E402
from training.data.pretraining import run_prepare  # noqa: E402


def config(root: Path, steps: int, heartbeat_s: int) -> dict:
    corpus = REPO / "data_pipeline" / "smoke_corpus"
    return {
        "name": "node-drill", "seed": 5,
        "model": {"flavor": "tiny-mistral"},
        "tokenizer": {"path": str(root / "tokenizer"), "train": True, "vocab_size": 512},
        "data": {"sources": [{"name": "nob", "paths": [str(corpus / "nob.jsonl")]},
                             {"name": "nno", "paths": [str(corpus / "nno.jsonl")]}],
                 "shards_dir": str(root / "shards"), "seq_len": 32, "valid_fraction": 0.1},
        "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": steps, "lr": 1e-3,
                  "warmup_steps": 5, "schedule": "cosine", "precision": "fp32", "heartbeat_timeout_s": heartbeat_s},
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": 10, "keep_last": 2},
        "eval": {"every_steps": 0, "max_samples": 4},
    }


def rows(run: Path) -> list[tuple]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens"]) for r in map(json.loads, filter(None, lines))]


def wait(what: str, ready, timeout_s: float) -> float:
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - t0


def submit(cluster: NetnsSlurm, cfg: Path, run: Path, mode: str) -> str:
    ext = os.environ.get("TORCH_EXTENSIONS_DIR")
    cmd = [sys.executable, "-m", "training.cli", "submit", str(cfg), "--cluster", "local", "--nodes", "2",
           "--launcher", mode, "--run-dir", str(run), *(["--set", f"slurm.env.TORCH_EXTENSIONS_DIR={ext}"] if ext else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=cluster.env(), check=True).stdout
    return re.findall(r"submitted \w+ job (\d+)", out)[0]


def trial(cluster: NetnsSlurm, cfg: Path, run: Path, mode: str, rng: random.Random, steps: int) -> dict:
    job = submit(cluster, cfg, run, mode)
    at = rng.randrange(1, steps - 10)
    wait(f"step {at}", lambda: len(rows(run)) >= at, 600)
    time.sleep(rng.uniform(0, 0.3))  # somewhere inside a step (or a save)
    nodes = cluster.run("scontrol", "show", "hostnames", cluster.job_fields(job)["NodeList"]).stdout.split()
    victim = rng.choice(nodes)
    survivor = next(n for n in nodes if n != victim)
    steps_before = len(rows(run))
    if cluster.job_state(job)[0] != "RUNNING":
        raise RuntimeError(f"job {job} ended before the node loss ({cluster.job_state(job)}); lower the delay")
    cluster.kill_node(victim)
    t_loss = time.monotonic()

    def ended() -> bool:
        left = [p for p in cluster.node_pids(survivor) if p != cluster.procs[f"slurmd-{survivor}"].pid]
        return cluster.job_state(job)[0] != "RUNNING" and not left

    wait("job end after the node loss", ended, 900)
    end_s = time.monotonic() - t_loss
    log = "\n".join(p.read_text(errors="replace") for p in sorted((run / "slurm").glob("*.out")))
    named = f"error: lost {victim} (rank" in log
    cluster.revive_node(victim)
    wait("the requeue", lambda: cluster.job_fields(job).get("JobState") == "PENDING", 600)
    wait("idle nodes", cluster.idle, 120)
    time.sleep(2)  # slurmd refuses a launch credential not newer than the last kill (1 s resolution)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    wait("the resumed job to finish", lambda: cluster.job_state(job)[0] in ("COMPLETED", "FAILED", "CANCELLED"), 900)
    return {"job": job, "mode": mode, "lost": victim, "first_node": victim == nodes[0], "steps_before": steps_before,
            "end_s": round(end_s, 1), "named": named, "state": cluster.job_state(job)[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--heartbeat-s", type=int, default=20, help="train.heartbeat_timeout_s of the job")
    ap.add_argument("--slurmd-timeout-s", type=int, default=60, help="the cluster's SlurmdTimeout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "multinode_drill.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="norallm-node-drill-"))
    work.chmod(0o755)  # munged (user munge) must reach its socket dir under it
    raw = config(work, args.steps, args.heartbeat_s)
    prepared = parse_config(raw)
    run_prepare(prepared.tokenizer, prepared.data, progress=False)
    cfg = work / "drill.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    reference = work / "reference"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "training.cli", "train", str(cfg), "--run-dir", str(reference)],
                   cwd=REPO, check=True, capture_output=True)
    want = rows(reference)
    rng = random.Random(args.seed)
    cluster = NetnsSlurm(work / "slurm", nodes=3, slurmd_timeout_s=args.slurmd_timeout_s).start()
    results = []
    try:
        for i in range(args.trials):
            run = work / f"trial{i:02d}"
            info = trial(cluster, cfg, run, ("srun", "torchrun")[i % 2], rng, args.steps)
            info["identical"] = rows(run) == want
            results.append(info)
            print(f"trial {i + 1:2d} ({info['mode']}): lost {info['lost']}{' (first node)' if info['first_node'] else ''}"
                  f" after {info['steps_before']} steps → job ended in {info['end_s']} s"
                  f"{', named' if info['named'] else ''}; resumed {'identical' if info['identical'] else 'DIFFERENT'}",
                  flush=True)
            shutil.rmtree(run, ignore_errors=True)
    finally:
        cluster.stop()
    identical = sum(r["identical"] for r in results)
    second = [r["end_s"] for r in results if not r["first_node"]]
    first = [r["end_s"] for r in results if r["first_node"]]

    def spread(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.1f} s, max {max(xs):.1f} s" if xs else "none"

    summary = {"trials": args.trials, "identical": identical, "steps": args.steps, "heartbeat_timeout_s": args.heartbeat_s,
               "slurmd_timeout_s": args.slurmd_timeout_s,
               "second_node_lost": {"n": len(second), "end_s": second,
                                    "named": sum(r["named"] for r in results if not r["first_node"])},
               "first_node_lost": {"n": len(first), "end_s": first}, "results": results}
    print(f"{identical} of {args.trials} identical; node loss → job end: second node ({len(second)}) {spread(second)} "
          f"(heartbeat {args.heartbeat_s} s, named {summary['second_node_lost']['named']} of {len(second)}), "
          f"first node ({len(first)}) {spread(first)} (SlurmdTimeout {args.slurmd_timeout_s} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
