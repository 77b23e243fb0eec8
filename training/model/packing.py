"""Intra-document attention for packed windows (``data.document_boundaries``) and SFT rows.

A window of ``seq_len + 1`` tokens packs several documents, each ended by EOS. Without this, a
token attends to the tail of the previous document too. With it, the batch carries document ids
(data_pipeline.batch.document_ids; an SFT row numbers its conversations), position ids restart at
0 at each document start (the token after an EOS, and the window's first token), and nothing else
is passed: transformers reads the document boundaries back from the position ids (a position that
does not follow its predecessor by 1 starts a new sequence) and builds the document mask in the
form the attention implementation needs —

- ``sdpa`` / ``eager`` (CPU, tests): a dense block-diagonal causal mask, exact;
- ``flex_attention`` (GPU default for masked documents): a FlexAttention ``BlockMask``, which
  skips whole blocks and never materialises T × T;
- ``flash_attention_2``: varlen kernels from the position ids.

So no (B, 1, T, T) tensor is built here, and the same batch is right for every implementation.
``block_causal_mask`` is the explicit reference that tests hold transformers' masks against.

BLOOM (ALiBi, no rotary positions) reads the same position ids in its fused attention
(training.model.alibi): a packed document gets the ALiBi distances it has alone. Its eager attention
(transformers' own) ignores them, so the config refuses document masks with it.
"""

from __future__ import annotations

import torch


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) → (B, T): each position's offset from the start of its document."""
    _, seq_len = doc_ids.shape
    idx = torch.arange(seq_len, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of_doc = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - start_of_doc


def block_causal_mask(doc_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """The reference: (B, T) document ids → (B, T, T) bool, True where query q may attend key k
    (same document, k ≤ q, and q − k < sliding_window when given)."""
    _, seq_len = doc_ids.shape
    q = torch.arange(seq_len, device=doc_ids.device)
    allowed = q[:, None] >= q[None, :]  # (T, T) causal
    if sliding_window is not None:
        allowed = allowed & (q[:, None] - q[None, :] < sliding_window)
    return allowed[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)


def hybrid_allowed(doc_ids: torch.Tensor, bidirectional: torch.Tensor) -> torch.Tensor:
    """The reference of ``train.objective: hybrid``: (B, T) document ids and (B,) bidirectional
    rows → (B, T, T) bool, True where query q may attend key k: the same document, and k ≤ q
    unless the row is bidirectional (a masked row sees its whole document)."""
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    q = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    causal = (q[:, None] >= q[None, :])[None]
    return same_doc & (causal | bidirectional.bool()[:, None, None])


def hybrid_attention_mask(doc_ids: torch.Tensor, bidirectional: torch.Tensor, implementation: str,
                          dtype: torch.dtype):
    """The mask of a batch that mixes causal and bidirectional rows, in the form
    ``implementation`` takes, passed to the model as ``attention_mask`` (transformers uses a 4D
    mask or a BlockMask as given; the position ids still restart per document for RoPE):

    - ``sdpa``: (B, 1, T, T) bool, exact;
    - ``eager``: (B, 1, T, T) additive, 0 where allowed and dtype's minimum elsewhere;
    - ``flex_attention``: a ``BlockMask`` with the same rule as a mask_mod (GPU; whole blocks
      outside every document are skipped, T × T is never materialised).
    """
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        docs, both = doc_ids, bidirectional.bool()

        def mask_mod(b, h, q, k):
            return (docs[b, q] == docs[b, k]) & ((q >= k) | both[b])

        batch, seq_len = doc_ids.shape
        return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=doc_ids.device)
    allowed = hybrid_allowed(doc_ids, bidirectional)[:, None]  # (B, 1, T, T)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"train.objective: hybrid has no mask for attn_implementation '{implementation}'")
