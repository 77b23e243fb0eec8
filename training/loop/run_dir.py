"""One run dir as the trainer keeps it across jobs: its lock (one trainer at a time,
training.checkpoint.run_lock), the run's config.yaml, the metrics files cut back to the step a
resume starts from, a resumes.jsonl row per resume (``norallm report`` marks them), the lines a
user reads at start-up, and the room for a checkpoint checked before the first step."""

from __future__ import annotations

import json
import time
from pathlib import Path

from training import distributed, liveness
from training.checkpoint import run_lock, store
from training.config import Config
from training.loop.metrics import truncate_jsonl
from training.loop.setup import Setup

_LOGS = ("metrics.jsonl", "eval.jsonl", "resumes.jsonl")


class RunDir:
    def __init__(self, path: Path, lock: run_lock.RunLock):
        self.path, self.lock = Path(path), lock
        self.rank, self.world_size = distributed.rank(), distributed.world_size()

    @classmethod
    def claim(cls, path: str | Path, cfg: Config) -> RunDir:
        """Collective, before anything touches the run dir: take its lock or raise on every rank
        (RunDirLocked names the trainer holding it)."""
        lock = run_lock.hold(Path(path), cfg.checkpoint.lock_heartbeat_s, cfg.checkpoint.lock_stale_s)
        liveness.before_exit(lock.release)  # a lost node ends the rank with os._exit, past any finally
        return cls(Path(path), lock)

    def release(self) -> None:
        self.lock.release()

    def verify(self) -> None:
        """Collective, before a save: raise on every rank when another trainer took the run dir over."""
        self.lock.verify()

    def checkpoint_files(self, cfg: Config) -> dict[str, Path]:
        """What every checkpoint carries beside the engine state, so that it is whole on its own."""
        return {"config.yaml": self.path / "config.yaml", "tokenizer": Path(cfg.tokenizer.path)}

    def begin(self, cfg: Config, setup: Setup, step: int) -> None:
        """Rank 0, once the run is set up at ``step``: the files of a (re)started run, and its start-up lines."""
        if self.rank != 0:
            return
        resumed = setup.resumed
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        for name in _LOGS:  # a resume continues the metrics of the step it resumes from, not of a later save
            truncate_jsonl(self.path / name, step if resumed is not None else -1)
        if resumed is not None:
            row = {"step": step, "world_size": self.world_size, "time": time.time()}
            if setup.resume_from.parent.parent.resolve() != self.path.resolve():  # a branch: --from-checkpoint
                row["from"] = str(setup.resume_from.resolve())
            with open(self.path / "resumes.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if resumed.get("world_size") != self.world_size:
                print(f"[train] the checkpoint was written by {resumed.get('world_size')} ranks, resuming on "
                      f"{self.world_size}")
            if step >= cfg.train.max_steps:
                print(f"[train] this run already finished: step {step} of train.max_steps {cfg.train.max_steps}; "
                      "nothing to train (raise train.max_steps to continue it)")
        print(f"[train] {'resuming at step ' + str(step) if resumed else 'starting'}; {self.world_size} rank(s), "
              f"ZeRO-{cfg.zero.stage}, {cfg.train.precision}, {cfg.train.accum_steps(self.world_size)} "
              "accumulation step(s)")
        hosts = distributed.hosts()
        print(f"[train] ranks on {len(set(hosts))} host(s): {liveness.rank_map(hosts)}")
        if setup.data_change:
            print(f"[train] {setup.data_change}")
        # weights + fp32 master + two Adam moments: ~16 bytes a parameter
        params = sum(getattr(p, "ds_numel", p.numel()) for p in setup.engine.module.parameters())
        store.check_free_space(self.path, 16 * params, cfg.checkpoint.keep_last)
