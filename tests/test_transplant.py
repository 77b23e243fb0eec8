"""Warm start with a new vocabulary, against Mistral-7B-v0.1's real tokenizer (shipped by the
mistral-common package) on a tiny random Mistral with 32,000 rows saved locally as the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_training import EMBEDDED, read_jsonl, tiny_config, torchrun, write_config

from data_pipeline.tokenizer import SpecialTokens, train_bpe
from training.config import ConfigError, parse_config
from training.data.pretraining import run_prepare
from training.model.transplant import token_bytes, transplant


@pytest.fixture(scope="module")
def mistral_sp_model() -> Path:
    mistral_common = pytest.importorskip("mistral_common", reason="pip install mistral-common (dev extra)")
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert path.is_file(), f"mistral-common no longer ships {path}"
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, mistral_sp_model) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    base = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None)
    MistralForCausalLM(config).save_pretrained(base)
    shutil.copy(mistral_sp_model, base / "tokenizer.model")
    return base


@pytest.fixture(scope="module")
def norwegian_bpe(tmp_path_factory, shared_data) -> Path:
    texts = [json.loads(line)["text"] for line in (shared_data / "train.jsonl").read_text().splitlines()[:800]]
    out = tmp_path_factory.mktemp("bpe")
    train_bpe(texts, out, vocab_size=2000, special=SpecialTokens())
    return out


def test_rows_are_copied_averaged_or_mapped(base_dir, norwegian_bpe):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    from data_pipeline.tokenizer import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))
    new = Tokenizer(norwegian_bpe)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    old_in = base.get_input_embeddings().weight.detach().clone()
    old_out = base.get_output_embeddings().weight.detach().clone()
    report = transplant(base, new, base_dir, {"<pad>": "</s>"}, vocab_size=new.vocab_size)
    emb, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    assert emb.shape == (new.vocab_size, 64) and head.shape == (new.vocab_size, 64)
    assert report.copied + report.averaged + report.special + report.no_source == new.vocab_size
    assert report.copied > 100 and report.averaged > 100, report.summary()

    exact = multi = 0
    for i in range(3, new.vocab_size):
        try:
            text = token_bytes(new.id_to_token(i)).decode("utf-8")
        except UnicodeDecodeError:  # a partial character: byte-fallback rows, not checked here
            continue
        if not text.startswith(" ") or len(text) < 3:
            continue
        piece = sp.piece_to_id("▁" + text[1:])
        if sp.id_to_piece(piece) == "▁" + text[1:]:  # one Mistral token: copied exactly
            assert torch.equal(emb[i], old_in[piece]) and torch.equal(head[i], old_out[piece])
            exact += 1
        else:  # several: the mean of the Mistral rows of its re-tokenisation
            ids = sp.encode(text[1:])
            assert len(ids) > 1
            torch.testing.assert_close(emb[i], old_in[ids].mean(0), rtol=0, atol=1e-7)
            torch.testing.assert_close(head[i], old_out[ids].mean(0), rtol=0, atol=1e-7)
            multi += 1
    assert exact > 50 and multi > 50, (exact, multi)
    # Specials: <s> and </s> map to Mistral's own, <pad> to </s> by the config's map.
    for new_id, old_id in ((new.bos_id, sp.bos_id()), (new.eos_id, sp.eos_id()), (new.pad_id, sp.eos_id())):
        assert torch.equal(emb[new_id], old_in[old_id])
    assert report.special == 3


def test_mean_transplant_sets_every_row_to_the_base_mean(tmp_path):
    """model.transplant: mean (the ablation): every input and output row is the mean base row,
    specials included, and no base tokenizer is read (the dir given has none)."""
    from transformers import MistralConfig, MistralForCausalLM

    texts = [json.loads(line)["text"] for line in (EMBEDDED / "nob.jsonl").read_text().splitlines()]
    new = train_bpe(texts, tmp_path / "bpe", vocab_size=400, special=SpecialTokens())
    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            tie_word_embeddings=False))
    means = [w.detach().mean(0).clone() for w in (base.get_input_embeddings().weight,
                                                  base.get_output_embeddings().weight)]
    report = transplant(base, new, tmp_path / "no-tokenizer-here", {}, vocab_size=new.vocab_size, mode="mean")
    for weight, mean in zip((base.get_input_embeddings().weight, base.get_output_embeddings().weight), means,
                            strict=True):
        assert weight.shape == (new.vocab_size, 32)
        torch.testing.assert_close(weight.detach(), mean.expand(new.vocab_size, -1), rtol=0, atol=0)
    assert report.to_json()["mode"] == "mean" and report.no_source == new.vocab_size
    assert report.copied == report.averaged == report.special == 0
    assert "mean" in report.summary()


def test_mean_transplant_needs_a_warm_start(tmp_path):
    raw = tiny_config(tmp_path)
    raw["model"]["transplant"] = "mean"
    with pytest.raises(ConfigError, match="model.transplant: mean re-lays a warm start"):
        parse_config(raw)
    raw["model"].update(init="warm", base=str(tmp_path))
    assert parse_config(raw).model.transplant == "mean"


def warm_config(root: Path, norwegian_bpe: Path, base_dir: Path, checkpoint: dict, **train) -> dict:
    """A warm start from the tiny base onto the Norwegian BPE (no evals), its shards prepared under root."""
    raw = tiny_config(root, **train)
    raw["tokenizer"] = {"path": str(norwegian_bpe), "vocab_size": 2000}
    raw["model"].update(init="warm", base=str(base_dir), special_token_map={"<pad>": "</s>"})
    raw["checkpoint"] = checkpoint
    raw["eval"] = {"every_steps": 0, "max_samples": 4}
    cfg = parse_config(raw)
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    return raw


def test_frozen_body_stage_leaves_body_unchanged(base_dir, norwegian_bpe, tmp_path):
    from safetensors.torch import load_file

    from training.export import export

    raw = warm_config(tmp_path, norwegian_bpe, base_dir, {"every_steps": 2, "keep_last": 3}, max_steps=4,
                      frozen_body_steps=2, warmup_steps=0, schedule="constant")
    config = write_config(tmp_path / "c.yaml", raw)
    run = tmp_path / "run"
    torchrun("-m", "training.cli", "train", str(config), "--run-dir", str(run))
    assert json.loads((run / "transplant.json").read_text())["copied"] > 100
    assert len(read_jsonl(run / "metrics.jsonl")) == 4

    base = load_file(str(base_dir / "model.safetensors"))
    after_frozen = load_file(str(export(run / "checkpoints" / "step00000002", tmp_path / "s2", "fp32") /
                                 "model.safetensors"))
    after_all = load_file(str(export(run / "checkpoints" / "step00000004", tmp_path / "s4", "fp32") /
                              "model.safetensors"))
    body = [k for k in base if "embed_tokens" not in k and "lm_head" not in k]
    assert body and all(torch.equal(after_frozen[k], base[k]) for k in body)
    assert not torch.equal(after_frozen["model.embed_tokens.weight"], after_all["model.embed_tokens.weight"])
    assert any(not torch.equal(after_all[k], base[k]) for k in body)  # unfrozen after step 2


def test_scratch_init_statistics():
    from training.model.build import SpecialIds, build_model, hf_config

    for flavor, layers, residual in (("tiny-mistral", {"num_hidden_layers": 8}, ("o_proj", "down_proj")),
                                     ("tiny-bloom", {"n_layer": 8}, ("self_attention.dense.", "dense_4h_to_h"))):
        overrides = {**layers, "hidden_size": 256}
        if flavor == "tiny-mistral":
            overrides["intermediate_size"] = 704
        model = build_model(hf_config(flavor, overrides, 4096, SpecialIds(1, 2, 0)), seed=0, std=0.02)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                assert torch.count_nonzero(p) == 0, name
            elif p.ndim == 1:  # norm weights (RMSNorm, LayerNorm, BLOOM ln_f)
                assert torch.all(p == 1), name
            else:
                expected = 0.02 / (2 * 8) ** 0.5 if any(r in name for r in residual) else 0.02
                assert abs(p.std().item() - expected) < 0.05 * expected, (name, p.std().item(), expected)
                assert abs(p.mean().item()) < 5 * expected / p.numel() ** 0.5, name  # 5 standard errors



@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, norwegian_bpe, base_dir):
    """A 3-step warm-start config on the Norwegian BPE with its shards prepared, and a launcher of
    tests/dist/warm_probe.py that returns what each rank held when the model reached the engine
    and the run's losses."""
    from test_training import REPO

    root = tmp_path_factory.mktemp("zero3")
    raw = warm_config(root, norwegian_bpe, base_dir, {"every_steps": 100, "keep_last": 1}, max_steps=3,
                      warmup_steps=1, schedule="constant")

    def run(name: str, raw: dict) -> tuple[list[dict], list[float]]:
        config = write_config(root / f"{name}.yaml", raw)
        torchrun(str(REPO / "tests" / "dist" / "warm_probe.py"), str(config), str(root / name), str(root / f"{name}-seen"))
        seen = [torch.load(root / f"{name}-seen" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        return seen, [m["loss"] for m in read_jsonl(root / name / "metrics.jsonl")]

    return raw, run


def _held_partitions_only(seen: list[dict]) -> None:
    """Each of the 2 ranks held its half of every parameter, and nothing whole."""
    for rank, r in enumerate(seen):
        for name, p in r["held"].items():
            assert p["partitioned"] and p["whole_now"] == 0, (rank, name, p)
            assert p["local"] == -(-p["numel"] // 2), (rank, name, p)


def test_zero3_warm_start_builds_partitions_and_matches_zero2(bpe_run):
    """A ZeRO-3 warm start (zero.Init; each rank reads its partitions of the base) against the
    ZeRO-2 one (rank 0 loads the whole base, DeepSpeed broadcasts) of the same base, 2 ranks:
    the same transplanted rows, RoPE buffers right on every rank, every parameter already
    partitioned when the model reaches the engine, and the same first losses."""
    raw, run = bpe_run
    seen, losses = {}, {}
    for stage in (2, 3):
        seen[stage], losses[stage] = run(f"warm-z{stage}", {**raw, "zero": {"stage": stage}})
    z2, z3 = seen[2][0], seen[3]
    for key in ("embed", "lm_head"):  # ZeRO-2's rows are the whole-model transplant's
        assert z2[key].shape == (2000, 64)
        assert all(torch.equal(r[key], z2[key]) for r in z3), key
    assert z2["inv_freq"] and all(  # computed on every rank, in fp32
        r["inv_freq"].keys() == z2["inv_freq"].keys() and all(torch.equal(b, z2["inv_freq"][n]) and b.dtype ==
                                                              torch.float32 for n, b in r["inv_freq"].items())
        for r in z3)
    _held_partitions_only(z3)
    assert sum(p["numel"] for p in z3[0]["held"].values()) == sum(p["numel"] for p in z2["held"].values())
    # fp32 on both; ZeRO-3 reduce-scatters gradients where ZeRO-2 all-reduces buckets, so the sums
    # may round differently (~1e-7 relative a step): 1e-5 over three steps, as for scratch
    # (test_trainer_recipes.py::test_zero3_matches_zero2)
    assert len(losses[2]) == len(losses[3]) == 3
    assert max(abs(a - b) for a, b in zip(losses[2], losses[3], strict=True)) <= 1e-5, losses


def test_zero3_scratch_init_builds_partitions_with_the_whole_models_values(bpe_run, norwegian_bpe):
    """ZeRO-3 from scratch: built under zero.Init, each rank keeps its partition of the same
    draws, so the weights are exactly those of the model built whole (build_model)."""
    from data_pipeline.tokenizer import Tokenizer
    from training.model.build import SpecialIds, build_model, hf_config

    raw, run = bpe_run
    scratch = {**raw, "model": {"flavor": "tiny-mistral"}, "zero": {"stage": 3},
               "train": {**raw["train"], "max_steps": 1}}
    seen, _ = run("scratch-z3", scratch)
    _held_partitions_only(seen)
    cfg, tok = parse_config(scratch), Tokenizer(norwegian_bpe)
    whole = build_model(hf_config(cfg.model.flavor, cfg.model.overrides, cfg.model_vocab_size,
                                  SpecialIds(tok.bos_id, tok.eos_id, tok.pad_id)), cfg.seed, cfg.model.init_std)
    for r in seen:
        assert torch.equal(r["embed"], whole.get_input_embeddings().weight)
        assert torch.equal(r["lm_head"], whole.get_output_embeddings().weight)


def test_a_zero3_base_that_is_incomplete_is_named_not_a_traceback(tmp_path):
    """A ZeRO-3 warm start reads the base's safetensors itself (training.model.partitioned): an index that
    names a missing shard, a garbled index and a dir without safetensors each get one clear error."""
    from norallm.errors import NorallmError
    from training.model.partitioned import _checkpoint_files

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(NorallmError, match=r"names 1 file\(s\) that are not there.*00002-of-00002.*download the base"):
        _checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(NorallmError, match="is not a safetensors index"):
        _checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(NorallmError, match="has no model.safetensors"):
        _checkpoint_files(tmp_path)



def test_a_bad_base_tokenizer_fails_every_zero3_rank_alike(norwegian_bpe, tmp_path, monkeypatch):
    """Under ZeRO-3 only rank 0 writes the transplanted rows, but every rank reads the base
    tokenizer first: a dir without one fails a rank other than 0 with the same message, before
    any collective. (Rank 0 alone used to raise while the others waited in the embedding gather —
    under srun without --kill-on-bad-exit, until the collective timed out.)"""
    from transformers import MistralConfig, MistralForCausalLM

    from data_pipeline.tokenizer import Tokenizer
    from norallm.errors import NorallmError
    from training.model import transplant as module

    monkeypatch.setattr(module.distributed, "rank", lambda: 1)  # not the writer
    model = MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    with pytest.raises(NorallmError, match="has neither tokenizer.model nor tokenizer.json"):
        module.transplant(model, Tokenizer(norwegian_bpe), empty, {}, 2000, zero3_config={"zero_optimization": {}})
