"""The training loop: batch → forward → backward → step → log / eval / checkpoint.

Re-running on the same run directory resumes from ``checkpoints/latest``: model, optimizer,
data-loader position and RNG come back, so the continuation is bit-identical to a run that was
never interrupted.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipeline.tokenizer import Tokenizer
from training import checkpoint
from training.config import Config, ConfigError
from training.data import build_loader
from training.engine import build_engine, init_distributed, set_lr
from training.evaluate import evaluate, validation_sets
from training.kernels import apply_liger, install_chunked_loss
from training.metrics import MetricsLog, flops_per_token, memory_gib, peak_flops, truncate_jsonl
from training.models import SpecialIds, build_model, hf_config, warm_start
from training.sft import build_sft, ensure_chat_tokenizer
from training.transplant import write_report

# Exit code after a signal-triggered checkpoint; Slurm scripts requeue the job on it.
EXIT_REQUEUE = 42


@dataclass
class TrainResult:
    engine: object
    step: int
    stopped_by_signal: bool


def causal_lm_loss(engine, batch: torch.Tensor, eos_id: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of windows.

    - (B, T+1) token windows (pretraining); with ``eos_id`` (data.document_boundaries) each packed
      document attends only to itself (training.packing);
    - (B, 3, T+1) SFT rows of tokens, loss mask and conversation ids (training.sft): the loss is
      taken on masked-in targets only, and each conversation attends only to itself.

    With ``model.fused_loss`` the model computes the loss itself in chunks (training.kernels).
    """
    model = getattr(engine, "module", engine)
    model_cfg = model.config
    if batch.dim() == 3:
        from training.packing import block_causal_mask, check_supported, document_positions

        check_supported(model_cfg)
        tokens, mask, docs = batch[:, 0], batch[:, 1], batch[:, 2]  # (B, T+1) each
        inputs, targets = tokens[:, :-1], tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        dtype = next(engine.parameters()).dtype
        kwargs = {"input_ids": inputs, "position_ids": document_positions(docs[:, :-1]),
                  "attention_mask": block_causal_mask(docs[:, :-1], dtype, getattr(model_cfg, "sliding_window", None))}
    else:
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
        kwargs = {"input_ids": inputs}
        if eos_id is not None:
            from training.packing import check_supported, packed_inputs

            check_supported(model_cfg)
            dtype = next(engine.parameters()).dtype
            kwargs = packed_inputs(inputs, eos_id, dtype, getattr(model_cfg, "sliding_window", None))
    if getattr(model, "norallm_fused_loss", False):
        return engine(**kwargs, targets=targets).loss
    logits = engine(**kwargs).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def token_scales(micro_batches: list) -> list[float]:
    """Per micro-batch, the factor on its mean loss that makes the step's gradient the mean over
    all ranks' trained tokens rather than over micro-batches (DeepSpeed averages micro-batches and
    ranks). Pretraining windows all hold the same number of targets: exactly 1. SFT rows count
    their loss-mask ones, with one all-reduce for the step's total."""
    if micro_batches[0].ndim == 2:
        return [1.0] * len(micro_batches)
    parts = len(micro_batches) * (dist.get_world_size() if dist.is_initialized() else 1)
    counts = torch.tensor([float(mb[:, 1, 1:].sum()) for mb in micro_batches], dtype=torch.float64)
    total = counts.sum().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (counts * parts / total).tolist() if total.item() else [1.0] * len(micro_batches)


def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().float().cpu().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


class _StopFlag:
    """Set by SIGUSR1/SIGTERM; the loop finishes the current step, saves and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def check_world(cfg: Config, world_size: int) -> None:
    """The launch matches the config: expected ranks, and a global batch that divides evenly."""
    t = cfg.train
    problems = []
    if t.world_size is not None and t.world_size != world_size:
        problems.append(("train.world_size", f"config expects {t.world_size} ranks, the launcher started "
                                             f"{world_size}; fix the launch or the config."))
    if t.global_batch_size % (t.micro_batch_size * world_size):
        problems.append(("train.global_batch_size", f"{t.global_batch_size} is not divisible by micro_batch_size "
                         f"× ranks = {t.micro_batch_size} × {world_size}."))
    if problems:
        raise ConfigError(problems, "launch")


def build_data(cfg: Config, rank: int, world_size: int):
    """(tokenizer, training loader, validation sets) for a pretraining or an SFT config."""
    if cfg.sft is not None:  # the base tokenizer + chat tokens, built once by rank 0
        base_tok = Path(cfg.model.base_tokenizer or cfg.model.base or "")
        if not (Path(cfg.tokenizer.path) / "tokenizer.json").is_file() and not base_tok.is_dir():
            raise ConfigError([("model.base", f"'{base_tok}' is not a directory: SFT starts from an exported "
                                "model (`norallm export RUN OUT`) whose tokenizer gains the chat tokens.")], "sft")
        if rank == 0:
            ensure_chat_tokenizer(cfg.tokenizer.path, base_tok)
        dist.barrier()
    tokenizer = Tokenizer(cfg.tokenizer.path)
    if cfg.sft is not None and tokenizer.vocab_size > cfg.model_vocab_size:
        cfg.model.vocab_size = tokenizer.vocab_size  # the chat tokens' rows; recorded in config.yaml
    if tokenizer.vocab_size > cfg.model_vocab_size:
        raise ConfigError([("model.vocab_size", f"the tokenizer has {tokenizer.vocab_size} entries, more than "
                            f"the model's {cfg.model_vocab_size} embedding rows.")], "tokenizer")
    if cfg.sft is not None:
        return (tokenizer, *build_sft(cfg, tokenizer, rank, world_size))
    return tokenizer, build_loader(cfg, tokenizer, rank, world_size), validation_sets(cfg, tokenizer, rank, world_size)


def build_training_model(cfg: Config, tokenizer: Tokenizer, run_dir: Path, rank: int) -> torch.nn.Module:
    """Scratch init or warm start (with the vocabulary transplant), then the configured levers."""
    ids = SpecialIds(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    hf_cfg = hf_config(cfg.model.flavor, cfg.model.overrides, cfg.model_vocab_size, ids, cfg.model.attn_implementation)
    if cfg.model.init == "warm":
        model, report = warm_start(cfg.model.base, cfg.model.base_tokenizer, tokenizer, cfg.model_vocab_size,
                                   cfg.model.special_token_map, hf_cfg)
        if report is not None and rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_report(report, run_dir / "transplant.json")
            print(f"[model] warm start from {cfg.model.base}; {report.summary()}")
    else:
        model = build_model(hf_cfg, cfg.seed, cfg.model.init_std)
    if cfg.model.liger_kernel:
        apply_liger(model, log=print if rank == 0 else lambda _: None)
    if cfg.model.fused_loss:
        install_chunked_loss(model, cfg.model.fused_loss_chunk_tokens)
    if cfg.model.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def train(cfg: Config, run_dir: str | Path, stop_at: int | None = None,
          init_from: str | Path | None = None) -> TrainResult:
    """Train to ``train.max_steps`` (or, with ``stop_at``, save and return after that step, as a
    signal would: for time-boxed jobs and resume tests). A run dir without checkpoints starts from
    ``init_from`` when given: a checkpoint of another run, with its step, optimizer and data
    position (how a cooldown branches off a long run)."""
    run_dir = Path(run_dir)
    stop = _StopFlag()  # first: a signal during start-up must not kill the rank without a word
    rank, world_size = init_distributed()
    check_world(cfg, world_size)
    tokenizer, loader, valid_sets = build_data(cfg, rank, world_size)
    doc_eos = tokenizer.eos_id if cfg.data.document_boundaries else None  # intra-document attention
    model = build_training_model(cfg, tokenizer, run_dir, rank)
    flops_tok = flops_per_token(model, cfg.data.seq_len)
    engine = build_engine(model, cfg.train, cfg.zero, world_size)
    if cfg.model.compile:
        engine.compile()

    step, tokens_consumed = 0, 0
    state = checkpoint.load(engine, run_dir, Path(init_from) if init_from else None)
    if state is not None:
        step, tokens_consumed = state["step"], state["tokens_consumed"]
        loader.load_state_dict(state["data"])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        for f in ("metrics.jsonl", "eval.jsonl"):
            truncate_jsonl(run_dir / f, step if state is not None else -1)
        if state is not None and state.get("world_size") != world_size:
            print(f"[train] the checkpoint was written by {state.get('world_size')} ranks, resuming on {world_size}")
        print(f"[train] {'resuming at step ' + str(step) if state else 'starting'}; {world_size} rank(s), "
              f"ZeRO-{cfg.zero.stage}, {cfg.train.precision}, {cfg.grad_accum_steps(world_size)} accumulation step(s)")
    log = MetricsLog(run_dir, rank, cfg.logging, cfg.name, cfg.to_dict())
    peak = peak_flops(cfg.logging)
    extra = {"config.yaml": run_dir / "config.yaml", "tokenizer": Path(cfg.tokenizer.path)}
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len

    def run_eval() -> None:
        rows = evaluate(engine, valid_sets, cfg.train.micro_batch_size, step, engine.device,
                        loss_fn=partial(causal_lm_loss, eos_id=doc_eos))
        for row in rows:
            log.eval(row)
        if rank == 0:
            print(f"[eval] step {step}: " + ", ".join(f"{r['source']}/{r['language']} {r['loss']:.4f}" for r in rows))

    def save() -> None:
        client = {"step": step, "tokens_consumed": tokens_consumed, "data": loader.state_dict(),
                  "world_size": world_size, "config": cfg.to_dict()}
        path = checkpoint.save(engine, run_dir, step, client, cfg.checkpoint.keep_last, extra)
        if rank == 0:
            print(f"[checkpoint] step {step} → {path}")

    if state is None and valid_sets:
        run_eval()
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        lr = set_lr(engine.optimizer, step, cfg.train)
        micro_batches = loader.next_step()
        scales = token_scales(micro_batches)
        loss_sum = torch.zeros(())
        for mb, scale in zip(micro_batches, scales, strict=True):  # DeepSpeed accumulates, steps at the last
            loss = causal_lm_loss(engine, torch.from_numpy(mb).to(engine.device), doc_eos)
            loss = loss * scale if scale != 1.0 else loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float().cpu()
        step += 1
        tokens_consumed += tokens_per_step
        loss_mean = _mean_over_ranks(loss_sum / len(micro_batches))
        dt = time.perf_counter() - t0
        if step % cfg.logging.every_steps == 0 or step == cfg.train.max_steps:
            grad_norm = engine.get_global_grad_norm()
            tok_s = tokens_per_step / dt
            log.step({
                "step": step, "loss": loss_mean, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens": tokens_consumed, "tokens_per_s": tok_s, "epoch": loader.epoch,
                "mfu": tok_s * flops_tok / (world_size * peak) if peak else None,
                "memory_gib": memory_gib(), "step_time_s": dt,
            })
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.train.max_steps and valid_sets:
            run_eval()
        signalled = stop.agreed()
        stopping = signalled or step == stop_at
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps or stopping:
            save()
        if stopping:
            if rank == 0 and signalled:
                print(f"[train] signal received: saved step {step}, exiting with {EXIT_REQUEUE} for requeue")
            log.close()
            return TrainResult(engine, step, signalled)
    if valid_sets and (state is None or state["step"] < cfg.train.max_steps):  # not for a finished run
        run_eval()
    log.close()
    return TrainResult(engine, step, False)
