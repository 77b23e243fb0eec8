"""Instruction tuning: NorMistral-instruct's chat template, exact loss masks, packing, bad input,
and a tiny SFT run (learns, resumes exactly, exports a model that chats)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import BadRecords
from data_pipeline.tokenizer import SpecialTokens, train_bpe
from training.data import chat
from training.data.sft import build_sft, chat_ids, ensure_chat_tokenizer, load_split

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "data_pipeline" / "smoke_corpus" / "chat.jsonl"
CONVERSATION = [
    {"role": "system", "content": "Du er ein hjelpsam assistent."},
    {"role": "user", "content": "Kva heiter hovudstaden i Noreg?"},
    {"role": "assistant", "content": "Hovudstaden i Noreg er Oslo."},
    {"role": "user", "content": "Og i Sverige?"},
    {"role": "assistant", "content": "Stockholm."},
]


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE as a base model's tokenizer would be (no chat tokens yet)."""
    texts = [json.loads(line)["text"] for p in ("nob", "nno")
             for line in (REPO / "data_pipeline" / "smoke_corpus" / f"{p}.jsonl").read_text().splitlines()]
    out = tmp_path_factory.mktemp("base-tok")
    train_bpe(texts, out, vocab_size=600, special=SpecialTokens(pad="<pad>"))
    return out


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory, base_tokenizer):
    return ensure_chat_tokenizer(tmp_path_factory.mktemp("chat-tok") / "tok", base_tokenizer)


def test_template_renders_the_published_format():
    expected = (
        "<s><|im_start|> system\nDu er ein hjelpsam assistent.<|im_end|>\n"
        "<|im_start|> user\nKva heiter hovudstaden i Noreg?<|im_end|>\n"
        "<|im_start|> assistant\nHovudstaden i Noreg er Oslo.<|im_end|>\n"
        "<|im_start|> user\nOg i Sverige?<|im_end|>\n"
        "<|im_start|> assistant\nStockholm.<|im_end|>\n"
    )
    assert chat.render(CONVERSATION) == expected
    assert chat.render(CONVERSATION[:2], add_generation_prompt=True).endswith("<|im_start|> assistant\n")


def test_chat_tokenizer_and_apply_chat_template_agree(chat_tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chat_tok.path))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<s>", "<|im_end|>", "</s>")
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == chat.render(CONVERSATION)
    ids = chat_ids(chat_tok)
    tokens, _, _ = chat.encode(CONVERSATION, chat_tok, ids)
    assert hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"] == tokens
    prompt = hf.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt == chat.encode(CONVERSATION[:2], chat_tok, ids)[0] + [ids.im_start] + chat_tok.encode(
        " assistant\n")


def test_loss_mask_is_exact_token_by_token(chat_tok):
    ids = chat_ids(chat_tok)
    tokens, mask, ends = chat.encode(CONVERSATION, chat_tok, ids)
    expected: list[int] = [0]  # <s>
    for m in CONVERSATION:
        header = [ids.im_start] + chat_tok.encode(f" {m['role']}\n")
        body = chat_tok.encode(m["content"]) + [ids.im_end]
        expected += [0] * len(header) + [int(m["role"] == "assistant")] * len(body) + [0] * len(chat_tok.encode("\n"))
    assert mask == expected and len(tokens) == len(mask) == ends[-1]
    trained = chat_tok.decode([t for t, k in zip(tokens, mask, strict=True) if k])
    assert trained == "Hovudstaden i Noreg er Oslo.<|im_end|>Stockholm.<|im_end|>"

    # Packed: two conversations and padding in one row keep their masks and get their own ids.
    other = chat.encode(CONVERSATION[1:3], chat_tok, ids)
    window = len(tokens) + len(other[0]) + 5
    rows, masks, docs = chat.pack([(tokens, mask), (other[0], other[1])], window, ids.pad)
    assert rows.shape == (1, window)
    assert rows[0, : len(tokens)].tolist() == tokens and masks[0, : len(tokens)].tolist() == mask
    assert rows[0, len(tokens) : -5].tolist() == other[0] and masks[0, len(tokens) : -5].tolist() == other[1]
    assert docs[0].tolist() == [0] * len(tokens) + [1] * len(other[0]) + [2] * 5
    assert masks[0, -5:].tolist() == [0] * 5 and rows[0, -5:].tolist() == [ids.pad] * 5
    # A conversation that does not fit in the row's rest starts a new row.
    rows2, _, docs2 = chat.pack([(tokens, mask), (other[0], other[1])], len(tokens) + 3, ids.pad)
    assert rows2.shape[0] == 2 and docs2[1, 0] == 0


def test_packed_conversations_do_not_see_each_other(chat_tok):
    """The loss of the second conversation in a packed row equals its loss alone."""
    from transformers import MistralConfig, MistralForCausalLM

    from training.data.sft import conversation_batch
    from training.model.loss import causal_lm_loss

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=chat_tok.vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    ids = chat_ids(chat_tok)
    a = chat.encode(CONVERSATION, chat_tok, ids)[:2]
    b = chat.encode(CONVERSATION[1:3], chat_tok, ids)[:2]
    tokens, mask, convs = chat.pack([a, b], len(a[0]) + len(b[0]), ids.pad)
    mask[:, : len(a[0])] = 0  # train only on b, inside the packed row
    masked_a = conversation_batch((tokens, mask, convs)).map(torch.from_numpy)
    alone = conversation_batch(chat.pack([b], len(b[0]), ids.pad)).map(torch.from_numpy)
    assert masked_a.trained_tokens == alone.trained_tokens == sum(b[1]) - b[1][0]
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, masked_a), causal_lm_loss(model, alone), rtol=1e-5, atol=1e-6)


def test_bad_conversations_are_counted(tmp_path, chat_tok):
    good = {"messages": CONVERSATION[1:3]}
    records = [
        good,
        {"instruction": "Omset til nynorsk", "input": "Jeg vet ikke.", "output": "Eg veit ikkje."},
        {"messages": [{"role": "user", "content": "Hei"}]},  # no assistant turn
        {"messages": [{"role": "robot", "content": "Hei"}, {"role": "assistant", "content": "Hei"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "Hei"}]},
        {"messages": [{"role": "user", "content": "A"}, {"role": "user", "content": "B"},
                      {"role": "assistant", "content": "C"}]},  # non-alternating
        {"messages": [*CONVERSATION[1:3], {"role": "user", "content": "Takk!"}]},  # trailing user turn
        {"messages": CONVERSATION[1:] * 6},  # too long: truncated to whole exchanges
        {"messages": [{"role": "user", "content": "ord " * 400}, {"role": "assistant", "content": "ja"}]},
        {"text": "not a conversation"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "{broken\n")
    bad = BadRecords()
    source = SourceConfig(name="c", paths=[str(path)])
    splits = load_split([source], chat_tok, window=120, valid_fraction=0.0, bad=bad)
    assert dict(bad.counts) == {"no_assistant_turn": 1, "unknown_role": 1, "empty_content": 1, "non_alternating": 1,
                                "truncated_trailing_user_turn": 1, "truncated_too_long": 1, "too_long": 1,
                                "not_a_conversation": 1, "malformed_json": 1}
    assert len(splits["train"]) == 4  # good, alpaca, trailing-user (cut), too-long (truncated)
    assert all(len(t) <= 120 and t[-1] != chat_tok.token_id("<|im_start|>") for t, _ in splits["train"])
    assert all(ex.startswith(str(path)) for exs in bad.examples.values() for ex in exs)



def test_a_source_holds_out_its_own_valid_fraction(tmp_path, chat_tok):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Tell til {i}", "output": f"{i}"}) + "\n" for i in range(40)))
    own, default = (SourceConfig(name=n, paths=[str(path)], valid_fraction=f) for n, f in (("own", 0.5), ("d", None)))
    for source, held_out in ((own, True), (default, False)):
        splits = load_split([source], chat_tok, window=120, valid_fraction=0.0, bad=BadRecords())
        assert len(splits["train"]) + len(splits["valid"]) == 40
        assert bool(splits["valid"]) is held_out, "data.valid_fraction is the default, not an override"

def _chat_lines(n: int) -> str:
    return "".join(json.dumps({"instruction": f"Tell til {i}", "output": f"{i}"}) + "\n" for i in range(n))


def _sft_data(tmp_path: Path, path: Path, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="c", paths=[str(path)])], shards_dir=str(tmp_path / "unused"),
                      seq_len=119, valid_fraction=0.0, **kw)


def _sft_report(data: DataConfig, tok) -> str:
    logged: list[str] = []
    build_sft(data, tok, seed=1, global_batch_size=2, micro_batch_size=1, max_eval_samples=0, rank=0,
              world_size=1, log=logged.append)
    return logged[0]


def test_an_over_long_conversation_line_is_counted_as_pretraining_counts_it(tmp_path, chat_tok):
    """data.max_document_bytes bounds a conversation line as it bounds a pretraining document: the
    line is skipped unread (document_too_long), not parsed and tokenized whole."""
    path = tmp_path / "chat.jsonl"
    long = {"messages": [{"role": "user", "content": "ord " * 2000}, {"role": "assistant", "content": "ja"}]}
    path.write_text(_chat_lines(3) + json.dumps(long) + "\n" + _chat_lines(2))
    report = _sft_report(_sft_data(tmp_path, path, max_document_bytes=1024, max_bad_fraction=0.5), chat_tok)
    assert "5 train / 0 valid conversations. 1 of 6 records skipped (16.67%):\n  document_too_long: 1" in report
    assert f"{path}:4: line longer than 1,024 bytes" in report


def test_bad_conversation_records_above_max_bad_fraction_fail_the_source_as_prepare_does(tmp_path, chat_tok):
    path = tmp_path / "chat.jsonl"
    path.write_text(_chat_lines(8) + "{broken\n" + json.dumps({"text": "no conversation"}) + "\n")
    with pytest.raises(DataError) as e:
        _sft_report(_sft_data(tmp_path, path, max_bad_fraction=0.1), chat_tok)
    assert str(e.value).startswith("source 'c': 20.00% of records are unusable, more than "
                                   "data.max_bad_fraction=0.1. Fix the files or raise the limit.\n2 of 10 records")
    assert "_sft_report" not in str(e.value) and "malformed_json: 1" in str(e.value)
    assert "2 of 10 records skipped" in _sft_report(_sft_data(tmp_path, path, max_bad_fraction=0.2), chat_tok)
    # a conversation kept but shortened is no bad record: 4 of 4 have a trailing user turn dropped
    kept = tmp_path / "kept.jsonl"
    kept.write_text("".join(json.dumps({"messages": [*CONVERSATION[1:3], {"role": "user", "content": "Takk!"}]})
                            + "\n" for _ in range(4)))
    assert "4 kept but shortened" in _sft_report(_sft_data(tmp_path, kept, max_bad_fraction=0.0), chat_tok)


def test_norallm_prepare_on_an_sft_config_fails_on_too_many_bad_records(tmp_path, chat_tok, capsys):
    from test_training import write_config

    from training.cli import main

    path = tmp_path / "chat.jsonl"
    path.write_text(_chat_lines(3) + "{broken\n")
    raw = {"name": "sft", "model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(chat_tok.path)},
           "data": {"sources": [{"name": "c", "paths": [str(path)]}], "shards_dir": str(tmp_path / "unused"),
                    "seq_len": 119},
           "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 2, "lr": 1e-3}, "sft": {}}
    capsys.readouterr()
    assert main(["prepare", str(write_config(tmp_path / "sft.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: source 'c': 25.00% of records are unusable, more than data.max_bad_fraction=0.01")
    assert "Traceback" not in err


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_conversation_files_read_as_plain_ones_and_a_cut_one_fails(tmp_path, chat_tok, suffix):
    import gzip

    import zstandard

    plain = tmp_path / "chat.jsonl"
    plain.write_text(_chat_lines(30))
    packed = tmp_path / f"chat{suffix}"
    compress = gzip.compress if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress
    lines = plain.read_bytes().splitlines(keepends=True)
    packed.write_bytes(compress(b"".join(lines[:20])) + compress(b"".join(lines[20:])))  # two members/frames
    specs = [SourceConfig(name="c", paths=[str(p)]) for p in (plain, packed)]
    splits = [load_split([s], chat_tok, window=120, valid_fraction=0.0, bad=BadRecords()) for s in specs]
    assert len(splits[0]["train"]) == 30 and splits[0] == splits[1]
    packed.write_bytes(packed.read_bytes()[:-8])  # cut inside the second member/frame
    with pytest.raises(DataError, match=r"source 'c': 1 compressed file\(s\) end in the middle of their data"):
        _sft_report(_sft_data(tmp_path, packed), chat_tok)
    report = _sft_report(_sft_data(tmp_path, packed, allow_truncated_files=True, max_bad_fraction=1.0), chat_tok)
    assert "truncated_file: 1" in report.split("kept but shortened")[0]


def test_an_sft_source_is_jsonl_and_has_no_text_field(tmp_path):
    from data_pipeline.conversations import iter_conversations
    from training.config import ConfigError, parse_config

    raw = {"model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": "tok", "vocab_size": 600},
           "data": {"sources": [{"name": "p", "paths": ["a.parquet"], "format": "parquet"},
                                {"name": "t", "paths": ["a.jsonl"], "text_field": "content"},
                                {"name": "ok", "paths": ["b.jsonl"], "text_field": "text"}],
                    "shards_dir": "s", "seq_len": 64},
           "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 2, "lr": 1e-3}, "sft": {}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    problems = dict(e.value.problems)
    assert set(problems) == {"data.sources.0", "data.sources.1"}
    assert "format 'parquet'" in problems["data.sources.0"] and "text_field 'content'" in problems["data.sources.1"]
    with pytest.raises(DataError, match="source 'p': format 'parquet': conversations are read from JSONL"):
        next(iter_conversations(SourceConfig(**raw["data"]["sources"][0]), BadRecords()))
    del raw["sft"]
    parse_config(raw)  # pretraining reads either


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, base_tokenizer) -> Path:
    """A tiny 'exported warm model': random Mistral + the base tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM

    base = tmp_path_factory.mktemp("base-model")
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=600, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                     sliding_window=None)).save_pretrained(base)
    for f in base_tokenizer.iterdir():
        shutil.copy(f, base / f.name)
    return base


@pytest.mark.slow
def test_tiny_sft_learns_resumes_exactly_and_chats(base_model, tmp_path):
    from test_training import read_jsonl, torchrun, write_config
    from transformers import AutoTokenizer

    from training.cli import main
    from training.export import export

    assert CHAT.is_file()
    raw = {
        "name": "sft", "seed": 3,
        "model": {"init": "warm", "base": str(base_model)},  # the base's shape
        "tokenizer": {"path": str(tmp_path / "tok"), "vocab_size": 600},
        "data": {"sources": [{"name": "chat", "paths": [str(CHAT)]}], "shards_dir": str(tmp_path / "unused"),
                 "seq_len": 256, "valid_fraction": 0.15},
        "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2,
                  "precision": "fp32"},
        "checkpoint": {"every_steps": 6, "keep_last": 2},
        "eval": {"every_steps": 0, "max_samples": 16},
        "sft": {},
    }
    config = write_config(tmp_path / "sft.yaml", raw)
    cli = ["-m", "training.cli", "train", str(config), "--run-dir"]
    torchrun(*cli, str(tmp_path / "straight"))
    torchrun(*cli, str(tmp_path / "resumed"), "--stop-at", "6")
    torchrun(*cli, str(tmp_path / "resumed"))
    straight = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [m["loss"] for m in straight] == [m["loss"] for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    evals = read_jsonl(tmp_path / "straight" / "eval.jsonl")
    assert [e["step"] for e in evals if e["source"] == "chat"] == [0, 12]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5, evals  # the assistant-token loss went down

    out = export(tmp_path / "straight", tmp_path / "hf", dtype="fp32")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == chat.render(CONVERSATION)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.convert_tokens_to_ids(
        "<|im_end|>")
    assert main(["generate", str(out), "--chat", "--prompt", "Kva er hovudstaden i Noreg?",
                 "--max-new-tokens", "20"]) == 0


def test_sft_micro_batches_are_weighted_by_trained_tokens():
    """A step's SFT loss is the mean over trained tokens, not over micro-batches."""
    from data_pipeline.batch import window_batch
    from training.data.sft import conversation_batch
    from training.model.loss import token_scales

    def rows(trained: int):
        tokens, mask = np.zeros((1, 9), dtype=np.int64), np.zeros((1, 9), dtype=np.int8)
        mask[0, 1 : 1 + trained] = 1
        return conversation_batch((tokens, mask, np.zeros((1, 9), dtype=np.int64)))

    scales = token_scales([rows(1), rows(3)])  # one rank, two micro-batches: 1 and 3 trained tokens
    assert scales == [0.5, 1.5]  # mean over micro-batches of (loss_mb × scale) = (1·l1 + 3·l2) / 4
    windows = window_batch(np.zeros((2, 9), dtype=np.int64))
    assert token_scales([windows, windows]) == [1.0, 1.0]  # pretraining: untouched
    # windows train every target, which lets the trainer skip the count across ranks
    from data_pipeline.loader import MixtureWindows
    from training.data.sft import PackedConversations

    assert windows.trained_tokens == windows.labels.size and MixtureWindows.every_target_trained
    assert not PackedConversations.every_target_trained
    assert token_scales([windows, windows], every_target_trained=True) == [1.0, 1.0]


def test_the_report_keeps_what_was_skipped_apart_from_what_was_shortened():
    """'1 of 60 records skipped … (truncated and kept, not dropped)' said both at once."""
    from data_pipeline.sources import BadRecords
    from training.data.sft import sft_report

    bad = BadRecords(records_seen=60)
    bad.add("no_assistant_turn", "a.jsonl:3")
    bad.add("truncated_trailing_user_turn", "a.jsonl:9")
    bad.add("truncated_too_long", "a.jsonl:12", "900 tokens, kept 512")
    report = sft_report(bad)
    assert report.startswith("1 of 60 records skipped (1.67%):\n  no_assistant_turn: 1")
    assert "2 kept but shortened:\n  truncated_too_long: 1\n    e.g. a.jsonl:12" in report
    assert "truncated" not in report.split("kept but shortened")[0]
    clean = BadRecords(records_seen=5)
    assert sft_report(clean) == "5 records read, none skipped."


def test_an_sft_config_is_one_mode_sized_planned_and_submitted_as_such(base_model, tmp_path, capsys):
    """The mode (training.data.modes) decides for the CLI, the trainer and submit: the chat tokens grow the
    model's rows in a new config (the given one is left alone), there is no budget plan to make,
    and a cluster job checks the conversation files instead of shards."""
    from test_training import write_config

    from training.cli import main
    from training.config import ConfigError, parse_config
    from training.data.modes import FineTuning, Pretraining, mode_of

    raw = {"name": "sft", "model": {"init": "warm", "base": str(base_model)},
           "tokenizer": {"path": str(tmp_path / "tok"), "vocab_size": 600},
           "data": {"sources": [{"name": "chat", "paths": [str(CHAT)]}], "shards_dir": str(tmp_path / "unused"),
                    "seq_len": 128},
           "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 4, "lr": 1e-3, "precision": "fp32"},
           "sft": {}}
    cfg = parse_config(raw)
    mode = mode_of(cfg)
    assert isinstance(mode, FineTuning) and mode.masks_documents and not mode.reads_shards
    tok = mode.ensure_tokenizer()
    assert tok.vocab_size == 602 and tok.token_id(chat.IM_END) is not None  # the base's 600 + 2 chat tokens
    sized = mode.sized(tok)
    assert sized.model_vocab_size == 602 and cfg.model_vocab_size == 600, "the given config is not changed"
    assert "vocab_size: 602" in sized.to_yaml()  # what config.yaml records, for resume and export
    with pytest.raises(ConfigError, match="602 entries, more than the model's 600"):
        Pretraining(cfg.model_copy(update={"sft": None})).sized(tok)

    config = write_config(tmp_path / "sft.yaml", raw)
    capsys.readouterr()
    assert main(["plan", str(config)]) == 2
    assert "no budget plan" in capsys.readouterr().err
    run = ["submit", str(config), "--cluster", "local", "--run-dir", str(tmp_path / "run"), "--dry-run"]
    assert main(run) == 0
    out = capsys.readouterr()
    assert "data: 1 conversation file(s) of 1 source(s), packed at train time" in out.err
    assert "-m training.cli train " + str(config) in out.out
    assert main([*run, "--prepare"]) == 2
    assert "nothing to prepare" in capsys.readouterr().err
