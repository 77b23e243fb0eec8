"""Stress the multi-rank launches that `make test` makes: run each path N times and report the
failures per path (issue: a rare SIGABRT, "terminate called without an active exception").

    python bench/stress_multirank.py --runs 100                   # train, resume, signal
    python bench/stress_multirank.py --runs 20 --paths train,signal --out /tmp/stress

Paths (2-rank torchrun launches of bench/kill_resume.py's tiny-mistral ZeRO-2 recipe, gloo):
- ``train``  — a straight 6-step run (what the suite's reference runs do);
- ``resume`` — ``--stop-at 3`` then a resume to step 6 (two launches);
- ``signal`` — SIGUSR1 to both ranks after the first logged steps, then the resume (two launches).

Every launch runs with ``PYTHONFAULTHANDLER=1`` and keeps each rank's full log (torchrun
``--log-dir``); a failing launch's logs are copied to ``OUT/failures/<path>-<i>/`` and its last
lines printed, so a rare crash leaves the Python stacks of all threads at the moment of the abort.
Results: ``OUT/stress_multirank.json`` and a one-line summary per path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from kill_resume import config as drill_config  # noqa: E402  (the fault drill's tiny 2-rank recipe)
from launch import launch_torchrun, signalled_ok  # noqa: E402  (tests/launch.py: the suite's launcher)

from training.config import parse_config  # noqa: E402
from training.data.pretraining import run_prepare  # noqa: E402

TRAIN = ["-m", "training.cli", "train"]


def run_path(path: str, config: Path, work: Path) -> list:
    """The launches of one path; each a ``Launch`` (returncode, logs)."""
    run = work / "run"
    if path == "train":
        return [launch_torchrun(*TRAIN, str(config), "--run-dir", str(run), log_root=work / "logs")]
    if path == "resume":
        first = launch_torchrun(*TRAIN, str(config), "--run-dir", str(run), "--stop-at", "3", log_root=work / "logs")
        if first.returncode != 0:
            return [first]
        return [first, launch_torchrun(*TRAIN, str(config), "--run-dir", str(run), log_root=work / "logs")]
    if path == "signal":
        def after_two_steps(proc, ranks) -> None:
            metrics = run / "metrics.jsonl"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                    break
                time.sleep(0.05)
            for r in ranks():
                r.send_signal(signal.SIGUSR1)

        first = launch_torchrun(*TRAIN, str(config), "--run-dir", str(run), log_root=work / "logs",
                                during=after_two_steps, expect_returncode=None)
        first.ok = signalled_ok(first)
        if not first.ok:
            return [first]
        return [first, launch_torchrun(*TRAIN, str(config), "--run-dir", str(run), log_root=work / "logs")]
    raise SystemExit(f"unknown path {path!r}: choose from train, resume, signal")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=100, help="repetitions of each path")
    ap.add_argument("--paths", default="train,resume,signal")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = args.paths.split(",")
    root = Path(tempfile.mkdtemp(prefix="norallm-stress-"))
    cfg = drill_config(root, steps=6)
    prepared = parse_config(cfg)
    run_prepare(prepared.tokenizer, prepared.data, progress=False)
    import yaml

    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    results = {p: {"runs": 0, "launches": 0, "failures": 0, "examples": []} for p in paths}
    t0 = time.monotonic()
    for i in range(args.runs):
        for p in paths:
            work = root / f"{p}-{i}"
            launches = run_path(p, config, work)
            r = results[p]
            r["runs"] += 1
            r["launches"] += len(launches)
            bad = [x for x in launches if not x.ok]
            if bad:
                r["failures"] += 1
                dest = args.out / "failures" / f"{p}-{i}"
                shutil.copytree(work / "logs", dest, dirs_exist_ok=True)
                r["examples"].append({"run": i, "summary": bad[0].summary(), "logs": str(dest)})
                print(f"[stress] {p} #{i}: FAILED\n{bad[0].summary()}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
        done = {p: f"{results[p]['failures']}/{results[p]['runs']}" for p in paths}
        print(f"[stress] {i + 1}/{args.runs} rounds, failures {done}, {time.monotonic() - t0:.0f} s", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"runs_per_path": args.runs, "wall_s": round(time.monotonic() - t0, 1), "paths": results}
    (args.out / "stress_multirank.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for p, r in results.items():
        print(f"{p}: {r['failures']} failed of {r['runs']} runs ({r['launches']} 2-rank launches)")
    return 1 if any(r["failures"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
