"""The training loop: batch → forward → backward → step → log / eval / checkpoint.

``train`` reads as the recipe: claim the run dir, set up (data, model, engine, the checkpoint it
resumes from: training.loop.setup), then steps, each followed by what the policies say is due
(training.loop.policies). Re-running on the same run directory resumes from
``checkpoints/latest``: model, optimizer, data-loader position and RNG come back, so the
continuation is bit-identical to a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from norallm.exits import EXIT_REQUEUE
from training import distributed
from training.config import Config
from training.loop import setup
from training.loop.engine import jit_ops, set_lr
from training.loop.guard import DivergenceGuard
from training.loop.metrics import Console, MetricsLog, Progress, peak_flops
from training.loop.policies import Checkpointer, Evaluator
from training.loop.run_dir import RunDir
from training.loop.signals import StopFlag
from training.loop.state import TrainState
from training.model.loss import lm_loss, objective_losses, on_device, token_scales


@dataclass
class TrainResult:
    engine: object
    step: int
    stopped_by_signal: bool


# Test hook: when set to a path, every rank appends {"step", "rank", "world_size", "samples": [first, end)} per
# step to PATH.rankNNNNN (line-buffered, so a killed rank's lines are there). tests/test_multinode.py
# asserts with it that a resume on fewer nodes neither skips nor repeats a sample.
SAMPLE_LOG = "NORALLM_TEST_SAMPLE_LOG"


def _sample_log(rank: int):
    path = os.environ.get(SAMPLE_LOG)
    return open(f"{path}.rank{rank:05d}", "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115


def train(cfg: Config, run_dir: str | Path, stop_at: int | None = None,
          init_from: str | Path | None = None) -> TrainResult:
    """Train to ``train.max_steps`` (or, with ``stop_at``, save and return after that step, as a
    signal would: for time-boxed jobs and resume tests). A run dir without checkpoints starts from
    ``init_from`` when given: a checkpoint of another run, with its step, optimizer and data
    position (how a cooldown branches off a long run)."""
    stop = StopFlag()  # first: a signal during start-up must not kill the rank without a word
    distributed.init(jit_ops(cfg.train, cfg.zero), cfg.train.collective_timeout_s, cfg.train.heartbeat_timeout_s)
    setup.check_world(cfg, distributed.world_size())
    run = RunDir.claim(run_dir, cfg)  # before anything touches the run dir: one trainer per run dir
    try:
        return _train(cfg, run, stop, stop_at, Path(init_from) if init_from else None)
    finally:
        run.release()


def _train(cfg: Config, run: RunDir, stop: StopFlag, stop_at: int | None, init_from: Path | None) -> TrainResult:
    built = setup.build(cfg, run.path, init_from)
    cfg, engine, loader = built.cfg, built.engine, built.loader
    state = TrainState()
    if built.resumed is not None:
        state.load_state_dict(built.resumed)
    run.begin(cfg, built, state.step)
    say = print if run.rank == 0 else (lambda _: None)
    guard = DivergenceGuard(cfg.train, engine.device, run.path, built.resume_from if built.resumed else None,
                            built.resumed)

    def check_health() -> int:  # collective: reads the guard, raises past its limits
        return guard.check(state.step, f"{state.tokens_consumed:,} tokens, loader state {loader.samples_consumed} "
                                       "samples", say)

    log = MetricsLog(run.path, run.rank, cfg.logging, cfg.name, cfg.to_dict())
    evaluator = Evaluator(cfg, engine, built.valid_sets, log, run.rank, getattr(loader.source, "masking", None))
    checkpointer = Checkpointer(cfg, run, engine, loader, guard, state, check_health)
    progress = Progress(log, Console(cfg.train.max_steps, state.step, enabled=run.rank == 0), cfg.train.max_steps,
                        cfg.logging.every_steps, cfg.tokens_per_step, built.flops_per_token, peak_flops(cfg.logging),
                        run.world_size)
    sample_log = _sample_log(run.rank)
    if built.resumed is None:
        evaluator.run(state.step)
    engine.train()
    progress.restart()
    while state.step < cfg.train.max_steps:
        loss, lr, grad_norm, parts = train_step(engine, loader, cfg, state, sample_log)
        guard.observe(state.step, loss, grad_norm)
        logged = progress.stepped(state.step)
        if logged:
            loss_mean = distributed.mean(loss)  # the step's one host sync
            check_health()
            progress.report(state.step, loss_mean, lr, grad_norm, state.tokens_consumed, loader.epoch,
                            guard.row_flags() | objective_losses(parts))
        if evaluator.due(state.step):
            evaluator.run(state.step)
            engine.train()
            progress.restart()  # eval time is not step time
        signalled = stop.agreed()
        stopping, saved = signalled or state.step == stop_at, False
        if checkpointer.due(state.step, stopping):
            saved = checkpointer.save_if_finite(checked=logged)  # never over the last good one from non-finite steps
            progress.restart()  # nor is save time
        if stopping:
            if signalled:
                say(f"[train] signal received: {f'saved step {state.step}' if saved else 'kept the last good checkpoint'}"
                    f", exiting with {EXIT_REQUEUE} for requeue")
            progress.close()
            return TrainResult(engine, state.step, signalled)
    progress.console.close()
    if built.resumed is None or built.resumed["step"] < cfg.train.max_steps:  # not for a finished run
        evaluator.run(state.step)
    progress.close()
    return TrainResult(engine, state.step, False)


def train_step(engine, loader, cfg: Config, state: TrainState, sample_log=None):
    """One optimizer step over this rank's micro-batches (DeepSpeed accumulates, and steps at the
    last). Returns this rank's mean loss (on the device: no sync), the learning rate, the global
    gradient norm, and for the hybrid objective this rank's [[sum, count]] of causal and masked
    target losses (training.model.loss.lm_loss; None for causal)."""
    lr = set_lr(engine.optimizer, state.step, cfg.train)
    micro_batches = loader.next_step()
    if sample_log is not None:  # test hook: the global samples this rank was handed
        read = loader.last_samples
        sample_log.write(json.dumps({"step": state.step + 1, "rank": distributed.rank(),
                                     "world_size": distributed.world_size(), "samples": [read.start, read.stop]}) + "\n")
    scales = token_scales(micro_batches, loader.source.every_target_trained)
    loss_sum = torch.zeros((), device=engine.device)  # stays on the device: no sync per micro-batch
    parts_sum = None
    for mb, scale in zip(micro_batches, scales, strict=True):
        loss, parts = lm_loss(engine, on_device(mb))
        loss = loss * scale if scale != 1.0 else loss
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
        if parts is not None:
            parts_sum = parts if parts_sum is None else parts_sum + parts
    state.advance(cfg.tokens_per_step)
    return loss_sum / len(micro_batches), lr, engine.get_global_grad_norm(), parts_sum
