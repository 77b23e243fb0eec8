"""Intra-document attention for packed windows (``data.document_boundaries``).

A window of ``seq_len + 1`` tokens packs several documents, each ended by EOS. Without this, a
token attends to the tail of the previous document too. With it, position ids restart at 0 at
each document start (the token after an EOS, and the window's first token) and attention is
block-diagonal causal: a query sees only earlier keys of its own document. The 4D mask is
additive (0 / dtype min), so transformers' Mistral uses it as given under SDPA and eager
attention alike; on GPU, flash-attention varlen can use the position ids alone.

BLOOM is refused: ALiBi has no position ids to reset.
"""

from __future__ import annotations

import torch

from data_pipeline.errors import NorallmError


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) → (B, T): which document of its row each position belongs to (0, 1, ...); a new
    document starts right after every EOS."""
    starts = torch.zeros_like(inputs, dtype=torch.long)
    starts[:, 1:] = (inputs[:, :-1] == eos_id).long()
    return starts.cumsum(-1)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) → (B, T): each position's offset from the start of its document."""
    _, seq_len = doc_ids.shape
    idx = torch.arange(seq_len, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of_doc = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - start_of_doc


def block_causal_mask(doc_ids: torch.Tensor, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor:
    """(B, T) document ids → (B, 1, T, T) additive mask: 0 where query q may attend key k (same
    document, k ≤ q, and q − k < sliding_window when given), the dtype's minimum elsewhere."""
    _, seq_len = doc_ids.shape
    q = torch.arange(seq_len, device=doc_ids.device)
    allowed = q[:, None] >= q[None, :]  # (T, T) causal
    if sliding_window is not None:
        allowed = allowed & (q[:, None] - q[None, :] < sliding_window)
    allowed = allowed[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, T, T)


def packed_inputs(inputs: torch.Tensor, eos_id: int, dtype: torch.dtype = torch.float32,
                  sliding_window: int | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for a (B, T) batch of packed tokens (the window batch without its last
    column): ``input_ids``, per-document ``position_ids`` and the block-diagonal causal mask."""
    doc = document_ids(inputs, eos_id)
    return {"input_ids": inputs, "position_ids": document_positions(doc),
            "attention_mask": block_causal_mask(doc, dtype, sliding_window)}


def check_supported(model_config) -> None:
    """Intra-document attention needs position ids: Mistral yes, BLOOM (ALiBi) no."""
    if getattr(model_config, "model_type", None) == "bloom":
        raise NorallmError("data.document_boundaries is set, but BLOOM uses ALiBi and has no position ids to "
                           "reset per document; set data.document_boundaries: false for BLOOM flavors.")
