"""Speed levers that leave the model's maths alone (issue: training throughput).

- **Chunked linear + cross-entropy** (``model.fused_loss``): the LM head and the loss are computed
  a chunk of tokens at a time under activation checkpointing, so the (tokens × vocab) logits
  never exist at once, in bf16 or fp32 — at 8 × 2048 tokens and 32,768 entries that is 2 GiB of
  fp32 logits (plus as much for their gradient) not allocated. Pure PyTorch: runs on CPU and GPU.
  Gradients equal the plain path's up to float summation order.
- **Liger kernels** (``model.liger_kernel``): Triton RMSNorm, RoPE and SwiGLU (GeGLU for Gemma-2)
  from ``liger-kernel``, for the families whose registry entry names liger's patch function
  (training.model.families: all but BLOOM). GPU only; on CPU or without the package the
  transformers modules stay (logged), which is the CPU-testable fallback.
- **torch.compile** (``model.compile``): DeepSpeed's ``engine.compile()`` of the model.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutput

from data_pipeline.batch import IGNORE
from training import distributed


def chunked_loss_sums(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_tokens: int,
                      softcap: float | None = None, groups: torch.Tensor | None = None,
                      n_groups: int = 1) -> torch.Tensor:
    """(n_groups,) summed cross-entropy of ``head(hidden)`` against ``targets`` (``IGNORE``
    ignored) over (B, T, H) hidden states, per group of ``groups`` (B, T) ids (None: one group),
    ``chunk_tokens`` rows of logits at a time; each chunk's logits are recomputed in backward
    instead of kept. ``softcap``: the logits are ``softcap · tanh(logits / softcap)`` first, as
    Gemma-2's LM head gives them (its ``final_logit_softcapping``)."""
    h = hidden.reshape(-1, hidden.size(-1))  # (B·T, H)
    t = targets.reshape(-1)  # (B·T,)
    g = None if groups is None else groups.reshape(-1)
    n_groups = 1 if g is None else n_groups

    def chunk_loss(h_chunk: torch.Tensor, t_chunk: torch.Tensor, *g_chunk: torch.Tensor) -> torch.Tensor:
        logits = head(h_chunk).float()  # (chunk, V), freed after forward
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if not g_chunk:
            return F.cross_entropy(logits, t_chunk, ignore_index=IGNORE, reduction="sum")[None]
        per_token = F.cross_entropy(logits, t_chunk, ignore_index=IGNORE, reduction="none")  # 0 where ignored
        return per_token.new_zeros(n_groups).index_add(0, g_chunk[0], per_token)

    total = hidden.new_zeros(n_groups, dtype=torch.float32)
    for start in range(0, h.size(0), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        extra = () if g is None else (g[part],)
        total = total + checkpoint(chunk_loss, h[part], t[part], *extra, use_reentrant=False)
    return total


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                          chunk_tokens: int, softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` (``IGNORE`` ignored), a chunk of
    logits at a time (``chunked_loss_sums``)."""
    return chunked_loss_sums(hidden, head, targets, chunk_tokens, softcap).sum() / (targets != IGNORE).sum().clamp(min=1)


@dataclass
class LossOutput(CausalLMOutput):
    """The chunked loss's output: a ModelOutput (a dict), not a bare namespace, so that ZeRO-3's
    module hooks find the loss in it; ``loss_sums`` per target group when groups were given."""

    loss_sums: torch.FloatTensor | None = None


def install_chunked_loss(model: torch.nn.Module, chunk_tokens: int) -> None:
    """Give ``model.forward`` a ``targets=`` argument that returns the chunked loss (as ``.loss``)
    instead of logits; with ``target_groups=`` ((B, T) ids below ``n_groups``) also the summed loss
    of each group (as ``.loss_sums``, the hybrid objective's causal and masked targets). Without
    ``targets`` the forward is unchanged (generation, eval, export)."""
    plain_forward = model.forward
    base, head = model.base_model, model.get_output_embeddings()
    # the model's own forward soft-caps its logits (Gemma-2): the loss must see the same ones
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, *args, targets: torch.Tensor | None = None, target_groups: torch.Tensor | None = None,
                n_groups: int = 1, **kwargs):
        if targets is None:
            return plain_forward(*args, **kwargs)
        hidden = base(*args, **kwargs).last_hidden_state  # (B, T, H)
        sums = chunked_loss_sums(hidden, head, targets, chunk_tokens, softcap, target_groups, n_groups)
        loss = sums.sum() / (targets != IGNORE).sum().clamp(min=1)
        return LossOutput(loss=loss, loss_sums=None if target_groups is None else sums)

    model.forward = types.MethodType(forward, model)
    model.norallm_fused_loss = True


def apply_liger(model: torch.nn.Module, log=print) -> bool:
    """Swap in liger-kernel's Triton kernels where they apply; False (and a log line) otherwise."""
    if not distributed.runtime().is_gpu:
        log("[kernels] liger_kernel: no GPU, keeping the transformers modules")
        return False
    from training.model.families import FAMILIES

    fam = FAMILIES[model.config.model_type]
    if fam.liger is None:
        log(f"[kernels] liger_kernel: liger has no kernels for {fam.model_type}, keeping its modules")
        return False
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        log("[kernels] liger_kernel: package not installed (pip install liger-kernel), keeping the transformers modules")
        return False
    # The loss stays ours (fused_loss), so liger's own cross-entropy patches are off.
    getattr(liger, fam.liger)(**fam.liger_kwargs, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    return True
