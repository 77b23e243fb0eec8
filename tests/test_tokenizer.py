"""Byte-level BPE training and loading: exact round trips on Norwegian text, special ids, HF parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import SpecialTokens, Tokenizer, train_bpe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "norwegian"
needs_corpus = pytest.mark.skipif(
    not (SHARED / "train.jsonl").is_file(),
    reason=f"shared Norwegian corpus not found at {SHARED} (read from ../shared/data/norwegian, never copied)",
)

NORWEGIAN = [
    "Blåbærsyltetøy på ærlig vis. Ærø, Øystein og Åse.",
    "ÆØÅ æøå — «Hvor går du?» spurte hun; «Til Tromsø!»",
    "Eg høyrer at det snør i Ålesund og på Øvre Årdal.",
    "  Mellomrom,\ttabulator og\nlinjeskift\r\n beholdes.  ",
    "Tall: 1 234,56 kr, 100 % og 3/4. Ēmōji: 🇳🇴 ❄️",
]

SYNTHETIC = [
    "Det var en gang en gutt som het Per.",
    "Han bodde på en gård langt oppe i dalen.",
    "Om vinteren gikk han på ski til skolen.",
    "Bestemor laget blåbærsyltetøy hver høst.",
    "Æ, ø og å er norske bokstaver.",
    "Øystein og Åse gikk tur langs fjorden.",
] * 20


def read_texts(name: str, n: int) -> list[str]:
    texts = []
    with open(SHARED / name, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == n:
                break
    return texts


@pytest.fixture(scope="module")
def nor_tok(tmp_path_factory) -> Tokenizer:
    if not (SHARED / "train.jsonl").is_file():
        pytest.skip(f"shared Norwegian corpus not found at {SHARED}")
    out = tmp_path_factory.mktemp("bpe-nor")
    return train_bpe(read_texts("train.jsonl", 300), out, vocab_size=1000)


@pytest.fixture(scope="module")
def synth_tok(tmp_path_factory) -> Tokenizer:
    return train_bpe(SYNTHETIC, tmp_path_factory.mktemp("bpe-synth"), vocab_size=300, min_frequency=1)


# ------------------------------------------------------------------------------------ shared corpus


@needs_corpus
def test_trained_dir_is_a_standard_hf_dir(nor_tok):
    assert (nor_tok.path / "tokenizer.json").is_file()
    assert (nor_tok.path / "tokenizer_config.json").is_file()
    assert nor_tok.vocab_size == 1000
    assert len(nor_tok.fingerprint) == 16
    assert Tokenizer(nor_tok.path).fingerprint == nor_tok.fingerprint


@needs_corpus
def test_special_ids(nor_tok):
    assert (nor_tok.pad_id, nor_tok.bos_id, nor_tok.eos_id) == (0, 1, 2)
    assert nor_tok.decode([1, 2, 0]) == "<s></s><pad>"
    # encode() adds no special tokens of its own (prepare appends EOS itself)
    assert 1 not in nor_tok.encode("Hei") and 2 not in nor_tok.encode("Hei")


@needs_corpus
@pytest.mark.parametrize("text", NORWEGIAN)
def test_round_trip_is_exact(nor_tok, text):
    ids = nor_tok.encode(text)
    assert ids and all(0 <= i < nor_tok.vocab_size for i in ids)
    assert nor_tok.decode(ids) == text


@needs_corpus
def test_round_trip_on_held_out_documents(nor_tok):
    texts = read_texts("dev.jsonl", 50)
    encoded = nor_tok.encode_batch(texts)
    assert encoded == [nor_tok.encode(t) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        assert nor_tok.decode(ids) == text
    # the BPE actually learned Norwegian: far fewer tokens than UTF-8 bytes
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in encoded)
    assert n_tokens < 0.6 * n_bytes


@needs_corpus
def test_norwegian_letters_are_merged(nor_tok):
    # 'ø' is two UTF-8 bytes; a tokenizer trained on Norwegian has merged them into one token
    for word in ("ø", "å", "æ"):
        assert len(nor_tok.encode(word)) == 1, word


@needs_corpus
def test_transformers_autotokenizer_matches(nor_tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(nor_tok.path))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert len(hf) == nor_tok.vocab_size
    for text in NORWEGIAN + read_texts("dev.jsonl", 10):
        ids = nor_tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text


# ---------------------------------------------------------------------------------- no shared data


def test_synthetic_corpus_round_trip_and_specials(synth_tok):
    assert (synth_tok.pad_id, synth_tok.bos_id, synth_tok.eos_id) == (0, 1, 2)
    assert 259 <= synth_tok.vocab_size <= 300
    for text in [*NORWEGIAN, "Bestemor laget blåbærsyltetøy hver høst.", "", "\x00\x7f"]:
        assert synth_tok.decode(synth_tok.encode(text)) == text
    # a sentence of the training corpus is compressed by the learned merges
    sent = "Bestemor laget blåbærsyltetøy hver høst."
    assert len(synth_tok.encode(sent)) < 0.75 * len(sent.encode("utf-8"))


def test_custom_special_tokens_get_ids_0_1_2(tmp_path):
    special = SpecialTokens(bos="<|begin|>", eos="<|end|>", pad="<|pad|>")
    tok = train_bpe(SYNTHETIC, tmp_path, vocab_size=280, special=special, min_frequency=1)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.decode([0, 1, 2]) == "<|pad|><|begin|><|end|>"


def test_nora_11b_options_extra_specials_nfkc_single_digits_and_capped_pieces(tmp_path):
    # NORA 11B's tokenizer: 16 specials with <mask>, NFKC, digits one by one, pieces ≤ 24 chars
    texts = [t + " Det kostet 12345 kroner for ﬁre ½ kaker." for t in SYNTHETIC] * 3
    extra = ["<mask>", "<|im_start|>", "<|im_end|>"]
    tok = train_bpe(texts, tmp_path / "opts", vocab_size=400, min_frequency=1, extra_special=extra,
                    normalizer="nfkc", split_digits=True, max_token_length=4)
    assert [tok.token_id(t) for t in extra] == [3, 4, 5]  # after pad, bos, eos
    assert [tok.id_to_token(i) for i in tok.encode("12345")] == ["1", "2", "3", "4", "5"]
    assert tok.decode(tok.encode("ﬁre")) == "fire"  # NFKC folds the ligature
    pieces = [tok.id_to_token(i) for i in range(tok.vocab_size) if i > 5]
    assert max(len(p) for p in pieces) <= 4
    plain = train_bpe(texts, tmp_path / "plain", vocab_size=400, min_frequency=1)
    assert len(plain.encode("12345")) < 5 and max(len(plain.id_to_token(i)) for i in range(3, plain.vocab_size)) > 4
    from transformers import AutoTokenizer

    assert set(extra) <= set(AutoTokenizer.from_pretrained(tmp_path / "opts").all_special_tokens)


def test_special_tokens_ordered_deduplicates():
    assert SpecialTokens().ordered() == ["<pad>", "<s>", "</s>"]
    assert SpecialTokens(bos="<x>", eos="<x>", pad="<x>").ordered() == ["<x>"]
    # NorMistral pads with </s>: <unk> keeps slot 0 so that <s> = 1 and </s> = 2 stay published ids
    assert SpecialTokens(pad="</s>").ordered() == ["<unk>", "<s>", "</s>"]


def test_vocab_too_small_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"at least 259"):
        train_bpe(SYNTHETIC, tmp_path, vocab_size=258)


def test_fingerprint_changes_with_the_tokenizer(synth_tok, tmp_path):
    other = train_bpe(SYNTHETIC[:3] * 5, tmp_path, vocab_size=270, min_frequency=1)
    assert other.fingerprint != synth_tok.fingerprint


def test_dir_without_tokenizer_json_is_a_helpful_data_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError) as e:
        Tokenizer(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg
    assert "norallm tokenizer" in msg and "tokenizer.path" in msg
    with pytest.raises(DataError, match="no tokenizer.json"):
        Tokenizer(tmp_path / "does-not-exist")


def test_corrupt_tokenizer_json_is_a_data_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="cannot load .*tokenizer.json"):
        Tokenizer(tmp_path)


def test_missing_eos_token_is_a_data_error(synth_tok, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(synth_tok.path, copy)
    cfg_file = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    del cfg["eos_token"]
    cfg_file.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(DataError, match="eos_token"):
        Tokenizer(copy)


def test_special_token_strings_in_text_are_plain_text(synth_tok):
    text = "Lim inn <s>, </s> og <pad> i HTML-eksemplet."
    for ids in (synth_tok.encode(text), synth_tok.encode_batch([text])[0]):
        assert not {synth_tok.pad_id, synth_tok.bos_id, synth_tok.eos_id} & set(ids)
        assert synth_tok.decode(ids) == text


# --------------------------------------------------------------------- SentencePiece, long documents


MISTRAL_V1 = "tokenizer.model.v1"


@pytest.fixture(scope="module")
def mistral_model() -> Path:
    """Mistral-7B-v0.1's real SentencePiece tokenizer, as shipped by mistral-common."""
    common = pytest.importorskip("mistral_common", reason="mistral-common (a dev dependency) is not installed")
    path = Path(common.__file__).parent / "data" / MISTRAL_V1
    assert path.is_file(), f"mistral-common no longer ships {MISTRAL_V1}"
    return path


def test_mistral_sentencepiece_model_gives_sentencepiece_ids(mistral_model, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    reference = sentencepiece.SentencePieceProcessor(model_file=str(mistral_model))
    tok = Tokenizer(mistral_model)  # a bare .model file: kind auto → SentencePiece
    assert tok.kind == "sentencepiece" and tok.vocab_size == 32_000
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.id_to_token(2) == "</s>"
    texts = [*NORWEGIAN, "Lim inn </s> og <s> som tekst.", "def f(x):\n    return x  # kode"]
    if SHARED.is_dir():
        texts += read_texts("dev.jsonl", 40)
    want = [reference.encode(t) for t in texts]
    assert tok.encode_batch(texts) == want
    assert [tok.encode(t) for t in texts] == want
    assert not any(2 in ids for ids in want[:6]), "a literal </s> in text is not the EOS id"
    for ids in want:
        assert tok.decode(ids) == reference.decode(ids)
    # the same file in a tokenizer dir loads alike, and transformers reads that dir to the same ids
    shutil.copy(mistral_model, tmp_path / "tokenizer.model")
    in_dir = Tokenizer(tmp_path, kind="sentencepiece", threads=1)
    assert in_dir.fingerprint == tok.fingerprint and in_dir.encode_batch(texts) == want
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert [hf.encode(t, add_special_tokens=False) for t in texts[:5]] == want[:5]


def test_tokenizer_kind_errors(tmp_path, synth_tok):
    with pytest.raises(DataError, match="SentencePiece model .* does not exist"):
        Tokenizer(tmp_path, kind="sentencepiece")
    with pytest.raises(DataError, match="kind 'bpe' is unknown"):
        Tokenizer(synth_tok.path, kind="bpe")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load SentencePiece model"):
        Tokenizer(tmp_path / "bad.model")


def test_long_documents_are_encoded_in_pieces_with_the_same_ids(nor_tok, monkeypatch):
    import data_pipeline.tokenizer as tokenizer_module

    texts = read_texts("train.jsonl", 200)
    long_text = "\n".join(texts)  # ~250 kB of real text with newlines between paragraphs
    whole = nor_tok._tok.encode(long_text, add_special_tokens=False).ids
    monkeypatch.setattr(tokenizer_module, "CHUNK_CHARS", 4096)
    cuts = tokenizer_module._safe_cuts(long_text, 4096)
    assert len(cuts) > 50 and all(long_text[c - 1] == "\n" for c in cuts)
    assert nor_tok.encode(long_text) == whole
    assert nor_tok.encode_batch(["kort", long_text, "også kort"]) == [nor_tok.encode("kort"), whole,
                                                                      nor_tok.encode("også kort")]
    # text without any newline is still cut (at spaces, or hard), so memory stays bounded
    flat = " ".join(texts[:50])
    assert len(tokenizer_module._safe_cuts(flat, 4096)) > 5
    assert nor_tok.decode(nor_tok.encode(flat)) == flat
    assert tokenizer_module._safe_cuts("x" * 10_000, 4096) == [4096, 8192]


def test_every_command_loads_the_tokenizer_kind_the_config_names(mistral_model, tmp_path):
    """A dir holding both tokenizer.json and tokenizer.model with kind: sentencepiece — prepare used
    to fingerprint the .model while train loaded tokenizer.json, so the shards were refused."""
    import re

    from data_pipeline.config import TokenizerConfig

    both = tmp_path / "both"
    train_bpe(["Det var en gang en konge.", "Eg er her no."] * 20, both, vocab_size=300, special=SpecialTokens())
    shutil.copy(mistral_model, both / "tokenizer.model")
    sp = TokenizerConfig(path=str(both), kind="sentencepiece").load()
    assert sp.kind == "sentencepiece" and sp.vocab_size == 32_000
    assert Tokenizer(both).kind == "hf"  # auto prefers tokenizer.json: what the commands used to load
    repo = Path(__file__).resolve().parents[1]
    bare = [f"{p.relative_to(repo)}: {m.group(0)}" for p in sorted((repo / "training").rglob("*.py"))
            for m in re.finditer(r"Tokenizer\(cfg\.tokenizer\.path\)", p.read_text(encoding="utf-8"))]
    assert not bare, bare  # every command goes through TokenizerConfig.load()


def test_a_path_with_an_unset_variable_names_the_variable(tmp_path, monkeypatch):
    from data_pipeline.config import SourceConfig
    from data_pipeline.sources import resolve_files

    monkeypatch.delenv("NORALLM_TEST_UNSET", raising=False)
    with pytest.raises(DataError, match=r"\$NORALLM_TEST_UNSET is not set in this environment: export it"):
        Tokenizer("${NORALLM_TEST_UNSET}/tokenizers/nora")
    with pytest.raises(DataError, match=r"\$NORALLM_TEST_UNSET is not set"):
        resolve_files(SourceConfig(name="nob", paths=["$NORALLM_TEST_UNSET/nob/*.jsonl"]))
    monkeypatch.setenv("NORALLM_TEST_UNSET", str(tmp_path))  # set, but the dir is empty: no hint
    with pytest.raises(DataError) as e:
        Tokenizer("${NORALLM_TEST_UNSET}/tokenizers/nora")
    assert "not set" not in str(e.value)
