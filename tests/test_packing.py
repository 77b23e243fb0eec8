"""Document boundaries in packed windows: position ids restart per document and attention stays
inside it, so a packed document's logits equal those of the document alone (tiny Mistral, fp32).
Only position ids are passed; transformers derives the document mask from them, and the tests hold
that mask against an explicit reference (training.model.packing.block_causal_mask)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import yaml

from data_pipeline.batch import document_ids, window_batch
from training.model.loss import causal_lm_loss, model_inputs
from training.model.packing import block_causal_mask, document_positions

EOS = 2
REPO = Path(__file__).resolve().parents[1]


def tiny_mistral(attn: str = "sdpa", sliding_window=None):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=sliding_window, use_cache=False)
    cfg._attn_implementation = attn
    return MistralForCausalLM(cfg).float().eval()


def test_positions_and_mask_on_an_exact_example():
    # a window that starts inside a document, then two documents, an empty one (EOS EOS) and a tail
    inputs = torch.tensor([[7, 8, EOS, 9, 10, 11, EOS, EOS, 12, 13]])
    assert document_ids(inputs, EOS).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 3, 3]]
    assert document_positions(document_ids(inputs, EOS)).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0, 1]]
    mask = block_causal_mask(document_ids(inputs, EOS))
    assert mask.shape == (1, 10, 10)
    allowed = mask[0].int().tolist()
    assert allowed[4] == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0], "token 10 sees 9 and itself"
    assert allowed[7] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0], "a lone EOS sees itself"
    assert allowed[9] == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    # rows are independent; a sliding window narrows each document's causal band
    two = torch.tensor([[5, 6, 7, 8], [5, EOS, 7, 8]])
    assert document_positions(document_ids(two, EOS)).tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    windowed = block_causal_mask(document_ids(two, EOS), sliding_window=2)[0].int()
    assert windowed.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    out = model_inputs(two, document_ids(two, EOS))  # what the loss calls the model with
    assert set(out) == {"input_ids", "position_ids", "use_cache"} and out["input_ids"] is two  # no T×T tensor
    assert out["use_cache"] is False and "position_ids" not in model_inputs(two)


@pytest.mark.parametrize("window", [None, 3])
def test_transformers_mask_from_position_ids_is_the_reference(window):
    """What SDPA receives for packed position ids equals the explicit block-causal mask. (Read off
    SDPA itself: transformers' mask builders change their signatures between 5.x releases.)"""
    model = tiny_mistral("sdpa", sliding_window=window)
    inputs = torch.tensor([[7, 8, EOS, 9, 10, 11, EOS, EOS, 12, 13], [5, 6, 7, 8, 9, EOS, 1, 2, 3, 4]])
    packed = model_inputs(inputs, document_ids(inputs, EOS))
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy), torch.no_grad():
        model(**packed)
    assert len(masks) == model.config.num_hidden_layers
    got = masks[0]
    want = block_causal_mask(document_ids(inputs, EOS), sliding_window=window)
    assert got.dtype == torch.bool and got.shape == (2, 1, 10, 10)
    assert torch.equal(got[:, 0], want)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_document_logits_equal_the_document_alone(attn):
    model = tiny_mistral(attn)
    gen = torch.Generator().manual_seed(1)
    doc_a = torch.randint(3, 97, (9,), generator=gen)
    doc_b = torch.randint(3, 97, (13,), generator=gen)
    packed = torch.cat([doc_a, torch.tensor([EOS]), doc_b])[None]  # [docA EOS docB]
    with torch.no_grad():
        got = model(**model_inputs(packed, document_ids(packed, EOS))).logits[0]
        alone_b = model(input_ids=doc_b[None]).logits[0]
        alone_a = model(input_ids=torch.cat([doc_a, torch.tensor([EOS])])[None]).logits[0]
        plain = model(input_ids=packed).logits[0]
    torch.testing.assert_close(got[10:], alone_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[:10], alone_a, rtol=0, atol=1e-5)
    assert (plain[10:] - alone_b).abs().max() > 1e-2, "without boundaries docB would see docA"


def test_causal_lm_loss_with_boundaries_is_the_per_document_loss():
    model = tiny_mistral()
    gen = torch.Generator().manual_seed(2)
    doc_a, doc_b = torch.randint(3, 97, (6,), generator=gen), torch.randint(3, 97, (9,), generator=gen)
    window = torch.cat([doc_a, torch.tensor([EOS]), doc_b])[None]  # (1, T+1)
    with torch.no_grad():
        loss = causal_lm_loss(model, window_batch(window.numpy(), EOS).map(torch.from_numpy))
        logits_a = model(input_ids=torch.cat([doc_a, torch.tensor([EOS])])[None]).logits[0]  # predicts b[0] last
        logits_b = model(input_ids=doc_b[None, :-1]).logits[0]
        want = F.cross_entropy(torch.cat([logits_a, logits_b]), window[0, 1:])
        plain = causal_lm_loss(model, window_batch(window.numpy()).map(torch.from_numpy))
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
    assert abs(float(plain) - float(want)) > 1e-4


def test_bloom_masks_documents_with_its_fused_attention_only():
    """BLOOM's fused ALiBi attention (training.model.alibi, tests/test_alibi.py) masks packed documents;
    transformers' eager BLOOM ignores position ids, so with eager the config refuses them."""
    from training.config import ConfigError, parse_config

    base = {"name": "b", "model": {"flavor": "tiny-bloom"}, "tokenizer": {"path": "tok"},
            "data": {"sources": [{"name": "a", "paths": ["a.jsonl"]}], "shards_dir": "s", "seq_len": 8,
                     "document_boundaries": True},
            "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1, "lr": 1e-3}}
    assert parse_config(base).data.document_boundaries is True
    assert parse_config({**base, "model": {"flavor": "tiny-bloom", "attn_implementation": "flex_attention"}})
    with pytest.raises(ConfigError, match="ignores position ids"):
        parse_config({**base, "model": {"flavor": "tiny-bloom", "attn_implementation": "eager"}})


@pytest.mark.slow
def test_training_with_document_boundaries_on_a_mixture(tmp_path):
    """`norallm train` end to end with data.document_boundaries and a three-source mixture."""
    from training.config import parse_config
    from training.data.pretraining import run_prepare

    smoke = REPO / "data_pipeline" / "smoke_corpus"
    raw = {"name": "docs", "seed": 1, "model": {"flavor": "tiny-mistral"},
           "tokenizer": {"path": str(tmp_path / "tok"), "train": True, "vocab_size": 400},
           "data": {"sources": [{"name": "nob", "language": "nob", "paths": [str(smoke / "nob.jsonl")]},
                                {"name": "nno", "language": "nno", "paths": [str(smoke / "nno.jsonl")],
                                 "share": 0.3}],
                    "shards_dir": str(tmp_path / "shards"), "seq_len": 64, "valid_fraction": 0.1,
                    "document_boundaries": True},
           "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 3, "lr": 1e-3, "precision": "fp32"},
           "eval": {"every_steps": 0, "max_samples": 4}, "checkpoint": {"every_steps": 3}}
    cfg = parse_config(raw)
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", str(config), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] == m["loss"] for m in metrics)
