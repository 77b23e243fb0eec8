"""train.objective: hybrid (NORA 11B): the span masking of data_pipeline.masking, the hybrid
attention mask held to its reference in every form, the model seeing both ways only inside a
masked row's documents, the loss split into its causal and masked parts on both loss paths, the
config's refusals, and a 2-rank run whose stop and resume equal the straight run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.batch import IGNORE, Batch, window_batch
from data_pipeline.masking import HybridWindows, SpanMasking
from training.config import ConfigError, parse_config
from training.model.loss import CAUSAL, MASKED, batch_inputs, lm_loss
from training.model.packing import hybrid_allowed, hybrid_attention_mask

EOS, MASK = 2, 3
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def windows(n: int = 64, length: int = 257, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).integers(10, 90, size=(n, length))
    w[:, 40] = w[:, 41] = EOS  # an empty document too
    if length > 150:
        w[:, 150] = EOS
    return w


def masking(**kw) -> SpanMasking:
    return SpanMasking(**{"mask_id": MASK, "random_ids": (10, 90), "eos_id": EOS, "seed": 5, **kw})


# ------------------------------------------------------------------------------------ the masking


def test_masked_rows_corrupt_a_sixth_in_short_spans_and_predict_each_from_the_position_before():
    w = windows(400)
    batch = window_batch(w, EOS)
    out = masking().apply(batch, range(400))
    rows = np.flatnonzero(out.bidirectional)
    assert 0.06 < len(rows) / 400 < 0.14  # masked_fraction 0.1
    draws = []
    for r in rows:
        labels, inputs, original = out.labels[r], out.input_ids[r], w[r, :-1]
        chosen = np.flatnonzero(labels != IGNORE) + 1  # corrupted input positions
        eligible = [p for p in range(1, 256) if original[p] != EOS and original[p - 1] != EOS]
        assert set(chosen) <= set(eligible)  # never an EOS, never right after one
        assert len(chosen) == round(len(eligible) / 6)
        assert np.array_equal(labels[chosen - 1], w[r, chosen])  # the original token, one position early
        untouched = np.setdiff1d(np.arange(256), chosen)
        assert np.array_equal(inputs[untouched], original[untouched])
        draws += [("mask" if inputs[p] == MASK else "same" if inputs[p] == original[p] else "random") for p in chosen]
    # spans of 1–3 tokens: sparse enough that spans rarely touch, the runs of chosen positions show them
    sparse = masking(mask_ratio=0.02)
    runs = []
    for r in range(400):
        chosen = sparse.positions(w[r], sparse.rng(r, w[r]))
        runs += [len(run) for run in np.split(chosen, np.flatnonzero(np.diff(chosen) != 1) + 1)]
    assert np.mean(np.array(runs) <= 3) > 0.97 and {1, 2, 3} <= set(runs)
    counts = {k: draws.count(k) / len(draws) for k in ("mask", "random", "same")}
    assert 0.76 < counts["mask"] < 0.84 and 0.07 < counts["random"] < 0.13 and 0.07 < counts["same"] < 0.13
    causal = np.setdiff1d(np.arange(400), rows)
    assert np.array_equal(out.input_ids[causal], batch.input_ids[causal])
    assert np.array_equal(out.labels[causal], batch.labels[causal])
    assert np.array_equal(out.doc_ids, batch.doc_ids)  # boundaries from the uncorrupted tokens


def test_the_masking_is_a_function_of_seed_sample_and_tokens_alone():
    w = windows(64)
    batch = window_batch(w, EOS)
    whole = masking().apply(batch, range(100, 164))
    # two ranks, or other micro-batches, reading the same global samples mask them the same way
    halves = [masking().apply(batch[a:b], range(100 + a, 100 + b)) for a, b in ((0, 24), (24, 64))]
    for field in ("input_ids", "labels", "bidirectional"):
        assert np.array_equal(getattr(whole, field), np.concatenate([getattr(h, field) for h in halves]))
    every = masking().apply(batch, range(100, 164), every_row=True)
    other_seed = masking(seed=6).apply(batch, range(100, 164), every_row=True)
    other_index = masking().apply(batch, range(200, 264), every_row=True)
    assert every.bidirectional.all()
    assert not np.array_equal(every.input_ids, other_seed.input_ids)
    assert not np.array_equal(every.input_ids, other_index.input_ids)  # a repeated window masks anew


def test_with_unit_batch_a_global_batch_is_masked_or_causal_as_a_whole_on_every_rank():
    """NORA's masked-LM batches: 10 % of the global batches all masked, the rest all causal, the
    same whichever rank or micro-batch reads a sample; a masked sample is corrupted as it is
    with unit: sample (its own generator), so only which samples are masked differs."""
    gbs, n = 8, 8 * 300
    w = windows(n, length=65)
    batch = window_batch(w, EOS)
    by_batch = masking(batch_size=gbs)
    whole = by_batch.apply(batch, range(n))
    steps = whole.bidirectional.reshape(-1, gbs)
    assert (steps.all(axis=1) | ~steps.any(axis=1)).all()  # never a mixed step
    assert 0.06 < steps[:, 0].mean() < 0.14  # masked_fraction 0.1 of the steps
    ranks = [by_batch.apply(batch[r::2], range(r, n, 2)) for r in (0, 1)]  # two ranks' shares of each step
    for r, part in enumerate(ranks):
        assert np.array_equal(part.input_ids, whole.input_ids[r::2])
        assert np.array_equal(part.bidirectional, whole.bidirectional[r::2])
    by_sample = masking().apply(batch, range(n), every_row=True)
    rows = np.flatnonzero(whole.bidirectional)
    assert np.array_equal(whole.input_ids[rows], by_sample.input_ids[rows])
    assert np.array_equal(whole.labels[rows], by_sample.labels[rows])
    per_sample = masking().apply(batch, range(n)).bidirectional.reshape(-1, gbs)
    assert not (per_sample.all(axis=1) | ~per_sample.any(axis=1)).all()  # the default mixes them in a step


class _Windows:  # the part of MixtureWindows HybridWindows reads
    every_target_trained = True

    def __init__(self, w):
        self.w = w

    def batch(self, samples):
        return window_batch(self.w[list(samples)], EOS)

    def epoch(self, consumed):
        return consumed / len(self.w)

    def state_dict(self):
        return {"fingerprint": "f"}

    def resume(self, state, consumed):
        return ""


def test_hybrid_windows_is_the_inner_source_with_its_samples_masked():
    inner = _Windows(windows(32))
    source = HybridWindows(inner, masking(masked_fraction=0.5))
    assert not source.every_target_trained  # masked rows train fewer targets: counted across ranks
    got = source.batch(range(8, 16))
    assert np.array_equal(got.input_ids, masking(masked_fraction=0.5).apply(inner.batch(range(8, 16)),
                                                                              range(8, 16)).input_ids)
    assert source.state_dict() == {"fingerprint": "f"} and source.epoch(16) == 0.5 and source.w is inner.w


# ------------------------------------------------------------------------------------ the attention mask


def doc_batch():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1, 2, 2]])
    return doc_ids, torch.tensor([True, False])


def test_the_hybrid_mask_is_bidirectional_inside_documents_for_masked_rows_only():
    doc_ids, both = doc_batch()
    allowed = hybrid_allowed(doc_ids, both)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    assert torch.equal(allowed[0], same[0])  # masked row: its whole document
    assert torch.equal(allowed[1], same[1] & torch.ones(8, 8, dtype=torch.bool).tril())  # causal row
    assert torch.equal(hybrid_attention_mask(doc_ids, both, "sdpa", torch.float32), allowed[:, None])
    eager = hybrid_attention_mask(doc_ids, both, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and torch.equal(eager == 0, allowed[:, None])
    assert (eager[~allowed[:, None]] == torch.finfo(torch.bfloat16).min).all()
    with pytest.raises(ValueError, match="flash_attention_2"):
        hybrid_attention_mask(doc_ids, both, "flash_attention_2", torch.float32)


def test_the_flex_block_mask_has_the_reference_rule():
    from torch.nn.attention.flex_attention import create_mask

    doc_ids, both = doc_batch()
    block = hybrid_attention_mask(doc_ids, both, "flex_attention", torch.float32)
    dense = create_mask(block.mask_mod, 2, 1, 8, 8, device="cpu")  # the rule the BlockMask skips blocks by
    assert torch.equal(dense[:, 0], hybrid_allowed(doc_ids, both))


# ------------------------------------------------------------------------------------ the model and the loss


def tiny(attn: str = "sdpa", fused: bool = False):
    from training.model.build import SpecialIds, build_model, hf_config
    from training.model.kernels import install_chunked_loss

    config = hf_config("tiny-mistral", {}, 97, SpecialIds(1, EOS, 0))
    config._attn_implementation = attn
    model = build_model(config, seed=0).eval()
    if fused:
        install_chunked_loss(model, chunk_tokens=24)
    return model


def hybrid_batch(both=(True, False)) -> Batch:
    """Two rows of four documents (EOS at 20, 40 and 41): the first masked, the second causal."""
    w = windows(2, 49, seed=1)
    w[:, 20] = EOS
    plain = window_batch(w, EOS)
    masked, rows = masking().apply(plain, range(2), every_row=True), np.array(both)[:, None]
    return Batch(np.where(rows, masked.input_ids, plain.input_ids), np.where(rows, masked.labels, plain.labels),
                 plain.doc_ids, np.array(both))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_masked_row_sees_its_document_both_ways_and_nothing_else(attn):
    model = tiny(attn)
    assert model.config._attn_implementation == attn
    batch = hybrid_batch().map(torch.from_numpy)
    logits = model(**batch_inputs(model, batch)).logits
    changed = batch.input_ids.clone()
    changed[:, 30] = (changed[:, 30] + 1 - 10) % 80 + 10  # a token of each row's second document
    after = model(**batch_inputs(model, Batch(changed, batch.labels, batch.doc_ids, batch.bidirectional))).logits
    moved = (after - logits).abs().amax(-1) > 1e-6  # (B, T): positions whose logits changed
    assert moved[0, 21:41].all() and not moved[0, :21].any() and not moved[0, 41:].any()  # its whole document
    assert not moved[1, :30].any() and moved[1, 30:41].all() and not moved[1, 41:].any()  # causal: from it on
    # the causal row of a hybrid batch has the logits of the plain document-masked path
    plain = model(**batch_inputs(model, Batch(batch.input_ids, batch.labels, batch.doc_ids))).logits
    torch.testing.assert_close(logits[1], plain[1], rtol=1e-5, atol=1e-5)


def test_the_loss_parts_are_the_causal_and_masked_means_on_both_loss_paths():
    import torch.nn.functional as F

    batch = hybrid_batch().map(torch.from_numpy)
    plain, fused = tiny(), tiny(fused=True)
    loss, parts = lm_loss(plain, batch)
    logits = plain(**batch_inputs(plain, batch)).logits
    for row, group in ((0, MASKED), (1, CAUSAL)):
        ref = F.cross_entropy(logits[row], batch.labels[row], ignore_index=IGNORE, reduction="sum")
        torch.testing.assert_close(parts[group, 0], ref)
        assert parts[group, 1] == (batch.labels[row] != IGNORE).sum()
    torch.testing.assert_close(loss, parts[:, 0].sum() / parts[:, 1].sum())
    fused_loss, fused_parts = lm_loss(fused, batch)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_parts, parts, rtol=1e-5, atol=1e-5)
    assert lm_loss(fused, Batch(batch.input_ids, batch.labels, batch.doc_ids))[1] is None  # causal: no parts


# ------------------------------------------------------------------------------------ the config


def hybrid_raw(tmp_path: Path, **train) -> dict:
    return {"model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(tmp_path / "tok")},
            "data": {"sources": [{"name": "a", "paths": ["x.jsonl"]}], "shards_dir": str(tmp_path / "s"),
                     "seq_len": 64, "document_boundaries": True},
            "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 4, "lr": 1e-3,
                      "objective": "hybrid", **train}}


@pytest.mark.parametrize("change,field,words", [
    ({"data": {"document_boundaries": False}}, "data.document_boundaries", "needs the documents' boundaries"),
    ({"sft": {}}, "train.objective", "pretraining objective"),
    ({"model": {"flavor": "tiny-bloom"}}, "train.objective", "is bloom"),
    ({"model": {"flavor": "tiny-gemma2"}}, "train.objective", "is gemma2"),
    ({"model": {"flavor": "tiny-mistral", "attn_implementation": "flash_attention_2"}},
     "model.attn_implementation", "cannot mix causal and bidirectional"),
    ({"model": {"flavor": "tiny-mistral", "overrides": {"sliding_window": 16}}}, "train.objective",
     "sliding window of 16 < data.seq_len 64"),
    ({"train": {"hybrid": {"span": [3, 1]}}}, "train.hybrid.span", "shortest ≤ longest"),
    ({"train": {"hybrid": {"to_mask": 0.8, "to_random": 0.3}}}, "train.hybrid.to_random", "> 1"),
    ({"train": {"hybrid": {"mask_ratoi": 0.2}}}, "train.hybrid.mask_ratoi", "did you mean 'mask_ratio'"),
])
def test_the_config_refuses_what_hybrid_cannot_train(tmp_path, change, field, words):
    raw = hybrid_raw(tmp_path)
    for section, values in change.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert any(path == field and words in msg for path, msg in err.value.problems), err.value.problems


def test_the_config_takes_the_published_settings_and_a_missing_mask_token_is_named(tmp_path):
    from data_pipeline.tokenizer import train_bpe
    from training.data.pretraining import hybrid_masking

    cfg = parse_config(hybrid_raw(tmp_path))
    h = cfg.train.hybrid
    assert (h.masked_fraction, h.mask_ratio, tuple(h.span), h.to_mask, h.to_random) == (0.1, 1 / 6, (1, 3), 0.8, 0.1)
    texts = ["Det var en gang en konge som hadde tre døtre."] * 30
    with_mask = train_bpe(texts, tmp_path / "tok", 300, min_frequency=1, extra_special=["<mask>", "<x>"])
    m = hybrid_masking(h, with_mask, cfg.data, cfg.seed, 8)
    assert (m.mask_id, m.random_ids, m.eos_id) == (3, (5, with_mask.vocab_size), 2)  # after pad, bos, eos and 2
    assert h.unit == "sample" and m.batch_size is None
    by_batch = hybrid_masking(h.model_copy(update={"unit": "batch"}), with_mask, cfg.data, cfg.seed, 8)
    assert by_batch.batch_size == 8
    without = train_bpe(texts, tmp_path / "plain", 300, min_frequency=1)
    with pytest.raises(ConfigError, match="'<mask>' is not a token of the tokenizer"):
        hybrid_masking(h, without, cfg.data, cfg.seed, 8)


# ------------------------------------------------------------------------------------ two ranks


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def hybrid_data(tmp_path_factory) -> Path:
    from test_training import tiny_config

    from training.data.pretraining import run_prepare

    root = tmp_path_factory.mktemp("hybrid")
    cfg = parse_config(_tiny_hybrid(tiny_config, root))
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    return root


def _tiny_hybrid(tiny_config, root: Path, stage: int = 2) -> dict:
    raw = tiny_config(root, objective="hybrid", hybrid={"masked_fraction": 0.3})
    raw["tokenizer"]["extra_special_tokens"] = ["<mask>"]
    raw["data"]["document_boundaries"] = True
    raw["zero"] = {"stage": stage}
    raw["logging"] = {"every_steps": 1}
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_train_hybrid_and_a_stopped_run_resumes_to_the_straight_one(hybrid_data, tmp_path, stage):
    from test_training import tiny_config, torchrun, write_config

    config = write_config(tmp_path / "c.yaml", _tiny_hybrid(tiny_config, hybrid_data, stage))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli = ["-m", "training.cli", "train", str(config), "--run-dir"]
    torchrun(*cli, str(straight))
    torchrun(*cli, str(resumed), "--stop-at", "3")
    torchrun(*cli, str(resumed))
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 7))
    for key in ("loss", "loss_causal", "loss_masked", "grad_norm"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert any(m["loss_masked"] is not None for m in a) and all(m["loss_causal"] is not None for m in a)
    for m in a:  # the step's loss is the token-weighted mean of its two parts
        assert m["loss_masked"] is None or min(m["loss_causal"], m["loss_masked"]) - 1e-4 <= m["loss"] \
            <= max(m["loss_causal"], m["loss_masked"]) + 1e-4
    evals = read_jsonl(straight / "eval.jsonl")
    assert evals == read_jsonl(resumed / "eval.jsonl")
    sources = [r for r in evals if r["source"] in ("nob", "nno")]
    assert sources and all(r["masked_tokens"] > 0 and 0 <= r["masked_accuracy"] <= 1 for r in sources)
    first, last = (min(sources, key=lambda r: r["step"]), max(sources, key=lambda r: r["step"]))
    assert last["masked_loss"] < first["masked_loss"]  # it learns the masked half too
