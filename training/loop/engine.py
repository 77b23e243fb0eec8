"""DeepSpeed from the typed config: the generated JSON, the optimizer, the LR schedule.

The DeepSpeed JSON is never written by hand; ``deepspeed_config`` derives it from the ``train``
and ``zero`` sections so the two cannot disagree.
"""

from __future__ import annotations

import math

import torch

from training import distributed
from training.config import TrainConfig, ZeroConfig


def deepspeed_config(train: TrainConfig, zero: ZeroConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for this run (batch sizes, precision, ZeRO, clipping)."""
    accum = train.accum_steps(world_size)
    zero_opt: dict = {
        "stage": zero.stage,
        # Overlapping the reduce-scatter of one bucket with the backward of the next layers is what
        # keeps ZeRO-2/3's per-micro-step communication off the critical path; off by default in
        # DeepSpeed. It allocates ~4.5 × the bucket sizes, hence buckets of 2e8 elements rather than
        # DeepSpeed's 5e8: ~1.8 GB of buffers at 7B in bf16 instead of ~4.5 GB (the reduce side
        # is fp32 under bf16, below: up to twice that), still large enough (0.4–0.8 GB messages)
        # to run at link bandwidth.
        "overlap_comm": zero.overlap_comm if zero.overlap_comm is not None else zero.stage >= 2,
        "contiguous_gradients": True,
        "reduce_bucket_size": zero.reduce_bucket_size,
    }
    if zero.stage in (1, 2):
        zero_opt["allgather_bucket_size"] = zero.allgather_bucket_size
    if zero.stage in (1, 2, 3) and zero.offload_optimizer:
        zero_opt["offload_optimizer"] = {"device": "cpu", "pin_memory": distributed.runtime().is_gpu}
    if zero.stage == 3:
        zero_opt["stage3_gather_16bit_weights_on_model_save"] = False
        if zero.offload_params:
            zero_opt["offload_param"] = {"device": "cpu", "pin_memory": distributed.runtime().is_gpu}
    ds = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero_opt,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        # bf16 keeps 8 bits of mantissa: summing many gradients in it loses the small ones. Under
        # bf16 DeepSpeed accumulates micro-batches in grad_accum_dtype but reduces across ranks in
        # communication_data_type, which defaults to the model's bf16: every hop of the ring
        # rounds to bf16, ~sqrt(ranks) × 2^-9 of relative error at NORA's 256–512 ranks (~3–4 %).
        # Both are fp32 here, as Megatron (forced for bf16) and torchtitan/FSDP (reduce_dtype)
        # do. The price is twice the gradient bytes on the wire and in the reduce buckets: at
        # NORA's LUMI shapes (7B, micro-batch 4, one micro-step per step) the fp32 reduce-scatter
        # (~29 GB a rank) is ~2.3 s at 12.5 GB/s a GCD against a ~3.5 s backward it overlaps
        # with (overlap_comm). Where it is not hidden (fast GPUs on a slow network, small
        # micro-batches), `zero.extra: {communication_data_type: bf16}` halves it.
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if train.precision == "bf16" else {}),
        # The client optimizer is torch's AdamW, which ZeRO has not "certified"; it is exact.
        "zero_allow_untested_optimizer": True,
        # train.optimizer: torch with offload is slow but allowed when asked for explicitly.
        "zero_force_ds_cpu_optimizer": train.optimizer != "torch",
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, zero.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _decay(progress: float, shape: str) -> float:
    """1 → 0 over progress 0 → 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "sqrt":  # "1 - sqrt" cooldown (Hägele et al. 2024)
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based). A pure function of the step and the
    config, so resuming needs no scheduler state, and a cooldown can branch from any checkpoint by
    resuming it with ``schedule: wsd`` and ``max_steps = step + decay_steps``.

    - warmup: linear from lr/warmup_steps to lr over ``warmup_steps``;
    - cosine / linear: from lr down to ``min_lr`` at ``max_steps``;
    - constant: lr;
    - wsd (warmup-stable-decay, "trapezoid"): lr until ``max_steps - decay_steps``, then down to
      ``min_lr`` at ``max_steps`` along ``decay_shape``.

    With ``frozen_body_lr`` the frozen-body stage is a stage of its own (NORA 11B's 2.2): that
    constant lr for its steps, and the schedule above counted from the step after it.
    """
    max_steps = train.max_steps
    if train.frozen_body_lr is not None and train.frozen_body_steps:
        if step < train.frozen_body_steps:
            return train.frozen_body_lr
        step, max_steps = step - train.frozen_body_steps, max_steps - train.frozen_body_steps
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    if train.schedule == "wsd":
        decay_start = max_steps - (train.decay_steps or 0)
        if step < decay_start:
            return train.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, train.decay_steps or 1))
    else:
        progress = min(1.0, (step - train.warmup_steps) / max(1, max_steps - train.warmup_steps))
    shape = train.decay_shape if train.schedule == "wsd" else train.schedule
    return train.min_lr + (train.lr - train.min_lr) * _decay(progress, shape)


def build_optimizer(model: torch.nn.Module, train: TrainConfig, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases). Parameters are grouped into
    ``body`` and ``embeddings`` (input embedding + LM head) so the frozen-body stage can hold the
    body still by giving its groups a learning rate of exactly 0 (see ``set_lr``)."""
    emb_ids = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    groups: dict[tuple[str, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3 partition is flat: its shape is ds_shape
            key = ("embeddings" if id(p) in emb_ids else "body", len(getattr(p, "ds_shape", p.shape)) >= 2)
            groups.setdefault(key, []).append(p)
    param_groups = [
        {"params": ps, "part": part, "weight_decay": train.weight_decay if decays else 0.0}
        for (part, decays), ps in sorted(groups.items())
    ]
    if train.optimizer == "deepspeed" or (train.optimizer == "auto" and offload):
        # With the optimizer offloaded, the step runs on the host: DeepSpeed's vectorised CPU Adam
        # (compiled on first use) is several times faster than torch's there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        cls = DeepSpeedCPUAdam if offload else FusedAdam
        return cls(param_groups, lr=train.lr, betas=train.betas, eps=train.eps, adamw_mode=True)
    # On the GPU torch's fused AdamW (one kernel for all tensors); on the CPU the plain loop, whose
    # results the exact-resume tests pin down.
    on_gpu = all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=train.lr, betas=train.betas, eps=train.eps,
                             foreach=False if not on_gpu else None, fused=on_gpu or None)


def set_lr(optimizer, step: int, train: TrainConfig) -> float:
    """Apply the schedule for ``step``; during the frozen-body stage the body's lr is 0, and with
    lr 0 AdamW (decoupled weight decay included) leaves a parameter exactly unchanged."""
    lr = lr_at(step, train)
    frozen = step < train.frozen_body_steps
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if frozen and group.get("part") == "body" else lr
    return lr


def jit_ops(train: TrainConfig, zero: ZeroConfig) -> tuple[str, ...]:
    """DeepSpeed op builders this run's optimizer compiles on first use (none for torch's AdamW,
    the default: nothing then needs nvcc/hipcc on a compute node)."""
    offload = zero.offload_optimizer and zero.stage > 0
    if train.optimizer == "deepspeed" or (train.optimizer == "auto" and offload):
        return ("CPUAdamBuilder",) if offload else ("FusedAdamBuilder",)
    return ()


def build_engine(model: torch.nn.Module, train: TrainConfig, zero: ZeroConfig, world_size: int,
                 load_universal: bool = False):
    """``deepspeed.initialize`` with the generated config and torch AdamW as client optimizer. The
    model arrives already on its device in the training dtype (training.model.build.build_model)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, train, offload=zero.offload_optimizer and zero.stage > 0),
        config={**deepspeed_config(train, zero, world_size),
                **({"checkpoint": {"load_universal": True}} if load_universal else {})},
    )
    return engine
