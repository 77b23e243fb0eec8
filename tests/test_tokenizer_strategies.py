"""model.tokenizer_strategy: keep (the base's own tokenizer), replace (the transplant onto a new
one) and extend (the base's plus new tokens learned on the corpus), and the fertility that
`norallm plan` prints to choose between them. The two-rank runs of keep and extend are in
tests/test_family_runs.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_config import good_raw, problems_of
from test_training import EMBEDDED, tiny_config

from data_pipeline.errors import DataError
from data_pipeline.extend import extend_bpe, fertility
from data_pipeline.tokenizer import SpecialTokens, Tokenizer, train_bpe
from norallm.errors import NorallmError
from training.config import parse_config
from training.model.build import SpecialIds, build_model, hf_config, warm_start


def corpus() -> list[str]:
    return [json.loads(line)["text"] for f in ("nob.jsonl", "nno.jsonl")
            for line in (EMBEDDED / f).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama with 448 embedding rows over its own 400-entry BPE (padded, as Qwen's are)."""
    base = tmp_path_factory.mktemp("base")
    train_bpe(corpus()[:60], base, vocab_size=400, special=SpecialTokens())
    build_model(hf_config("tiny-llama", {}, 448, SpecialIds(1, 2, 0)), seed=3).save_pretrained(base)
    return base


def _warm(base: Path, tokenizer: dict | None = None, **model) -> dict:
    raw = good_raw()
    raw["model"] = {"init": "warm", "base": str(base), **model}
    if tokenizer is None:
        del raw["tokenizer"]
    else:
        raw["tokenizer"] = tokenizer
    return raw


def test_keep_takes_the_base_tokenizer_and_its_embedding_rows(base, tmp_path):
    cfg = parse_config(_warm(base, tokenizer_strategy="keep"))
    assert Path(cfg.tokenizer.path) == base and cfg.tokenizer.vocab_size == 400
    assert cfg.model_vocab_size == 448  # the base's rows, not the tokenizer's 400: no transplant
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    assert Path(parse_config(_warm(base, {"path": str(copy)}, tokenizer_strategy="keep")).tokenizer.path) == copy
    other = tmp_path / "other"
    train_bpe(corpus()[60:120], other, vocab_size=400)
    got = problems_of(_warm(base, {"path": str(other)}, tokenizer_strategy="keep"))
    assert "keep trains on the base's own tokenizer, and" in got["tokenizer.path"][0]
    got = problems_of(_warm(base, {"path": str(other), "train": True}, tokenizer_strategy="keep"))
    assert "remove train: true" in got["tokenizer.train"][0]


def test_strategies_are_checked_together():
    raw = good_raw()
    raw["model"] = {"flavor": "tiny-llama", "tokenizer_strategy": "extend", "extend_tokens": 8}
    assert "a scratch init has no base tokenizer" in problems_of(raw)["model.tokenizer_strategy"][0]
    raw["model"] = {"flavor": "tiny-llama", "init": "warm", "base": "/nowhere", "tokenizer_strategy": "extend"}
    assert "goes with tokenizer_strategy: extend" in problems_of(raw)["model.extend_tokens"][0]
    raw["model"] = {"flavor": "tiny-llama", "init": "warm", "base": "/nowhere", "extend_tokens": 8}
    assert "goes with tokenizer_strategy: extend" in problems_of(raw)["model.extend_tokens"][0]
    raw["model"] = {"flavor": "tiny-llama", "init": "warm", "base": "/nowhere", "tokenizer_strategy": "keep",
                    "transplant": "mean"}
    assert "which tokenizer_strategy: keep keeps" in problems_of(raw)["model.transplant"][0]


def test_extend_resolves_to_a_tokenizer_trained_from_the_base(base, tmp_path):
    tok = {"path": str(tmp_path / "ext"), "train": True}
    cfg = parse_config(_warm(base, tok, tokenizer_strategy="extend", extend_tokens=64))
    assert (cfg.tokenizer.extend_from, cfg.tokenizer.extend_tokens, cfg.tokenizer.vocab_size) == (str(base), 64, 464)
    got = problems_of(_warm(base, {"path": str(tmp_path / "ext")}, tokenizer_strategy="extend", extend_tokens=64))
    assert "set train: true" in got["tokenizer.train"][0]


def test_extend_keeps_every_base_token_and_merge_and_adds_n(base, tmp_path):
    texts = corpus()
    size = extend_bpe(base, texts, 64, tmp_path / "ext")
    old = json.loads((base / "tokenizer.json").read_text())["model"]
    new = json.loads((tmp_path / "ext" / "tokenizer.json").read_text())["model"]
    assert size == 464 and len(new["vocab"]) == len(old["vocab"]) + 64
    assert all(new["vocab"][piece] == i for piece, i in old["vocab"].items())  # every base id kept
    assert new["merges"][: len(old["merges"])] == old["merges"]  # base merges first, in their order
    base_tok, ext = Tokenizer(base), Tokenizer(tmp_path / "ext")
    assert ext.decode(ext.encode(texts[5])) == texts[5]
    assert fertility(ext, texts) < fertility(base_tok, texts)  # the new tokens are the corpus's frequent ones
    with pytest.raises(DataError, match="yields only"):
        extend_bpe(base, texts[:3], 5000, tmp_path / "too-many")


def test_extend_refuses_a_sentencepiece_base(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(DataError, match="a SentencePiece tokenizer.model cannot be extended"):
        extend_bpe(tmp_path, ["x"], 4, tmp_path / "out")


def test_extend_transplant_leaves_old_rows_and_averages_new_ones(base, tmp_path):
    extend_bpe(base, corpus(), 64, tmp_path / "ext")
    ext = Tokenizer(tmp_path / "ext")
    expected = hf_config("tiny-llama", {}, 464, SpecialIds(1, 2, 0))
    model, report = warm_start(str(base), None, ext, 464, {}, expected)
    assert (report.copied, report.special, report.averaged) == (397, 3, 64)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    base_tok = Tokenizer(base)
    for weights in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
        new, old = weights(model).detach(), weights(original).detach()
        assert torch.equal(new[:400], old[:400])  # old rows untouched, bit for bit
        for i in (400, 431, 463):  # a new token: the mean of the base rows of its string
            parts = base_tok.encode(ext.decode([i]))
            assert len(parts) > 1 and torch.allclose(new[i], old[parts].mean(dim=0))


def test_keep_never_transplants_at_launch(base, tmp_path):
    """Where validate could not read the base (a compute-node path), the launch refuses keep with
    another tokenizer instead of transplanting onto it."""
    other = tmp_path / "other"
    train_bpe(corpus()[60:120], other, vocab_size=400)
    expected = hf_config("tiny-llama", {}, 448, SpecialIds(1, 2, 0))
    with pytest.raises(NorallmError, match="keep trains on the base's own tokenizer, but the tokenizer is not"):
        warm_start(str(base), None, Tokenizer(other), 448, {}, expected, keep_tokenizer=True)
    with pytest.raises(NorallmError, match="model.vocab_size 512 is not the base's 448 rows"):
        warm_start(str(base), None, Tokenizer(base), 512, {}, expected, keep_tokenizer=True)
    model, report = warm_start(str(base), None, Tokenizer(base), 448, {}, expected, keep_tokenizer=True)
    assert report is None and model.get_input_embeddings().weight.shape[0] == 448


def test_plan_prints_the_fertility_of_the_base_and_the_new_tokenizer(base, tmp_path, capsys):
    from training.cli import main
    from training.data.pretraining import training_sample

    raw = tiny_config(tmp_path)
    raw["model"] = {"init": "warm", "base": str(base)}
    for source in raw["data"]["sources"]:  # a plan before preparing
        source["unique_tokens"] = 100_000
    new = tmp_path / "tokenizer"
    train_bpe(corpus(), new, vocab_size=512)
    raw["tokenizer"] = {"path": str(new), "vocab_size": 512}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(config)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tokens per word"))
    texts = list(training_sample(parse_config(raw).data, 200))
    assert line == (f"tokens per word on {len(texts)} training documents: base tokenizer "
                    f"{round(fertility(Tokenizer(base), texts), 3)}, new tokenizer "
                    f"{round(fertility(Tokenizer(new), texts), 3)}")
    base_value, new_value = map(float, re.findall(r"tokenizer (\d+\.\d+)", line))
    assert new_value < base_value  # 512 entries trained on this corpus against the base's 400 from a part of it
    assert main(["plan", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fertility"]["base"] == base_value


def test_the_warm_template_validates_prepares_and_plans_once_filled_in(base, tmp_path, monkeypatch, capsys):
    """configs/template-warm.yaml with its three blanks filled (a base, a JSONL folder, a work dir)."""
    from training.cli import main

    template = Path(__file__).resolve().parents[1] / "configs" / "template-warm.yaml"
    monkeypatch.setenv("BASE_MODEL", str(base))
    folder = tmp_path / "corpus"  # a folder of JSONL documents (the smoke corpus's, not its chats)
    folder.mkdir()
    for name in ("nob.jsonl", "nno.jsonl"):
        (folder / name).write_bytes((EMBEDDED / name).read_bytes())
    monkeypatch.setenv("CORPUS", str(folder))
    monkeypatch.setenv("WORK", str(tmp_path / "work"))
    short = ["--set", "data.seq_len=256"]  # the tiny base has 1024 positions
    assert main(["validate", str(template), *short]) == 0
    assert "tokenizer_strategy: keep" in capsys.readouterr().out
    assert main(["prepare", str(template), *short]) == 0
    capsys.readouterr()
    assert main(["plan", str(template), *short]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tokens per word"))
    base_value, new_value = re.findall(r"tokenizer (\d+\.\d+)", line)
    assert base_value == new_value  # keep: the new tokenizer is the base's
