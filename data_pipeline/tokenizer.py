"""Tokenizers: train a byte-level BPE with HF ``tokenizers``, or load an existing HF tokenizer dir
(``tokenizer.json``) or a SentencePiece model (``tokenizer.model``, e.g. Mistral's).

A trained tokenizer is saved as a standard HF dir (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) so that ``AutoTokenizer.from_pretrained`` loads it unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from data_pipeline.errors import DataError
from norallm.files import file_hash, unset_hint

# The tokenizer kinds, once: the config's type (data_pipeline.config) and the check below.
TokenizerKind = Literal["auto", "hf", "sentencepiece"]
KINDS: tuple[str, ...] = get_args(TokenizerKind)
# Texts longer than this are encoded in pieces: one 50 MB document encoded whole takes > 5 GB.
CHUNK_CHARS = 1 << 20
BPE_CACHE_WORDS = 100_000


@dataclass(frozen=True)
class SpecialTokens:
    bos: str = "<s>"
    eos: str = "</s>"
    pad: str = "<pad>"

    unk: str = "<unk>"  # fills id 0 when pad is bos or eos (NorMistral pads with </s>)

    def ordered(self) -> list[str]:
        """pad, bos, eos → ids 0, 1, 2 (NORA: ``<s>`` = 1, ``</s>`` = 2). When pad is bos or eos
        (NorMistral: pad = ``</s>`` = 2), ``<unk>`` takes id 0 so that bos and eos keep 1 and 2;
        when bos is eos too, the one token is listed once."""
        if self.bos == self.eos:
            return list(dict.fromkeys([self.pad, self.bos]))
        return [self.unk if self.pad in (self.bos, self.eos) else self.pad, self.bos, self.eos]


def _safe_cuts(text: str, size: int) -> list[int]:
    """Cut points about ``size`` characters apart, each just after a newline that sits between two
    non-space characters. Byte-level BPE pre-tokenizes such a newline as a token of its own, so the
    pieces encode to exactly the ids of the whole text; with no such newline nearby, any
    whitespace (or, failing that, a hard cut) bounds the memory instead."""
    cuts, pos = [], 0
    while len(text) - pos > size:
        window = text[pos + size // 2 : pos + size]
        at = -1
        i = len(window) - 1
        while True:
            i = window.rfind("\n", 0, i)
            if i <= 0 or i + 1 >= len(window):
                break
            if not window[i - 1].isspace() and not window[i + 1].isspace():
                at = i + 1
                break
        if at < 0:
            ws = max(window.rfind(" "), window.rfind("\n"))
            at = ws if ws > 0 else len(window)
        pos += size // 2 + at
        cuts.append(pos)
    return cuts


class Tokenizer:
    """A tokenizer for bulk encoding in the pipeline: an HF ``tokenizer.json`` (fast, Rust) or a
    SentencePiece ``.model`` (``kind``: auto picks by what ``path`` holds). ``threads`` bounds the
    SentencePiece batch threads (parallel ``prepare`` workers use one each)."""

    def __init__(self, path: str | Path, kind: str = "auto", threads: int | None = None):
        self.path = Path(path)
        self._sp = None
        self.threads = threads or -1  # SentencePiece batch threads (-1: all cores)
        if kind not in KINDS:
            raise DataError(f"tokenizer kind '{kind}' is unknown; use one of {KINDS}.")
        # a file is a SentencePiece model (tokenizer.model, mistral-common's tokenizer.model.v1, ...)
        sp_file = self.path if self.path.is_file() else self.path / "tokenizer.model"
        if kind == "sentencepiece" or (kind == "auto" and sp_file.is_file()
                                       and not (self.path / "tokenizer.json").is_file()):
            self._load_sentencepiece(sp_file)
        else:
            self._load_hf()
        special = {}
        cfg_file = (self.path.parent if self.path.is_file() else self.path) / "tokenizer_config.json"
        if cfg_file.is_file():
            special = json.loads(cfg_file.read_text(encoding="utf-8"))
        if self._sp is not None and not special:  # a bare .model: the ids SentencePiece itself declares
            self.bos_id, self.eos_id, self.pad_id = (
                i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
            )
        else:
            self.bos_id = self._id_of(special.get("bos_token"))
            self.eos_id = self._id_of(special.get("eos_token"))
            self.pad_id = self._id_of(special.get("pad_token"))
        if self.eos_id is None:
            raise DataError(
                f"tokenizer '{self.path}' names no eos_token in tokenizer_config.json; documents are "
                "separated by EOS when packed, so one is required."
            )

    def _load_hf(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise DataError(
                f"tokenizer dir '{self.path}'{unset_hint(self.path)} has no tokenizer.json (nor a SentencePiece "
                "tokenizer.model). "
                "Train one with `norallm tokenizer CONFIG` (tokenizer.train: true), or point tokenizer.path "
                "at an HF tokenizer dir or a SentencePiece .model."
            )
        try:
            self._tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the library raises bare Exceptions on corrupt files
            raise DataError(f"cannot load {tok_file}: {e}. Is it a tokenizer.json from HF tokenizers?") from e
        # Document text is data: a literal "</s>" in it must not become the EOS id (a fake document
        # border in the shards). Special ids are only ever added by the pipeline itself.
        self._tok.encode_special_tokens = True
        # BPE memoises words; its default 10,000-word cache thrashes on a corpus's long tail of words.
        # A bigger one gives the same ids (measured faster in bench/data_pipeline.py).
        if hasattr(self._tok.model, "_resize_cache"):
            self._tok.model._resize_cache(BPE_CACHE_WORDS)
        self.fingerprint = file_hash(tok_file)

    def _load_sentencepiece(self, model_file: Path) -> None:
        import sentencepiece

        if not model_file.is_file():
            raise DataError(f"SentencePiece model '{model_file}'{unset_hint(model_file)} does not exist; fix "
                            "tokenizer.path.")
        try:
            # SentencePiece never matches control symbols such as </s> in text: they stay plain text.
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise DataError(f"cannot load SentencePiece model {model_file}: {e}") from e
        self.fingerprint = file_hash(model_file)

    @property
    def kind(self) -> str:
        return "hf" if self._sp is None else "sentencepiece"

    def _id_of(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):  # AddedToken serialisation
            token = token.get("content")
        if token is None:
            return None
        if self._sp is not None:
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        if self._sp is not None:
            return self._sp.get_piece_size()
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        if self._sp is not None:
            return self._sp.encode(texts, num_threads=self.threads)
        if any(len(t) > CHUNK_CHARS for t in texts):
            return [self._encode_long(t) if len(t) > CHUNK_CHARS else self.encode_batch([t])[0] for t in texts]
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def _encode_long(self, text: str) -> list[int]:
        bounds = [0, *_safe_cuts(text, CHUNK_CHARS), len(text)]
        ids: list[int] = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            ids += self._tok.encode_batch_fast([text[a:b]], add_special_tokens=False)[0].ids
        return ids

    def token_id(self, token: str) -> int | None:
        """The id of a token string (special tokens included), None when absent."""
        return self._tok.token_to_id(token)

    def special_ids(self) -> set[int]:
        """The ids of the special tokens (an HF tokenizer's special added tokens; SentencePiece's
        control and unknown pieces)."""
        if self._sp is not None:
            return {i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def id_to_token(self, token_id: int) -> str:
        if self._sp is not None:
            return self._sp.id_to_piece(token_id)
        return self._tok.id_to_token(token_id)

    def decode(self, ids: Iterable[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(list(ids))
        return self._tok.decode(list(ids), skip_special_tokens=False)


def train_bpe(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    special: SpecialTokens = SpecialTokens(),
    min_frequency: int = 2,
    extra_special: Iterable[str] = (),
    normalizer: str = "none",
    split_digits: bool = False,
    max_token_length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE (no unknown tokens: every byte has an id) and save it as an HF dir.

    ``extra_special`` tokens follow pad/bos/eos (NORA 11B: 16 specials, ``<mask>`` among them);
    ``normalizer: nfkc`` normalizes every text before it is split, in training and in use;
    ``split_digits`` gives every digit a piece of its own; ``max_token_length`` caps a learned
    piece's length in characters."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = [t for t in dict.fromkeys(extra_special) if t not in special.ordered()]
    specials = special.ordered() + extra
    if vocab_size < 256 + len(specials):
        raise DataError(f"tokenizer.vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(specials)} (256 bytes + special tokens).")
    tok = HFTokenizer(models.BPE())
    if normalizer == "nfkc":
        tok.normalizer = normalizers.NFKC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **({"max_token_length": max_token_length} if max_token_length else {}),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special.bos, eos_token=special.eos, pad_token=special.pad,
        **({"extra_special_tokens": extra} if extra else {}),
    )
    fast.save_pretrained(str(out_dir))
    return Tokenizer(out_dir)
