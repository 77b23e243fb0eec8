"""Atomic checkpoints: written under ``checkpoints/.tmp-stepNNNNNNNN``, renamed into place when every
rank has finished, then ``checkpoints/latest`` is rewritten (itself atomically). A checkpoint dir
under its final name is therefore always complete, and ``latest`` never names a partial one.

Each checkpoint holds DeepSpeed's model/optimizer shards, the client state (step, tokens, data
loader state, config), each rank's RNG state, the resolved config and a copy of the tokenizer,
so that it can be exported on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from data_pipeline.errors import NorallmError
from training import distributed

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step(\d{8})$")
# Test hook: when set to a step number, every rank dies (exit 137) after writing that step's
# shards and before the rename, as a kill -9 during a save would. Used by tests and bench/.
KILL_DURING_SAVE = "NORALLM_TEST_KILL_DURING_SAVE"


def step_name(step: int) -> str:
    return f"step{step:08d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none yet."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int, extra_files: dict[str, Path]) -> Path:
    """Save collectively (every rank calls this); returns the final checkpoint dir."""
    root = Path(run_dir) / CHECKPOINTS
    rank = distributed.rank()
    name = step_name(step)
    tmp_name = f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tmp_name, client_state=client_state, save_latest=False)
    rng = {"torch": torch.get_rng_state()}
    if distributed.runtime().is_gpu:
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, root / tmp_name / f"rng_rank{rank:05d}.pt")
    if os.environ.get(KILL_DURING_SAVE) == str(step):  # fault drill: die with the shards half-committed
        os._exit(137)
    distributed.barrier()
    final = root / name
    if rank == 0:
        world = distributed.world_size()
        (root / tmp_name / "meta.json").write_text(json.dumps({"step": step, "world_size": world}) + "\n")
        for rel, src in extra_files.items():
            dst = root / tmp_name / rel
            if Path(src).is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        if final.exists():  # an orphan from a run killed between rename and `latest`
            shutil.rmtree(final)
        os.replace(root / tmp_name, final)
        _write_text_atomic(root / LATEST, name + "\n")
        _prune(root, keep_last)
    distributed.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load(engine, run_dir: Path, init_from: Path | None = None) -> dict | None:
    """Restore the run's latest checkpoint into ``engine`` — or, for a run dir without one,
    ``init_from`` (a checkpoint of another run: branching, e.g. a cooldown) — and return its client
    state. None: a fresh run."""
    path = latest_checkpoint(run_dir)
    if path is None and init_from is not None:
        path = Path(init_from)
        if not (path / "config.yaml").is_file():
            raise NorallmError(f"--from-checkpoint {path} is not a checkpoint dir (no config.yaml in it).")
    if path is None:
        return None
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
    world = distributed.world_size()
    if meta.get("world_size", world) != world and engine.zero_optimization_stage() > 0:
        raise NorallmError(
            f"checkpoint {path} was written by {meta['world_size']} ranks and this launch has {world}: DeepSpeed "
            "cannot re-partition ZeRO optimizer state onto another number of ranks. Relaunch with "
            f"{meta['world_size']} ranks (the data order itself would continue exactly on any number), or "
            "start a new run from its weights: `norallm export` it, then model.init: warm, model.base: EXPORT."
        )
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    rank = distributed.rank()
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and distributed.runtime().is_gpu:
            torch.cuda.set_rng_state(rng["cuda"])
    return client_state
