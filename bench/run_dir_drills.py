"""Run-dir drills: two jobs on one run dir, and a finite blow-up, on kill_resume's tiny 2-rank run.

    python bench/run_dir_drills.py --out bench/results/run_dir_drills.json

Two jobs, one run dir (training.checkpoint.run_lock), each ending with metrics.jsonl compared with an
uninterrupted run (one trajectory: every step once, the same losses):

- alive: job B starts while job A trains; B is refused (exit 2, one line naming A) and changes
  nothing, A finishes.
- killed: A is kill -9'd (its lock stays); B takes it over at once (A's process is gone from this
  host) and finishes the run.
- hung: A is frozen (SIGSTOP, as a hung node); B1 is refused while A's heartbeat is recent; B2,
  started once the heartbeat is older than checkpoint.lock_stale_s (set short here), takes the lock
  over; A is then killed (fenced) and B2 finishes the run.

Spike (training.loop.guard): a run stopped at step 4 is resumed with ``--set train.lr=1000``; the
blow-up must stop it (exit 2) with the last healthy checkpoint (step 4) kept through the rotation
of a save every step with ``keep_last: 1``, named in the error, and every later checkpoint marked
unhealthy.

Each drill prints one line; the JSON goes to --out (default runs/bench/run_dir_drills.json,
outside version control). About 5 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from kill_resume import config, kill_job, losses  # noqa: E402  (the fault drill's tiny 2-rank recipe)

from training.config import parse_config  # noqa: E402
from training.data.pretraining import run_prepare  # noqa: E402

STEPS = 300  # long enough that a second job starts while the first still trains (~0.1 s a step here)
HUNG = ["--set", "checkpoint.lock_heartbeat_s=2", "--set", "checkpoint.lock_stale_s=40"]


def start(cfg: Path, run: Path, log: Path, *extra: str) -> subprocess.Popen:
    # norallm's torchrun: a worker's user error (exit 2) is the launch's exit code
    cmd = [sys.executable, "-m", "training.launch.torchrun_node", "--standalone", "--nproc_per_node=2",
           "-m", "training.cli", "train", str(cfg), "--run-dir", str(run), *extra]
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 900) -> tuple[int, str]:
    proc.wait(timeout=timeout_s)
    return proc.returncode, log.read_text(errors="replace")


def wait_for(predicate, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for the run")
        time.sleep(0.2)


def latest_step(run: Path) -> int:
    pointer = run / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step"))
    except (OSError, ValueError):
        return 0


def one_trajectory(run: Path, want: list[float]) -> bool:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows] == list(range(1, STEPS + 1)) and losses(run) == want


def refusal_line(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith("error: run dir") and "is in use by" in line]
    return lines[0] if lines else None


def drill_alive(cfg: Path, work: Path, want: list[float]) -> dict:
    run = work / "alive"
    a = start(cfg, run, work / "alive-a.log")
    wait_for(lambda: (run / "train.lock").is_file())
    holder = json.loads((run / "train.lock").read_text())
    wait_for(lambda: (run / "config.yaml").is_file())
    before = (run / "config.yaml").stat().st_mtime_ns
    b_code, b_text = finish(start(cfg, run, work / "alive-b.log"), work / "alive-b.log")
    a_alive = a.poll() is None  # B decided while A was still training
    after = (run / "config.yaml").stat().st_mtime_ns
    a_code, _ = finish(a, work / "alive-a.log")
    line = refusal_line(b_text)
    ok = (b_code == 2 and line is not None and f"on host {holder['host']}, pid {holder['pid']}" in line
          and a_alive and not (run / "resumes.jsonl").exists() and before == after and a_code == 0
          and one_trajectory(run, want))
    return {"drill": "alive", "ok": ok, "b_exit": b_code, "a_exit": a_code, "refusal": line,
            "summary": f"B while A trains: B {'refused' if line else 'NOT refused'} (exit {b_code}, A "
                       f"{'still training' if a_alive else 'already done'}), A finished "
                       f"(exit {a_code}), metrics.jsonl {'one trajectory' if one_trajectory(run, want) else 'MIXED'}"}


def drill_killed(cfg: Path, work: Path, want: list[float]) -> dict:
    run = work / "killed"
    a = start(cfg, run, work / "killed-a.log")
    wait_for(lambda: latest_step(run) >= 20)
    kill_job(a)
    killed_after = latest_step(run)
    lock_left = (run / "train.lock").is_file()
    b_code, b_text = finish(start(cfg, run, work / "killed-b.log"), work / "killed-b.log")
    took = "taking over" in b_text and "is gone" in b_text
    ok = lock_left and took and b_code == 0 and one_trajectory(run, want) and not (run / "train.lock").exists()
    return {"drill": "killed", "ok": ok, "lock_left": lock_left, "b_exit": b_code,
            "summary": f"A kill -9'd after checkpoint {killed_after}: lock left {lock_left}, B "
                       f"{'took it over' if took else 'did NOT take it over'} (exit {b_code}), metrics.jsonl "
                       f"{'one trajectory' if one_trajectory(run, want) else 'MIXED'}"}


def _signal_job(proc: subprocess.Popen, sig: int) -> None:
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def drill_hung(cfg: Path, work: Path, want: list[float]) -> dict:
    run = work / "hung"
    a = start(cfg, run, work / "hung-a.log", *HUNG)
    wait_for(lambda: latest_step(run) >= 20)
    _signal_job(a, signal.SIGSTOP)
    frozen_at = time.monotonic()
    b1_code, b1_text = finish(start(cfg, run, work / "hung-b1.log", *HUNG), work / "hung-b1.log")
    refused = refusal_line(b1_text)
    time.sleep(max(0.0, frozen_at + 45 - time.monotonic()))  # past lock_stale_s = 40 since A's last heartbeat
    b2 = start(cfg, run, work / "hung-b2.log", *HUNG)
    wait_for(lambda: "taking over" in (work / "hung-b2.log").read_text(errors="replace"))
    kill_job(a)  # the hung node is fenced
    b2_code, b2_text = finish(b2, work / "hung-b2.log")
    took = "stale after 40 s" in b2_text
    ok = refused is not None and b1_code == 2 and took and b2_code == 0 and one_trajectory(run, want)
    return {"drill": "hung", "ok": ok, "b1_exit": b1_code, "b2_exit": b2_code, "refusal": refused,
            "summary": f"A frozen: B1 {'refused' if refused else 'NOT refused'} (exit {b1_code}), B2 after the "
                       f"heartbeat went stale {'took over' if took else 'did NOT take over'} (exit {b2_code}), "
                       f"metrics.jsonl {'one trajectory' if one_trajectory(run, want) else 'MIXED'}"}


def drill_spike(cfg: Path, work: Path) -> dict:
    run = work / "spike"
    every_step = ["--set", "checkpoint.every_steps=1", "--set", "checkpoint.keep_last=1"]  # rotation at every save
    first_code, _ = finish(start(cfg, run, work / "spike-1.log", "--stop-at", "4", *every_step), work / "spike-1.log")
    code, text = finish(start(cfg, run, work / "spike-2.log", "--set", "train.lr=1000", *every_step),
                        work / "spike-2.log")
    root = run / "checkpoints"
    metas = {p.name: json.loads((p / "meta.json").read_text()) for p in sorted(root.glob("step*")) if p.is_dir()}
    kept = metas.get("step00000004", {}).get("healthy") is True
    later = {n: m.get("healthy") for n, m in metas.items() if n > "step00000004"}
    named = f"The last healthy checkpoint is {(root / 'step00000004').resolve()}" in text
    error = next((line for line in text.splitlines() if line.startswith("error: training diverged")), None)
    stopped = re.search(r"the last (?:up to step|at step) (\d+)", error or "")
    saves = len(re.findall(r"\[checkpoint\] step \d+ →", text))  # saves after the resume, keep_last 1
    ok = first_code == 0 and code == 2 and kept and named and bool(later) and not any(later.values())
    return {"drill": "spike", "ok": ok, "exit": code, "saves_after": saves, "checkpoints": metas, "error": error,
            "summary": f"lr 1000 from step 4: stopped at step {stopped.group(1) if stopped else '?'} (exit {code}); "
                       f"step00000004 {'kept healthy' if kept else 'NOT kept'} and {'named' if named else 'NOT named'}"
                       f" through {saves} later save(s) with keep_last 1; the {len(later)} left after it "
                       f"{'all unhealthy' if later and not any(later.values()) else later}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drills", default="alive,killed,hung,spike", help="which drills, comma-separated")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "run_dir_drills.json",
                    help="results JSON (default runs/bench/run_dir_drills.json)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="norallm-run-dir-drills-"))
    raw = config(work, STEPS)
    raw["checkpoint"]["every_steps"] = 10
    prepared = parse_config(raw)
    run_prepare(prepared.tokenizer, prepared.data, progress=False)
    cfg = work / "drill.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    t0 = time.monotonic()
    results = []
    names = args.drills.split(",")
    want = None
    if set(names) & {"alive", "killed", "hung"}:
        code, _ = finish(start(cfg, work / "reference", work / "reference.log"), work / "reference.log")
        if code != 0:
            raise RuntimeError(f"the reference run failed (exit {code}); see {work / 'reference.log'}")
        want = losses(work / "reference")
    drills = {"alive": lambda: drill_alive(cfg, work, want), "killed": lambda: drill_killed(cfg, work, want),
              "hung": lambda: drill_hung(cfg, work, want), "spike": lambda: drill_spike(cfg, work)}
    for name in names:
        result = drills[name]()
        results.append(result)
        print(f"{name}: {'ok' if result['ok'] else 'FAILED'}: {result['summary']}", flush=True)
    passed = sum(r["ok"] for r in results)
    print(f"{passed} of {len(results)} run-dir drills passed ({time.monotonic() - t0:.0f} s; logs in {work})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"passed": passed, "drills": results, "work": str(work),
                                    "seconds": round(time.monotonic() - t0)}, indent=2) + "\n")
    print(f"results → {args.out}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
