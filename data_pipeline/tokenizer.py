"""Tokenizers: train a byte-level BPE with HF ``tokenizers`` or load an existing HF tokenizer dir.

A trained tokenizer is saved as a standard HF dir (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) so that ``AutoTokenizer.from_pretrained`` loads it unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataError


@dataclass(frozen=True)
class SpecialTokens:
    bos: str = "<s>"
    eos: str = "</s>"
    pad: str = "<pad>"

    def ordered(self) -> list[str]:
        """pad, bos, eos → ids 0, 1, 2 (NORA: ``<s>`` = 1, ``</s>`` = 2); duplicates once."""
        return list(dict.fromkeys([self.pad, self.bos, self.eos]))


class Tokenizer:
    """A fast tokenizer read from an HF tokenizer dir; used for bulk encoding in the pipeline."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise DataError(
                f"tokenizer dir '{self.path}' has no tokenizer.json. Train one with "
                "`norallm tokenizer CONFIG` (tokenizer.train: true), or point tokenizer.path at an HF "
                "tokenizer dir."
            )
        try:
            self._tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the library raises bare Exceptions on corrupt files
            raise DataError(f"cannot load {tok_file}: {e}. Is it a tokenizer.json from HF tokenizers?") from e
        # Document text is data: a literal "</s>" in it must not become the EOS id (a fake document
        # border in the shards). Special ids are only ever added by the pipeline itself.
        self._tok.encode_special_tokens = True
        self.fingerprint = hashlib.sha256(tok_file.read_bytes()).hexdigest()[:16]
        special = {}
        cfg_file = self.path / "tokenizer_config.json"
        if cfg_file.is_file():
            special = json.loads(cfg_file.read_text(encoding="utf-8"))
        self.bos_id = self._id_of(special.get("bos_token"))
        self.eos_id = self._id_of(special.get("eos_token"))
        self.pad_id = self._id_of(special.get("pad_token"))
        if self.eos_id is None:
            raise DataError(
                f"tokenizer '{self.path}' names no eos_token in tokenizer_config.json; documents are "
                "separated by EOS when packed, so one is required."
            )

    def _id_of(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):  # AddedToken serialisation
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def train_bpe(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    special: SpecialTokens = SpecialTokens(),
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE (no unknown tokens: every byte has an id) and save it as an HF dir."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special.ordered()
    if vocab_size < 256 + len(specials):
        raise DataError(f"tokenizer.vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(specials)} (256 bytes + special tokens).")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special.bos, eos_token=special.eos, pad_token=special.pad
    )
    fast.save_pretrained(str(out_dir))
    return Tokenizer(out_dir)
