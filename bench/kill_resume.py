"""Fault drill: kill -9 a tiny 2-rank training at random moments (also during saves), resume, and
check that every final loss trajectory is identical to an uninterrupted run.

    python bench/kill_resume.py --trials 20 --out bench/results/kill_resume.json
    python bench/kill_resume.py --objective hybrid --trials 10 --out bench/results/kill_resume_hybrid.json

It prints "k of N identical" and writes the trials as JSON to --out (by default
runs/bench/kill_resume.json, outside version control; pass bench/results/... to record a result).

Each trial restarts the run until it completes; between restarts the whole process group
(torchrun and its ranks) gets SIGKILL after a random delay. Every third kill is placed inside a
checkpoint save with the NORALLM_TEST_KILL_DURING_SAVE hook (after the shards are written,
before the rename), since a random delay rarely lands in a save window of a few milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.config import parse_config  # noqa: E402
from training.data.pretraining import run_prepare  # noqa: E402


def config(root: Path, steps: int) -> dict:
    corpus = REPO / "data_pipeline" / "smoke_corpus"
    return {
        "name": "drill", "seed": 11,
        "model": {"flavor": "tiny-mistral"},
        "tokenizer": {"path": str(root / "tokenizer"), "train": True, "vocab_size": 512},
        "data": {"sources": [{"name": "nob", "paths": [str(corpus / "nob.jsonl")]},
                             {"name": "nno", "paths": [str(corpus / "nno.jsonl")]}],
                 "shards_dir": str(root / "shards"), "seq_len": 64, "valid_fraction": 0.1},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": steps, "lr": 3e-3,
                  "warmup_steps": 2, "schedule": "cosine", "precision": "fp32"},
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "eval": {"every_steps": 0, "max_samples": 4},
    }


def launch(cfg: Path, run: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.cli", "train", str(cfg), "--run-dir", str(run)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def losses(run: Path) -> list[tuple]:
    """Per step the loss, and for the hybrid objective its causal and masked parts."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [(r["loss"], r.get("loss_causal"), r.get("loss_masked")) for r in rows]


def _logged(run: Path) -> int:
    """Steps in metrics.jsonl (cut back to the checkpoint on resume, then appended)."""
    path = run / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _latest_step(run: Path) -> int:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step")) if pointer.is_file() else 0


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank. torchrun starts each worker in a session of its own, so
    killing torchrun's process group alone left the ranks running as orphans (87 of them, 16 GB,
    after one 20-trial drill) — not what a node failure or scancel does."""
    import psutil

    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    os.killpg(proc.pid, signal.SIGKILL)
    for r in ranks:
        try:
            r.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)


def trial(cfg: Path, run: Path, rng: random.Random, steps: int, duration_s: float) -> dict:
    kills = save_kills = 0
    for attempt in range(50):
        env = dict(os.environ)
        saved = _latest_step(run)
        in_save = attempt < 6 and attempt % 3 == 2 and saved + 2 < steps
        if in_save:  # the next save this attempt will make, or one after it
            env["NORALLM_TEST_KILL_DURING_SAVE"] = str(rng.randrange(saved + 2, steps, 2))
        proc = launch(cfg, run, env)
        if in_save:
            proc.wait()
            if proc.returncode != 0:
                save_kills += 1
                continue
            return {"kills": kills, "save_kills": save_kills}
        deadline = time.monotonic() + (rng.uniform(0.3, duration_s) if attempt < 6 else 1e9)
        # the first kill of a trial (and the fourth) waits for a random step of training to be logged:
        # a delay alone missed every run whenever the reference was slower than the trials (a loaded machine)
        at_step = rng.randrange(saved + 1, steps) if attempt in (0, 3) and saved + 1 < steps else None
        while proc.poll() is None and (time.monotonic() < deadline if at_step is None else _logged(run) < at_step):
            time.sleep(0.05)
        if at_step is not None and proc.poll() is None:
            time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            kill_job(proc)
            kills += 1
            continue
        if proc.returncode == 0:
            return {"kills": kills, "save_kills": save_kills}
        raise RuntimeError(f"a run exited with {proc.returncode} without being killed (see {run})")
    raise RuntimeError("no completion after 50 attempts")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="interrupted runs to compare (default 20)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times (default 0)")
    ap.add_argument("--objective", choices=["causal", "hybrid"], default="causal",
                    help="train.objective of the drilled run (hybrid: 30 %% masked samples, their parts compared too)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "kill_resume.json",
                    help="results JSON (default runs/bench/kill_resume.json)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="norallm-drill-"))
    raw = config(work, args.steps)
    if args.objective == "hybrid":
        raw["tokenizer"]["extra_special_tokens"] = ["<mask>"]
        raw["data"]["document_boundaries"] = True
        raw["train"].update(objective="hybrid", hybrid={"masked_fraction": 0.3})
    prepared = parse_config(raw)
    run_prepare(prepared.tokenizer, prepared.data, progress=False)
    cfg = work / "drill.yaml"
    cfg.write_text(yaml.safe_dump(raw))

    t0 = time.monotonic()
    reference = work / "reference"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "training.cli", "train", str(cfg), "--run-dir", str(reference)],
                   cwd=REPO, check=True, capture_output=True)
    duration = time.monotonic() - t0
    want = losses(reference)
    rng = random.Random(args.seed)
    results = []
    for i in range(args.trials):
        run = work / f"trial{i:02d}"
        info = trial(cfg, run, rng, args.steps, duration)
        got = losses(run)
        info.update(identical=got == want, steps=len(got))
        results.append(info)
        print(f"trial {i + 1:2d}: {info['kills']} random kills, {info['save_kills']} kills during a save → "
              f"{'identical' if info['identical'] else 'DIFFERENT'}", flush=True)
        shutil.rmtree(run, ignore_errors=True)
    identical = sum(r["identical"] for r in results)
    summary = {"trials": args.trials, "identical": identical, "steps": args.steps, "objective": args.objective,
               "random_kills": sum(r["kills"] for r in results),
               "kills_during_save": sum(r["save_kills"] for r in results),
               "reference_run_s": round(duration, 1), "results": results}
    print(f"{identical} of {args.trials} identical "
          f"({summary['random_kills']} random kills, {summary['kills_during_save']} kills during a save)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results → {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
