"""Fused ALiBi attention for transformers' BLOOM in training (issue 24, item 7).

transformers' ``BloomAttention`` has one path, eager: it materialises the (B, H, T, T) scores with
the ALiBi bias (``baddbmm``), a float softmax of them and their dropout, per layer, and keeps the
probabilities for backward. ``install_alibi_attention`` gives the model a fused path instead:

- ``sdpa``: ``scaled_dot_product_attention`` with ALiBi and the causal / document mask as one
  additive float bias, built once per forward and shared by every layer (still (1 or B, H, T, T),
  but no per-layer scores or probabilities are kept; on a GPU the efficient-attention kernel
  takes it). Exact on CPU and GPU, backward included: the CPU default.
- ``flex_attention``: FlexAttention with ALiBi as a ``score_mod`` and the mask as a ``BlockMask``:
  nothing T × T exists, and blocks above the diagonal or across documents are skipped. Compiled
  on a GPU (transformers' compiled flex, as its Mistral path uses): the GPU default. On CPU it
  runs unfused and forward only (PyTorch has no FlexAttention backward on CPU), which is what the
  tests hold its maths with.

The bias is ALiBi's ``slope_h · (k − q)`` for key k and query q. HF adds ``slope_h · k`` instead,
the same softmax by its translation invariance, but not the same numbers: in bf16, ``slope · k``
at k ≈ 2000 is rounded to a step of 8, far coarser than the neighbouring keys' difference; the
relative form is exact near the diagonal and computed in fp32 inside the flex kernel.

Packed documents (``data.document_boundaries``, SFT rows): position ids that restart at a
document start (training.model.packing) mark its boundaries, as for Mistral; inside one document
``k − q`` is exactly the distance ALiBi sees when the document is alone, so a packed document
gets the logits it would get on its own (HF's eager BLOOM ignores position ids: it cannot).

How it hooks in, without a fork of the model: the BLOOM modules are transformers' own, with their
own weights and ``_reshape`` / ``_merge_heads`` / ``dropout_add``; on the instance,

- ``BloomForCausalLM.forward`` and ``BloomModel.forward`` turn a training call (no cache, no
  padding mask, no attention probabilities asked for) into a call with a 4D ``attention_mask``:
  the bias or the BlockMask above. transformers passes a 4D mask through ``create_causal_mask``
  as it is, so neither its (B, 1, T, T) eager mask nor its alibi tensor is built;
- ``BloomModel.build_alibi_tensor`` returns None for such a mask (HF's BLOOM cannot take a 4D
  mask at all: it fails on it), and every layer gets it as its argument, so activation
  checkpointing recomputes the layer with the same mask;
- ``BloomAttention.forward`` runs the fused kernel when its alibi is None, and HF's own forward
  otherwise: generation with a KV cache, a 2D padding mask or ``output_attentions`` are exactly
  transformers' BLOOM. Exported models are built from the config (training.export): plain HF BLOOM.

ZeRO-3's parameter hooks sit on the submodules (``query_key_value``, ``dense``), which the fused
forward calls as the eager one does, in the same order.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from norallm.errors import NorallmError

KINDS = ("sdpa", "flex_attention")


@functools.lru_cache(maxsize=16)
def alibi_slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """(H,) fp32: BLOOM's ALiBi slopes, read off transformers' own ``build_alibi_tensor`` (the
    bias of key 1 is its slope times 1), so they are HF's in every 5.x version."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    return build_alibi_tensor(torch.ones(1, 2, device=device), num_heads, torch.float32)[:, 0, 1]


def document_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) position ids → (B, T) document ids (a position that does not follow its predecessor
    by 1 starts a document: transformers' own rule, as for Mistral), or None for one document."""
    if position_ids is None:
        return None
    from transformers.masking_utils import find_packed_sequence_indices

    return find_packed_sequence_indices(position_ids)


def sdpa_bias(num_heads: int, seq_len: int, doc_ids: torch.Tensor | None, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """(1 or B, H, T, T) in ``dtype``: slope_h · (k − q) where query q may attend key k (k ≤ q,
    same document), −inf elsewhere. Every row keeps its diagonal, so no row is all −inf."""
    pos = torch.arange(seq_len, device=device)
    distance = pos[None, :] - pos[:, None]  # (T, T): k − q
    bias = (alibi_slopes(num_heads, device)[:, None, None] * distance).to(dtype)[None]  # (1, H, T, T)
    allowed = (distance <= 0)[None, None]  # (1, 1, T, T) causal
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # (B, 1, T, T)
    return bias.masked_fill(~allowed, float("-inf"))


@functools.lru_cache(maxsize=8)
def _causal_block_mask(seq_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q, k):
        return q >= k

    return create_block_mask(causal, None, None, seq_len, seq_len, device=device)


def flex_block_mask(seq_len: int, doc_ids: torch.Tensor | None, device: torch.device):
    """A BlockMask: causal, and within a document when ``doc_ids`` (B, T) is given."""
    if doc_ids is None:
        return _causal_block_mask(seq_len, device)
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_document(b, h, q, k):
        return (q >= k) & (doc_ids[b, q] == doc_ids[b, k])

    return create_block_mask(causal_document, doc_ids.size(0), None, seq_len, seq_len, device=device)


def _alibi_score_mod(slopes: torch.Tensor):
    def alibi(score, b, h, q, k):
        return score + slopes[h] * (k - q)

    return alibi


def _flex(query, key, value, score_mod, block_mask, scale: float, training: bool) -> torch.Tensor:
    if query.is_cuda:  # compiled once for the process, as transformers' Mistral flex path is
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        return compile_friendly_flex_attention(query, key, value, training=training, score_mod=score_mod,
                                               block_mask=block_mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _attention_forward(self, hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor | None,
                       attention_mask, layer_past=None, use_cache: bool = False, output_attentions: bool = False,
                       **kwargs):
    """BloomAttention.forward with the fused kernel; HF's own forward when HF built the alibi."""
    if alibi is not None:
        return self._norallm_hf_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                        use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # (B, H, T, D) each
    if isinstance(attention_mask, torch.Tensor):
        dropout = self.attention_dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask.to(query.dtype),
                                                 dropout_p=dropout, scale=self.inv_norm_factor)
    else:
        context = _flex(query, key, value, _alibi_score_mod(alibi_slopes(self.num_heads, query.device)),
                        attention_mask, self.inv_norm_factor, self.training)
    context = self._merge_heads(context.reshape(batch_size * self.num_heads, q_length, self.head_dim))  # (B, T, C)
    from transformers.models.bloom.modeling_bloom import dropout_add

    return dropout_add(self.dense(context), residual, self.hidden_dropout, self.training), None


def _fused_mask(transformer, seq_len: int, device: torch.device, position_ids: torch.Tensor | None):
    """The 4D ``attention_mask`` the fused layers read: the SDPA bias or the flex BlockMask."""
    doc_ids = document_ids(position_ids)
    if transformer.norallm_attention == "flex_attention":
        return flex_block_mask(seq_len, doc_ids, device)
    dtype = transformer.word_embeddings.weight.dtype
    return sdpa_bias(transformer.config.n_head, seq_len, doc_ids, dtype, device)


def _with_fused_mask(transformer, input_ids, kwargs: dict) -> dict:
    """A call's keyword arguments, with the fused mask as ``attention_mask`` when it is a training
    call (no padding mask, no KV cache, no attention probabilities) and its position ids read. Any
    other call keeps its arguments, and BLOOM ignores position ids as transformers' BLOOM does."""
    config = transformer.config
    position_ids = kwargs.pop("position_ids", None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name differs across transformers 5.x
    use_cache = kwargs.get("use_cache")
    use_cache = config.use_cache if use_cache is None else use_cache
    attentions = kwargs.get("output_attentions")
    attentions = config.output_attentions if attentions is None else attentions
    if kwargs.get("attention_mask") is None and cache is None and not use_cache and not attentions:
        ref = input_ids if input_ids is not None else kwargs["inputs_embeds"]  # (B, T) or (B, T, C)
        kwargs["attention_mask"] = _fused_mask(transformer, ref.shape[1], ref.device, position_ids)
    return kwargs


def _model_forward(self, input_ids=None, *args, **kwargs):
    """BloomModel.forward, with a training call's mask made fused."""
    if not args:  # (transformers passes everything after input_ids by name)
        kwargs = _with_fused_mask(self, input_ids, kwargs)
    return self._norallm_hf_forward(input_ids, *args, **kwargs)


def _lm_forward(self, input_ids=None, *args, **kwargs):
    """BloomForCausalLM.forward, which does not pass position ids on to BloomModel: a training
    call's packed documents become the fused mask here."""
    if not args:
        kwargs = _with_fused_mask(self.transformer, input_ids, kwargs)
    return self._norallm_hf_forward(input_ids, *args, **kwargs)


def _build_alibi_tensor(self, attention_mask, num_heads: int, dtype: torch.dtype):
    """None for a 4D mask (the fused layers' own); HF's alibi tensor for a 2D padding mask."""
    if len(attention_mask.shape) == 4:
        return None
    return self._norallm_hf_build_alibi(attention_mask, num_heads, dtype)


def bloom_attention(model_cfg, on_gpu: bool) -> str | None:
    """``model.attn_implementation`` resolved for a BLOOM flavor (None for others): ``auto`` is
    flex_attention on a GPU (sdpa where ``attention_dropout`` is set, which flex lacks) and sdpa
    on CPU; ``eager`` is transformers' own path."""
    from training.model.families import FLAVORS

    if FLAVORS[model_cfg.flavor].arch != "bloom":
        return None
    if model_cfg.attn_implementation != "auto":
        return model_cfg.attn_implementation
    return "flex_attention" if on_gpu and not model_cfg.overrides.get("attention_dropout") else "sdpa"


def install_alibi_attention(model: torch.nn.Module, kind: str) -> None:
    """Give a BloomForCausalLM the fused ALiBi attention ``kind`` (``sdpa`` or ``flex_attention``)
    for training calls; everything else stays transformers' BLOOM (module docstring)."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    if kind not in KINDS:
        raise ValueError(f"fused BLOOM attention is one of {KINDS}, not {kind!r}")
    config = model.config
    if config.pretraining_tp > 1 and config.slow_but_exact:
        raise NorallmError("this BLOOM config has slow_but_exact with pretraining_tp > 1 (a sliced output "
                           "projection); set model.attn_implementation: eager to train it as transformers does.")
    if kind == "flex_attention" and config.attention_dropout > 0:
        raise NorallmError(f"FlexAttention has no attention dropout, and this BLOOM has attention_dropout "
                           f"{config.attention_dropout}; set model.attn_implementation: sdpa (or eager).")
    transformer = model.transformer
    if getattr(transformer, "norallm_attention", None) is not None:
        raise ValueError("fused BLOOM attention is installed already")
    for module in transformer.modules():
        if isinstance(module, BloomAttention):
            module._norallm_hf_forward = module.forward
            module.forward = types.MethodType(_attention_forward, module)
    transformer._norallm_hf_build_alibi = transformer.build_alibi_tensor
    transformer.build_alibi_tensor = types.MethodType(_build_alibi_tensor, transformer)
    transformer._norallm_hf_forward = transformer.forward
    transformer.forward = types.MethodType(_model_forward, transformer)
    model._norallm_hf_forward = model.forward
    model.forward = types.MethodType(_lm_forward, model)
    transformer.norallm_attention = kind
