"""The MFU estimate's FLOPs per token (training.loop.metrics), counted against the parameters by hand."""

from __future__ import annotations

import pytest

from training.loop.metrics import flops_per_token
from training.model.build import SpecialIds, build_model, hf_config


@pytest.mark.parametrize("flavor", ["tiny-mistral", "tiny-bloom"])
def test_flops_per_token_counts_every_matmul_weight_and_a_tied_head_once(flavor):
    """6 × N + 12 × layers × hidden × seq_len, N every weight a token's forward multiplies by:
    not the input embedding (a lookup), but the LM head; BLOOM's head is the tied embedding, so
    leaving the embedding out would drop the head's vocab × hidden matmul (3 % of BLOOM-7B's N)."""
    model = build_model(hf_config(flavor, {}, 300, SpecialIds(1, 2, 0)), seed=0)
    cfg = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter
    if flavor == "tiny-bloom":
        assert head is emb
        matmul_weights = total  # the embedding is the head
    else:
        assert head is not emb
        matmul_weights = total - emb.numel()
    layers, hidden, seq_len = cfg.num_hidden_layers, cfg.hidden_size, 128
    assert flops_per_token(model, seq_len) == 6.0 * matmul_weights + 12.0 * layers * hidden * seq_len
