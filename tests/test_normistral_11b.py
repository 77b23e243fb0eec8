"""configs/normistral-11b-warm.yaml against NORA's published 11B recipe: the shape and its parameter
count, the two stages' steps and learning rates, the mixture with Norwegian repeated 4 times, and
the tokenizer section's options (no processes, no model weights: the meta device)."""

from __future__ import annotations

import pytest

from training.config import load_config
from training.loop.engine import lr_at
from training.model.build import SpecialIds, count_parameters, hf_config

CONFIG = "configs/normistral-11b-warm.yaml"


@pytest.fixture(scope="module")
def cfg(monkeypatch_module):
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORALLM_DATA", "/nonexistent/data")
        mp.setenv("NORALLM_MODELS", "/nonexistent/models")
        yield mp


def test_the_published_shape_counts_11_4b_parameters_by_hand_and_on_the_meta_device(cfg):
    # Mistral-Nemo-Base-2407: 40 layers, hidden 5120, FFN 14336, 32 query heads and 8 KV heads of
    # 128, untied, at the new 51,200 rows.
    hidden, ffn, layers, heads, kv, head_dim, vocab = 5120, 14336, 40, 32, 8, 128, 51200
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    per_layer = attention + 3 * hidden * ffn + 2 * hidden
    by_hand = layers * per_layer + hidden + 2 * vocab * hidden
    assert by_hand == 11_429_893_120
    config = hf_config(cfg.model.flavor, cfg.model.overrides, cfg.model_vocab_size, SpecialIds(1, 2, 0))
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim, config.num_key_value_heads) == (
        40, 5120, 128, 8)
    assert count_parameters(config) == by_hand


def test_the_plan_is_1000_plus_60000_steps_with_norwegian_repeated_four_times(cfg):
    from training.data.pretraining import data_plan

    assert cfg.tokens_per_step == 1024 * 4096
    stage3 = (cfg.train.max_steps - cfg.train.frozen_body_steps) * cfg.tokens_per_step
    assert (cfg.train.frozen_body_steps, stage3) == (1000, 251_658_240_000)  # "~252B tokens"
    plan = data_plan(cfg.data, cfg.train.global_batch_size, cfg.train.max_steps, cfg.model_vocab_size)
    assert plan.problems == []
    lines = {line.name: line for line in plan.sources}
    published = {"nob": 48.8, "nno": 5.0, "swe": 15, "dan": 15, "isl": 1.0, "fao": 0.1, "smi": 0.6,
                 "eng": 4.6, "code": 10}
    assert set(lines) == set(published)
    for name, percent in published.items():  # the published ones sum to 100.1 %
        assert lines[name].share * 100 == pytest.approx(percent, abs=0.11), name
    assert lines["nob"].share / lines["nno"].share == pytest.approx(48.8 / 5.0, rel=1e-4)
    assert lines["nob"].epochs == pytest.approx(4.0, abs=0.01)
    assert lines["nno"].epochs == pytest.approx(4.0, abs=0.01)


def test_the_lr_is_stage_2_2_then_stage_3s_warmup_stable_cooldown(cfg):
    t = cfg.train
    assert {lr_at(s, t) for s in range(0, 1000, 37)} | {lr_at(999, t)} == {1e-4}  # embeddings only
    assert lr_at(1000, t) == pytest.approx(1e-4 / 4000)  # stage 3's warmup starts
    assert lr_at(4999, t) == pytest.approx(1e-4)
    cooldown_start = 1000 + 60000 - 40000
    assert lr_at(cooldown_start - 1, t) == 1e-4 and lr_at(cooldown_start, t) < 1e-4
    assert lr_at(60999, t) == pytest.approx(t.min_lr)
    assert t.grad_clip == 2.5 and t.betas == (0.9, 0.95) and t.weight_decay == 0.1


def test_the_objective_is_the_published_hybrid_with_masked_lm_batches(cfg):
    t = cfg.train
    h = t.hybrid
    assert t.objective == "hybrid" and h.unit == "batch"
    assert (h.masked_fraction, h.mask_ratio, tuple(h.span), h.to_mask, h.to_random, h.mask_token) == (
        0.1, 1 / 6, (1, 3), 0.8, 0.1, "<mask>")
    assert cfg.data.document_boundaries and "<mask>" in cfg.tokenizer.extra_special_tokens


def test_the_tokenizer_section_trains_16_specials_with_mask_nfkc_and_single_digits(cfg, shared_data, tmp_path):
    from data_pipeline.config import DataConfig
    from training.data.pretraining import ensure_tokenizer

    tok_cfg = cfg.tokenizer.model_copy(update={"path": str(tmp_path / "tok"), "vocab_size": 1200,
                                               "train_documents": 300})
    data = DataConfig(shards_dir=str(tmp_path / "shards"), seq_len=64,
                      sources=[{"name": "nob", "paths": [str(shared_data / "train.jsonl")]}])
    tok = ensure_tokenizer(tok_cfg, data)
    specials = ["<pad>", "<s>", "</s>", *cfg.tokenizer.extra_special_tokens]
    assert len(specials) == 16 and [tok.token_id(s) for s in specials] == list(range(16))
    assert (tok.bos_id, tok.eos_id, tok.token_id("<mask>")) == (1, 2, 3)
    assert [tok.id_to_token(i) for i in tok.encode("1814")] == ["1", "8", "1", "4"]
    assert tok.decode(tok.encode("ﬁ")) == "fi"
    assert max(len(tok.id_to_token(i)) for i in range(16, tok.vocab_size)) <= 24
