"""When the loop evaluates and when it saves, each decided by the policy itself (``due``), and
what a save holds. The loop asks; it keeps no schedule of its own."""

from __future__ import annotations

from collections.abc import Callable

from training.checkpoint import store
from training.config import Config
from training.eval.perplexity import evaluate
from training.loop.guard import DivergenceGuard
from training.loop.metrics import MetricsLog
from training.loop.run_dir import RunDir
from training.loop.state import TrainState


class Evaluator:
    """Validation loss per source: before the first step of a fresh run, every ``eval.every_steps``
    and after the last step."""

    def __init__(self, cfg: Config, engine, valid_sets: list, log: MetricsLog, rank: int, masking=None):
        self.every, self.max_steps = cfg.eval.every_steps, cfg.train.max_steps
        self.masking = masking  # train.objective: hybrid: also the masked loss and accuracy (data_pipeline.masking)
        self.micro_batch = cfg.train.micro_batch_size
        self.engine, self.valid_sets, self.log, self.rank = engine, valid_sets, log, rank

    def due(self, step: int) -> bool:
        """During training (the last step has its own evaluation, after the loop)."""
        return bool(self.valid_sets and self.every) and step % self.every == 0 and step < self.max_steps

    def run(self, step: int) -> None:
        if not self.valid_sets:
            return
        rows = evaluate(self.engine, self.valid_sets, self.micro_batch, step, self.engine.device, self.masking)
        for row in rows:
            self.log.eval(row)
        if self.rank == 0:
            print(f"[eval] step {step}: " + ", ".join(f"{r['source']}/{r['language']} {r['loss']:.4f}" + (
                f" (masked {r['masked_loss']:.4f}, accuracy {r['masked_accuracy']:.3f})"
                if r.get("masked_accuracy") is not None else "") for r in rows))


class Checkpointer:
    """Saves every ``checkpoint.every_steps``, at the last step and when the run stops early, unless
    the steps since the last save were not finite: then the last good checkpoint stays ``latest``."""

    def __init__(self, cfg: Config, run: RunDir, engine, loader, guard: DivergenceGuard, state: TrainState,
                 check_health: Callable[[], int]):
        self.cfg, self.run, self.engine, self.loader, self.guard, self.state = cfg, run, engine, loader, guard, state
        self.check_health = check_health  # reads the guard (collective); the non-finite steps since the last save
        self.files = run.checkpoint_files(cfg)

    def due(self, step: int, stopping: bool) -> bool:
        return step % self.cfg.checkpoint.every_steps == 0 or step == self.cfg.train.max_steps or stopping

    def save_if_finite(self, checked: bool) -> bool:
        """Save unless the guard (already read this step when ``checked``) saw non-finite steps since
        the last save. Returns whether it saved."""
        step = self.state.step
        if self.guard.since_save if checked else self.check_health():
            if self.run.rank == 0:
                print(f"[checkpoint] step {step} not saved: steps since the last checkpoint were not finite")
            return False
        self.run.verify()  # never over the checkpoints of a trainer that took the run dir over
        client = {**self.state.state_dict(), "data": self.loader.state_dict(), "world_size": self.run.world_size,
                  "config": self.cfg.to_dict(), "anomaly": self.guard.state_dict()}
        path = store.save(self.engine, self.run.path, step, client, self.cfg.checkpoint.keep_last, self.files,
                          self.guard.health())
        self.guard.saved(step, path)
        if self.run.rank == 0:
            print(f"[checkpoint] step {step} → {path}")
        return True
