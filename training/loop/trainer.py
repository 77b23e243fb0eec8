"""The training loop: batch → forward → backward → step → log / eval / checkpoint.

Re-running on the same run directory resumes from ``checkpoints/latest``: model, optimizer,
data-loader position and RNG come back, so the continuation is bit-identical to a run that was
never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.tokenizer import Tokenizer
from training import distributed, liveness
from training.checkpoint import reshard, resume_check, run_lock, store
from training.config import Config, ConfigError
from training.config_checks import batch_problems
from training.data.modes import mode_of
from training.eval.perplexity import evaluate
from training.loop import signals
from training.loop.engine import build_engine, deepspeed_config, jit_ops, set_lr
from training.loop.guard import DivergenceGuard, finite_or_none
from training.loop.metrics import Console, MetricsLog, flops_per_token, memory_gib, peak_flops, truncate_jsonl
from training.model.alibi import bloom_attention, install_alibi_attention
from training.model.build import (
    SpecialIds,
    build_model,
    drop_unbound_sliding_window,
    enable_activation_checkpointing,
    hf_config,
    warm_start,
)
from training.model.kernels import apply_liger, install_chunked_loss
from training.model.loss import causal_lm_loss, on_device, token_scales
from training.model.transplant import write_report

# Exit code after a signal-triggered checkpoint; Slurm scripts requeue the job on it.
EXIT_REQUEUE = 42


@dataclass
class TrainResult:
    engine: object
    step: int
    stopped_by_signal: bool


class _StopFlag:
    """Set by SIGUSR1/SIGTERM and a first Ctrl-C (SIGINT); the loop finishes the current step, saves
    and exits. A second Ctrl-C aborts at once (KeyboardInterrupt), as users expect."""

    def __init__(self):
        self.requested = signals.arrived_early()  # during start-up (training.loop.signals)
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":
                print("[train] Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again aborts without saving)",
                      file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self) -> bool:
        """Every rank's view, agreed on the host once per step (no device sync)."""
        return distributed.any_rank(self.requested)


def progress_line(step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None,
                  step_time_s: float) -> str:
    """What rank 0 prints every logging step, so that a job's .out shows the run moving."""
    eta = int(step_time_s * (max_steps - step))
    eta_text = f"{eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
    mfu_text = f", MFU {100 * mfu:.1f} %" if mfu is not None else ""
    return (f"[train] step {step}/{max_steps}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s"
            f"{mfu_text}, {step_time_s:.2f} s/step, ETA {eta_text}")


def check_world(cfg: Config, world_size: int) -> None:
    """The launch matches the config: expected ranks, and a global batch that divides evenly."""
    t = cfg.train
    problems = []
    if t.world_size is not None and t.world_size != world_size:
        problems.append(("train.world_size", f"config expects {t.world_size} ranks, the launcher started "
                                             f"{world_size}; fix the launch or the config."))
    problems += batch_problems(t.global_batch_size, t.micro_batch_size, world_size, t.grad_accum_steps)
    if problems:
        raise ConfigError(problems, "launch")


def build_data(cfg: Config, rank: int, world_size: int):
    """(the config with its model sized for the tokenizer, tokenizer, training loader, validation
    sets), for pretraining or SFT alike (training.data.modes)."""
    mode = mode_of(cfg)
    tokenizer = mode.training_tokenizer(rank)
    cfg = mode.sized(tokenizer)
    loader, valid_sets = mode_of(cfg).data(tokenizer, rank, world_size)  # built for the model as it will be
    return cfg, tokenizer, loader, valid_sets


def attention_implementation(cfg: Config, on_gpu: bool) -> str:
    """``model.attn_implementation`` resolved: ``auto`` is SDPA (its flash kernel serves causal
    attention), except that document-masked attention on a GPU goes through FlexAttention's block
    mask instead of a dense (B, 1, T, T) mask that would push SDPA off its flash kernel. BLOOM
    (training.model.alibi): ``auto`` is FlexAttention with an ALiBi score_mod on a GPU (SDPA with the
    ALiBi bias where the model has attention dropout, which flex lacks), SDPA with the bias on CPU;
    ``eager`` is transformers' own. FlexAttention has no backward on CPU, so it trains on a GPU only."""
    attn = bloom_attention(cfg.model, on_gpu) or cfg.model.attn_implementation
    if attn == "auto":
        attn = "flex_attention" if mode_of(cfg).masks_documents and on_gpu else "sdpa"
    if attn == "flex_attention" and not on_gpu:
        raise ConfigError([("model.attn_implementation", "flex_attention trains on a GPU only (PyTorch has no "
                            "FlexAttention backward on CPU); use auto or sdpa here.")], "launch")
    return attn


def build_training_model(cfg: Config, tokenizer: Tokenizer, run_dir: Path, rank: int) -> torch.nn.Module:
    """Scratch init or warm start (with the vocabulary transplant), built once on the rank's device
    in the training dtype, in train mode, then the configured levers."""
    rt = distributed.runtime()
    # ZeRO-3 with offloaded parameters keeps them on the host; everything else starts on the device
    device = torch.device("cpu") if cfg.zero.stage == 3 and cfg.zero.offload_params else rt.device
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    ids = SpecialIds(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    attn = attention_implementation(cfg, rt.is_gpu)
    hf_cfg = hf_config(cfg.model.flavor, cfg.model.overrides, cfg.model_vocab_size, ids, attn)
    # ZeRO-3: every rank builds only its partitions (zero.Init, with the config the engine gets)
    zero3 = deepspeed_config(cfg.train, cfg.zero, distributed.world_size()) if cfg.zero.stage == 3 else None
    if cfg.model.init == "warm":
        # ZeRO-0/1/2: rank 0 loads the base, the others build it empty and get its parameters by
        # DeepSpeed's broadcast at initialisation. ZeRO-3: each rank reads its partitions of the base.
        model, report = warm_start(cfg.model.base, cfg.model.base_tokenizer, tokenizer, cfg.model_vocab_size,
                                   cfg.model.special_token_map, hf_cfg, dtype, load_weights=rank == 0 or bool(zero3),
                                   device=device, transplant_mode=cfg.model.transplant, zero3_config=zero3)
        if zero3 is None:  # (under ZeRO-3, zero.Init has placed the partitions already)
            model.to(device)
        if report is not None and rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_report(report, run_dir / "transplant.json")
            print(f"[model] warm start from {cfg.model.base}; {report.summary()}")
    else:
        model = build_model(hf_cfg, cfg.seed, cfg.model.init_std, device=device, dtype=dtype, zero3_config=zero3)
    drop_unbound_sliding_window(model.config, cfg.data.seq_len)
    if model.config.model_type == "bloom" and attn != "eager":
        install_alibi_attention(model, attn)  # transformers' BLOOM is eager only: the fused ALiBi path
    # from_pretrained returns the model in eval mode, and HF layers checkpoint activations only
    # in train mode: without this a warm start silently trains without activation checkpointing.
    model.train()
    if cfg.model.liger_kernel:
        apply_liger(model, log=print if rank == 0 else lambda _: None)
    if cfg.model.fused_loss:
        install_chunked_loss(model, cfg.model.fused_loss_chunk_tokens)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


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
    run_dir = Path(run_dir)
    stop = _StopFlag()  # first: a signal during start-up must not kill the rank without a word
    rank, world_size = distributed.init(jit_ops(cfg.train, cfg.zero), cfg.train.collective_timeout_s,
                                        cfg.train.heartbeat_timeout_s)
    check_world(cfg, world_size)
    # before anything touches the run dir: one trainer per run dir (training.checkpoint.run_lock)
    lock = run_lock.hold(run_dir, cfg.checkpoint.lock_heartbeat_s, cfg.checkpoint.lock_stale_s)
    liveness.before_exit(lock.release)  # a lost node ends the rank with os._exit, past the finally below
    try:
        return _train(cfg, run_dir, stop, lock, rank, world_size, stop_at, init_from)
    finally:
        lock.release()


def _train(cfg: Config, run_dir: Path, stop: _StopFlag, lock: run_lock.RunLock, rank: int, world_size: int,
           stop_at: int | None, init_from: str | Path | None) -> TrainResult:
    cfg, tokenizer, loader, valid_sets = build_data(cfg, rank, world_size)
    model = build_training_model(cfg, tokenizer, run_dir, rank)
    flops_tok = flops_per_token(model, cfg.data.seq_len)
    resume_from = store.choose(run_dir, Path(init_from) if init_from else None)
    resume_check.check(cfg, resume_from, print if rank == 0 else (lambda _: None))  # shape, ZeRO, precision
    universal = reshard.prepare(resume_from, world_size, cfg.zero.stage, print if rank == 0 else (lambda _: None))
    engine = build_engine(model, cfg.train, cfg.zero, world_size, load_universal=universal is not None)
    if cfg.model.compile:
        engine.compile()

    step, tokens_consumed, data_change = 0, 0, ""
    state = store.load(engine, resume_from, universal)
    reshard.after_load(engine, universal)  # what DeepSpeed's ZeRO-3 universal load leaves wrong
    if state is not None:
        step, tokens_consumed = state["step"], state["tokens_consumed"]
        data_change = loader.load_state_dict(state["data"])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        for f in ("metrics.jsonl", "eval.jsonl", "resumes.jsonl"):
            truncate_jsonl(run_dir / f, step if state is not None else -1)
        if state is not None:  # for `norallm report`'s resume marks
            with open(run_dir / "resumes.jsonl", "a", encoding="utf-8") as f:
                row = {"step": step, "world_size": world_size, "time": time.time()}
                if resume_from.parent.parent.resolve() != run_dir.resolve():  # a branch: --from-checkpoint
                    row["from"] = str(resume_from.resolve())
                f.write(json.dumps(row) + "\n")
        if state is not None and state.get("world_size") != world_size:
            print(f"[train] the checkpoint was written by {state.get('world_size')} ranks, resuming on {world_size}")
        if state is not None and step >= cfg.train.max_steps:
            print(f"[train] this run already finished: step {step} of train.max_steps {cfg.train.max_steps}; "
                  "nothing to train (raise train.max_steps to continue it)")
        print(f"[train] {'resuming at step ' + str(step) if state else 'starting'}; {world_size} rank(s), "
              f"ZeRO-{cfg.zero.stage}, {cfg.train.precision}, {cfg.train.accum_steps(world_size)} accumulation step(s)")
        hosts = distributed.hosts()
        print(f"[train] ranks on {len(set(hosts))} host(s): {liveness.rank_map(hosts)}")
        if data_change:
            print(f"[train] {data_change}")
    if rank == 0:  # weights + fp32 master + two Adam moments: ~16 bytes a parameter
        store.check_free_space(run_dir, 16 * sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
                                    cfg.checkpoint.keep_last)
    log = MetricsLog(run_dir, rank, cfg.logging, cfg.name, cfg.to_dict())
    peak = peak_flops(cfg.logging)
    extra = {"config.yaml": run_dir / "config.yaml", "tokenizer": Path(cfg.tokenizer.path)}
    tokens_per_step = cfg.tokens_per_step

    def run_eval() -> None:
        rows = evaluate(engine, valid_sets, cfg.train.micro_batch_size, step, engine.device)
        for row in rows:
            log.eval(row)
        if rank == 0:
            print(f"[eval] step {step}: " + ", ".join(f"{r['source']}/{r['language']} {r['loss']:.4f}" for r in rows))

    guard = DivergenceGuard(cfg.train, engine.device, run_dir, resume_from if state is not None else None, state)

    def save() -> None:
        lock.verify()  # never over the checkpoints of a trainer that took the run dir over
        client = {"step": step, "tokens_consumed": tokens_consumed, "data": loader.state_dict(),
                  "world_size": world_size, "config": cfg.to_dict(), "anomaly": guard.state_dict()}
        path = store.save(engine, run_dir, step, client, cfg.checkpoint.keep_last, extra, guard.health())
        guard.saved(step, path)
        if rank == 0:
            print(f"[checkpoint] step {step} → {path}")

    def check_finite() -> int:
        position = f"{tokens_consumed:,} tokens, loader state {loader.samples_consumed} samples"
        return guard.check(step, position, print if rank == 0 else (lambda _: None))

    if state is None and valid_sets:
        run_eval()
    engine.train()
    t_log, steps_since_log = time.perf_counter(), 0
    console = Console(cfg.train.max_steps, step, enabled=rank == 0)
    sample_log = _sample_log(rank)
    while step < cfg.train.max_steps:
        lr = set_lr(engine.optimizer, step, cfg.train)
        micro_batches = loader.next_step()
        if sample_log is not None:  # test hook: the global samples this rank was handed
            read = loader.last_samples
            sample_log.write(json.dumps({"step": step + 1, "rank": rank, "world_size": world_size,
                                         "samples": [read.start, read.stop]}) + "\n")
        scales = token_scales(micro_batches, loader.source.every_target_trained)
        loss_sum = torch.zeros((), device=engine.device)  # stays on the device: no sync per micro-batch
        for mb, scale in zip(micro_batches, scales, strict=True):  # DeepSpeed accumulates, steps at the last
            loss = causal_lm_loss(engine, on_device(mb))
            loss = loss * scale if scale != 1.0 else loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        step += 1
        steps_since_log += 1
        tokens_consumed += tokens_per_step
        console.step(step)
        grad_norm = engine.get_global_grad_norm()
        guard.observe(step, loss_sum / len(micro_batches), grad_norm)
        logging_step = step % cfg.logging.every_steps == 0 or step == cfg.train.max_steps
        if logging_step:
            loss_mean = distributed.mean(loss_sum / len(micro_batches))  # the step's one host sync
            check_finite()
            dt = (time.perf_counter() - t_log) / steps_since_log  # mean step time since the last log
            tok_s = tokens_per_step / dt
            mfu = tok_s * flops_tok / (world_size * peak) if peak else None
            log.step(finite_or_none({
                "step": step, "loss": loss_mean, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": tokens_consumed, "tokens_per_s": tok_s, "epoch": loader.epoch,
                "mfu": mfu,
                "memory_gib": memory_gib(), "step_time_s": dt, **guard.row_flags(),
            }))
            if rank == 0:
                console.line(progress_line(step, cfg.train.max_steps, loss_mean, lr, tok_s, mfu, dt))
            t_log, steps_since_log = time.perf_counter(), 0
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.train.max_steps and valid_sets:
            run_eval()
            engine.train()
            t_log, steps_since_log = time.perf_counter(), 0  # eval time is not step time
        signalled = stop.agreed()
        stopping = signalled or step == stop_at
        saved = False
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps or stopping:
            # never over the last good checkpoint from steps that were not finite (read once a step)
            if guard.since_save if logging_step else check_finite():
                if rank == 0:
                    print(f"[checkpoint] step {step} not saved: steps since the last checkpoint were not finite")
            else:
                save()
                saved = True
            t_log, steps_since_log = time.perf_counter(), 0  # nor is save time
        if stopping:
            if rank == 0 and signalled:
                what = f"saved step {step}" if saved else "kept the last good checkpoint"
                print(f"[train] signal received: {what}, exiting with {EXIT_REQUEUE} for requeue")
            console.close()
            log.close()
            return TrainResult(engine, step, signalled)
    console.close()
    if valid_sets and (state is None or state["step"] < cfg.train.max_steps):  # not for a finished run
        run_eval()
    log.close()
    return TrainResult(engine, step, False)
