"""The MFU estimate's FLOPs per token (training.loop.metrics), counted against the parameters by hand."""

from __future__ import annotations

import pytest

from training.loop.metrics import flops_per_token
from training.model.build import SpecialIds, build_model, hf_config
from training.model.families import FLAVORS


@pytest.mark.parametrize("flavor", sorted(name for name in FLAVORS if name.startswith("tiny-")))
def test_flops_per_token_counts_every_matmul_weight_and_a_tied_head_once(flavor):
    """6 × N + 12 × layers × width × seq_len, N every weight a token's forward multiplies by:
    not the input embedding (a lookup), but the LM head; a tied head (BLOOM, Qwen2, Gemma-2) is the
    embedding, so leaving the embedding out would drop the head's vocab × hidden matmul (3 % of
    BLOOM-7B's N). The width is what the attention output projection reads: heads × head_dim,
    not hidden where a family sets head_dim (Mistral-Nemo: 4096 against hidden 5120)."""
    model = build_model(hf_config(flavor, {}, 300, SpecialIds(1, 2, 0)), seed=0)
    cfg = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter
    if cfg.tie_word_embeddings:
        assert head is emb
        matmul_weights = total  # the embedding is the head
    else:
        assert head is not emb
        matmul_weights = total - emb.numel()
    out_proj = FLAVORS[flavor].family.residual_out[0]  # the attention's output projection
    width = next(m.in_features for name, m in model.named_modules() if name.endswith(out_proj))
    layers, seq_len = cfg.num_hidden_layers, 128
    assert flops_per_token(model, seq_len) == 6.0 * matmul_weights + 12.0 * layers * width * seq_len
