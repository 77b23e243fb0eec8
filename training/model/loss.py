"""One loss for every batch the loaders produce (data_pipeline.batch.Batch): next-token
cross-entropy over the labels that are not IGNORE, with packed documents or conversations
attending only to themselves, and the per-micro-batch factors that make a step's gradient the mean
over all trained tokens. A hybrid batch's masked rows (train.objective: hybrid) attend both ways
inside their documents and are trained on their corrupted positions (data_pipeline.masking)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.batch import IGNORE, Batch
from training import distributed
from training.model.packing import document_positions, hybrid_attention_mask


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


def batch_inputs(model, batch: Batch) -> dict:
    """``model_inputs`` of a batch; one with ``bidirectional`` rows (train.objective: hybrid) also
    carries the mask that lets those rows attend both ways inside their documents
    (training.model.packing.hybrid_attention_mask), built for every such batch (no device sync
    to ask whether a row is masked)."""
    kwargs = model_inputs(batch.input_ids, batch.doc_ids)
    if batch.bidirectional is not None:
        doc_ids = batch.doc_ids if batch.doc_ids is not None else torch.zeros_like(batch.input_ids)
        kwargs["attention_mask"] = hybrid_attention_mask(doc_ids, batch.bidirectional,
                                                         model.config._attn_implementation, model.dtype)
    return kwargs


# The target groups of a hybrid batch: a causal row's targets, a masked row's.
CAUSAL, MASKED = 0, 1


def lm_loss(engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy over a batch's trained targets (a Batch of tensors on the model's
    device), and for a batch with ``bidirectional`` rows the detached (2, 2) ``[[sum, count]]``
    of its causal and its masked targets' losses (None otherwise). With ``doc_ids`` each packed
    document or conversation attends only to itself (``model_inputs``). With
    ``model.fused_loss`` the model computes the loss itself in chunks (training.model.kernels)."""
    model = getattr(engine, "module", engine)
    kwargs = batch_inputs(model, batch)  # (B, T) each
    groups = None if batch.bidirectional is None else \
        batch.bidirectional.long()[:, None].expand_as(batch.labels)  # (B, T): CAUSAL or MASKED
    if getattr(model, "norallm_fused_loss", False):
        out = engine(**kwargs, targets=batch.labels, **({} if groups is None else {"target_groups": groups, "n_groups": 2}))
        loss, sums = out.loss, out.loss_sums
    else:
        logits = engine(**kwargs).logits  # (B, T, V)
        logits = logits.float().reshape(-1, logits.size(-1))
        labels = batch.labels.reshape(-1)
        if groups is None:
            return F.cross_entropy(logits, labels, ignore_index=IGNORE), None
        per_token = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")  # 0 where ignored
        loss = per_token.sum() / (labels != IGNORE).sum().clamp(min=1)
        sums = per_token.new_zeros(2).index_add(0, groups.reshape(-1), per_token)
    if groups is None:
        return loss, None
    trained = (batch.labels != IGNORE).float()
    counts = trained.new_zeros(2).index_add(0, groups.reshape(-1), trained.reshape(-1))
    return loss, torch.stack([sums.detach().float(), counts], dim=1)


def objective_losses(parts: torch.Tensor | None) -> dict[str, float | None]:
    """A logged step's ``loss_causal`` and ``loss_masked`` (the mean over each kind of target on
    all ranks; None for a kind the step had none of) from each rank's ``lm_loss`` parts summed
    over its micro-batches; {} for the causal objective. Collective: every rank calls it."""
    if parts is None:
        return {}
    (causal, n_causal), (masked, n_masked) = distributed.sum_(parts).tolist()
    return {"loss_causal": causal / n_causal if n_causal else None,
            "loss_masked": masked / n_masked if n_masked else None}


def causal_lm_loss(engine, batch: Batch) -> torch.Tensor:
    """``lm_loss``'s mean cross-entropy alone."""
    return lm_loss(engine, batch)[0]


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
