"""One loss for every batch the loaders produce: next-token cross-entropy, with packed documents
or conversations attending only to themselves, and the per-micro-batch factors that make a step's
gradient the mean over all trained tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training import distributed
from training.packing import document_positions, packed_inputs


def causal_lm_loss(engine, batch: torch.Tensor, eos_id: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of windows.

    - (B, T+1) token windows (pretraining); with ``eos_id`` (data.document_boundaries) each packed
      document attends only to itself: its position ids restart, and transformers builds the
      document mask for the attention implementation in use (training.packing);
    - (B, 3, T+1) SFT rows of tokens, loss mask and conversation ids (training.sft): the loss is
      taken on masked-in targets only, and each conversation attends only to itself.

    With ``model.fused_loss`` the model computes the loss itself in chunks (training.kernels).
    """
    model = getattr(engine, "module", engine)
    if batch.dim() == 3:
        tokens, mask, docs = batch[:, 0], batch[:, 1], batch[:, 2]  # (B, T+1) each
        inputs, targets = tokens[:, :-1], tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        kwargs = {"input_ids": inputs, "position_ids": document_positions(docs[:, :-1])}
    else:
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)
        kwargs = {"input_ids": inputs}
        if eos_id is not None:
            kwargs = packed_inputs(inputs, eos_id)
    # Never a KV cache in training: with one, transformers would not read document boundaries
    # from the position ids (a base config's use_cache: true would silently unmask documents).
    kwargs["use_cache"] = False
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
    parts = len(micro_batches) * distributed.world_size()
    counts = torch.tensor([float(mb[:, 1, 1:].sum()) for mb in micro_batches], dtype=torch.float64)
    total = distributed.sum_(counts.sum())  # host numbers: no device sync
    return (counts * parts / total).tolist() if total.item() else [1.0] * len(micro_batches)
