"""One loss for every batch the loaders produce (data_pipeline.batch.Batch): next-token
cross-entropy over the labels that are not IGNORE, with packed documents or conversations
attending only to themselves, and the per-micro-batch factors that make a step's gradient the mean
over all trained tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.batch import IGNORE, Batch
from training import distributed
from training.model.packing import document_positions


def on_device(batch: Batch) -> Batch:
    """A host batch of numpy arrays as tensors on this rank's device."""
    return batch.map(lambda a: distributed.to_device(torch.from_numpy(a)))


def model_inputs(input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor | bool]:
    """The model's keyword arguments for (B, T) inputs: with ``doc_ids`` the position ids restart
    at each packed document or conversation, and transformers builds the document mask for the
    attention implementation in use (training.model.packing). Never a KV cache in training: with one,
    transformers would not read document boundaries from the position ids (a base config's
    use_cache: true would silently unmask documents)."""
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if doc_ids is not None:
        kwargs["position_ids"] = document_positions(doc_ids)
    return kwargs


def causal_lm_loss(engine, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over a batch's trained targets (a Batch of tensors on the model's
    device). With ``doc_ids`` each packed document or conversation attends only to itself
    (``model_inputs``). With ``model.fused_loss`` the model computes the
    loss itself in chunks (training.model.kernels)."""
    model = getattr(engine, "module", engine)
    kwargs = model_inputs(batch.input_ids, batch.doc_ids)  # (B, T) each
    if getattr(model, "norallm_fused_loss", False):
        return engine(**kwargs, targets=batch.labels).loss
    logits = engine(**kwargs).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch.labels.reshape(-1),
                           ignore_index=IGNORE)


def token_scales(micro_batches: list[Batch], every_target_trained: bool = False) -> list[float]:
    """Per micro-batch, the factor on its mean loss that makes the step's gradient the mean over
    all ranks' trained tokens rather than over micro-batches (DeepSpeed averages micro-batches and
    ranks): its trained tokens × micro-batches × ranks over the step's trained tokens, counted on
    the host with one all-reduce. When the source trains every target (windows of text) every
    micro-batch holds the same count: exactly 1 each, and no all-reduce."""
    if every_target_trained:
        return [1.0] * len(micro_batches)
    counts = torch.tensor([float(mb.trained_tokens) for mb in micro_batches], dtype=torch.float64)
    parts = len(micro_batches) * distributed.world_size()
    total = distributed.sum_(counts.sum())  # host numbers: no device sync
    return (counts * parts / total).tolist() if total.item() else [1.0] * len(micro_batches)
