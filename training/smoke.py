"""`norallm smoke`: the whole spine in minutes on a CPU.

tokenizer → shards → 2-rank DeepSpeed ZeRO-2 training (torchrun) → export → generate, on the
embedded corpus (Bokmål and Nynorsk passages shipped with the package, plus Python standard
library source read at run time as the code share) or on ``--data DIR`` (its JSONL files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

from norallm.errors import NorallmError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
EMBEDDED = Path(__file__).resolve().parents[1] / "data_pipeline" / "smoke_corpus"
# Standard-library modules read as the code share: small, stable, in every CPython.
STDLIB_CODE = ("json/*.py", "textwrap.py", "shlex.py", "fractions.py")


def embedded_sources() -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [
        {"name": "nob", "language": "nob", "paths": [str(EMBEDDED / "nob.jsonl")]},
        {"name": "nno", "language": "nno", "paths": [str(EMBEDDED / "nno.jsonl")]},
        {"name": "code", "language": "code", "format": "files", "paths": [str(stdlib / p) for p in STDLIB_CODE]},
    ]


def dir_sources(data_dir: Path) -> list[dict]:
    files = sorted(p for p in data_dir.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")))
    if not files:
        raise NorallmError(f"--data {data_dir}: no .jsonl, .jsonl.gz or .jsonl.zst files there.")
    return [{"name": p.name.split(".")[0], "paths": [str(p)]} for p in files]


def _check_replaceable(run_dir: Path, sources: list[dict], overwrite: bool) -> None:
    """A smoke run starts afresh, so ``run_dir`` is deleted first: only when it is empty or an
    earlier smoke run on the same data (``make smoke`` again), or ``overwrite`` says so. Never a
    dir that is not a smoke run's (a real run's checkpoints)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    previous = run_dir / "smoke.yaml"
    if not previous.is_file():
        raise NorallmError(f"--run-dir {run_dir} exists and is not a smoke run dir (no smoke.yaml); the smoke run "
                           "would delete it. Choose a new or empty --run-dir.")
    before = ((yaml.safe_load(previous.read_text(encoding="utf-8")) or {}).get("data") or {}).get("sources") or []
    if [(s.get("name"), s.get("paths")) for s in before] != [(s["name"], s["paths"]) for s in sources] and not overwrite:
        raise NorallmError(f"{run_dir} holds a smoke run on other data (its export is what configs/sft-smoke.yaml "
                           f"builds on); give this one its own --run-dir (e.g. {run_dir}-data), or add --overwrite.")


def smoke(data_dir: Path | None, run_dir: Path, max_steps: int | None = None, nproc: int = 2,
          overwrite: bool = False) -> int:
    from training.config import parse_config
    from training.data.pretraining import run_prepare
    from training.export import export, generate

    t_start = time.monotonic()
    if not CONFIG.is_file():
        raise NorallmError(f"{CONFIG} is missing: `norallm smoke` runs from a source checkout (pip install -e .).")
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    raw["data"]["sources"] = dir_sources(data_dir) if data_dir else embedded_sources()
    raw["tokenizer"]["path"] = str(run_dir / "tokenizer")
    raw["data"]["shards_dir"] = str(run_dir / "shards")
    if max_steps:
        raw["train"]["max_steps"] = max_steps
        raw["train"]["warmup_steps"] = min(raw["train"]["warmup_steps"], max_steps)
    raw["train"]["world_size"] = nproc
    cfg = parse_config(raw, "smoke config")

    _check_replaceable(run_dir, cfg.to_dict()["data"]["sources"], overwrite)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config_file = run_dir / "smoke.yaml"
    config_file.write_text(cfg.to_yaml(), encoding="utf-8")
    print(f"== norallm smoke: run dir {run_dir}, data {'embedded corpus' if data_dir is None else data_dir}")
    run_prepare(cfg.tokenizer, cfg.data, progress=False)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "training.cli", "train", str(config_file), "--run-dir", str(run_dir)]
    print("== training:", " ".join(cmd[2:]), flush=True)
    # torchrun's own default (1 thread per rank), set here so that it does not print a banner about it
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise NorallmError(f"training failed; see the output above (run dir {run_dir}).")

    evals = [row for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()
             if (row := json.loads(line))["source"] == "all"]
    out = export(run_dir, run_dir / "export", dtype="fp32")
    sample = generate(out, "Det var en gang", max_new_tokens=40)
    print("\n== smoke summary")
    print(f"validation loss: {evals[0]['loss']:.4f} before (step {evals[0]['step']}) → "
          f"{evals[-1]['loss']:.4f} after (step {evals[-1]['step']})")
    print(f"exported model: {out}")
    print(f"sample: {sample!r}")
    print(f"wall time: {time.monotonic() - t_start:.0f} s")
    if not evals[-1]["loss"] < evals[0]["loss"]:
        raise NorallmError("validation loss did not decrease: the smoke run failed to learn.")
    return 0
