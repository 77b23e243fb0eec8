"""A run's set-up, before its first step: the launch checked against the config, the data
(pretraining or SFT), the model (scratch or warm start, the attention and kernel levers), the
DeepSpeed engine, and the checkpoint it resumes from loaded into engine and loader.

``build`` is the one entry point the trainer calls; the pieces are public for tests, preflight
and the bench probes (which wrap ``build_training_model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.loader import Loader
from data_pipeline.tokenizer import Tokenizer
from training import distributed
from training.checkpoint import reshard, resume_check, store
from training.config import Config, ConfigError
from training.config_checks import batch_problems
from training.data.modes import mode_of
from training.loop.engine import build_engine, deepspeed_config
from training.loop.metrics import flops_per_token
from training.model.alibi import install_alibi_attention
from training.model.build import (
    SpecialIds,
    build_model,
    drop_unbound_sliding_window,
    enable_activation_checkpointing,
    family_attention,
    hf_config,
    warm_start,
)
from training.model.kernels import apply_liger, install_chunked_loss
from training.model.transplant import write_report


@dataclass
class Setup:
    """What ``build`` hands the loop."""

    cfg: Config  # with the model sized for the tokenizer
    engine: object  # the DeepSpeed engine, holding the resumed weights and optimizer when resuming
    loader: Loader  # at the resumed data position when resuming
    valid_sets: list
    flops_per_token: float
    resume_from: Path | None  # the checkpoint chosen (this run's latest, or --from-checkpoint's)
    resumed: dict | None  # its client state (step, tokens, data, anomaly, …); None for a fresh start
    data_change: str  # what the loader says changed in the data since the checkpoint ("" if nothing)


def build(cfg: Config, run_dir: Path, init_from: Path | None) -> Setup:
    """Data, model and engine for a run, resumed from ``run_dir``'s latest checkpoint (or, in a run
    dir without one, from ``init_from``) after the checkpoint was checked against the config."""
    rank, world_size = distributed.rank(), distributed.world_size()
    say = print if rank == 0 else (lambda _: None)
    cfg, tokenizer, loader, valid_sets = build_data(cfg, rank, world_size)
    model = build_training_model(cfg, tokenizer, run_dir, rank)
    flops_tok = flops_per_token(model, cfg.data.seq_len)
    resume_from = store.choose(run_dir, init_from)
    resume_check.check(cfg, resume_from, say)  # shape, ZeRO, precision
    universal = reshard.prepare(resume_from, world_size, cfg.zero.stage, say)
    engine = build_engine(model, cfg.train, cfg.zero, world_size, load_universal=universal is not None)
    if cfg.model.compile:
        engine.compile()
    resumed = store.load(engine, resume_from, universal)
    reshard.after_load(engine, universal)  # what DeepSpeed's ZeRO-3 universal load leaves wrong
    data_change = loader.load_state_dict(resumed["data"]) if resumed is not None else ""
    return Setup(cfg, engine, loader, valid_sets, flops_tok, resume_from, resumed, data_change)


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
    attn = family_attention(cfg.model, on_gpu) or cfg.model.attn_implementation
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
                                   device=device, transplant_mode=cfg.model.transplant,
                                   keep_tokenizer=cfg.model.tokenizer_strategy == "keep", zero3_config=zero3)
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
