"""Warm start with a new vocabulary: move a base model onto a new tokenizer.

Each new token's input-embedding row and LM-head row is

- **copied** from the base model when the token's string is exactly one base token;
- **averaged** over the base rows of the token's string re-tokenised by the base tokenizer (the
  NORA-11B recipe) when it is several;
- taken from the base token named in ``model.special_token_map`` for special tokens (``<s>`` and
  ``</s>`` map to themselves when the base vocabulary has them);
- the mean of all base rows when there is **no source** (e.g. a new special token nobody mapped).

``model.transplant: mean`` is the ablation: every row is the mean base row, so the new model keeps
the base's body and nothing of what the token strings would carry over (no base tokenizer read).

The base tokenizer is read with ``sentencepiece`` when its dir has ``tokenizer.model``
(Mistral-7B-v0.1) and with HF ``tokenizers`` otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from data_pipeline.tokenizer import Tokenizer
from norallm.errors import NorallmError
from training import distributed


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-unicode table, inverted (what ByteLevel BPE pieces are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(piece: str) -> bytes:
    """The bytes a new-tokenizer piece stands for (byte-level BPE, or ▁-style SentencePiece)."""
    table = _byte_decoder()
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return piece.replace("▁", " ").encode("utf-8")


class _SentencePieceBase:
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def ids(self, raw: bytes) -> list[int]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a partial character: the base's byte-fallback pieces
            return [i for b in raw if (i := self.piece_id(f"<0x{b:02X}>")) is not None]
        exact = self.piece_id(text.replace(" ", "▁"))
        if exact is not None:
            return [exact]
        if text.startswith(" "):  # SentencePiece's dummy prefix plays the leading space
            return self.sp.encode(text[1:])
        pieces = self.sp.encode(text, out_type=str)
        if pieces and pieces[0] == "▁":
            pieces = pieces[1:]
        elif pieces and pieces[0].startswith("▁") and self.piece_id(pieces[0][1:]) is not None:
            pieces[0] = pieces[0][1:]  # word-internal: drop the dummy prefix merged into the first piece
        return [self.sp.piece_to_id(p) for p in pieces]


class _HFBase:
    def __init__(self, tokenizer_file: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(tokenizer_file))

    def piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def ids(self, raw: bytes) -> list[int]:
        return self.tok.encode(raw.decode("utf-8", errors="replace"), add_special_tokens=False).ids


def load_base_tokenizer(path: str | Path):
    path = Path(path)
    if (path / "tokenizer.model").is_file():
        return _SentencePieceBase(path / "tokenizer.model")
    if (path / "tokenizer.json").is_file():
        return _HFBase(path / "tokenizer.json")
    raise NorallmError(f"base tokenizer dir '{path}' has neither tokenizer.model nor tokenizer.json; set "
                       "model.base_tokenizer to the base model's tokenizer dir.")


@dataclass
class TransplantReport:
    mode: str = "strings"  # model.transplant
    copied: int = 0
    averaged: int = 0
    special: int = 0
    no_source: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, piece: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        shown = self.examples.setdefault(kind, [])
        if len(shown) < 5:
            shown.append(piece)

    def summary(self) -> str:
        if self.mode == "mean":
            return f"vocabulary transplant off (model.transplant: mean): all {self.no_source} rows the mean base row"
        return (f"vocabulary transplant: {self.copied} copied exactly, {self.averaged} averaged, "
                f"{self.special} special (mapped), {self.no_source} without source (mean row)")

    def to_json(self) -> dict:
        return {"mode": self.mode, "copied": self.copied, "averaged": self.averaged, "special": self.special,
                "no_source": self.no_source, "examples": self.examples}


def source_rows(new: Tokenizer, base, special_map: dict[str, str]) -> tuple[list[list[int]], TransplantReport]:
    """For each new token id, the base ids whose rows it takes (empty: no source)."""
    tok_json = json.loads((new.path / "tokenizer.json").read_text(encoding="utf-8"))
    specials = {t["content"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    report = TransplantReport()
    rows: list[list[int]] = []
    for i in range(new.vocab_size):
        piece = new.id_to_token(i)
        if piece in specials:
            target = special_map.get(piece, piece)
            base_id = base.piece_id(target)
            rows.append([base_id] if base_id is not None else [])
            report.note("special" if base_id is not None else "no_source", piece)
            continue
        same = base.piece_id(piece)  # the same piece in the base vocabulary (e.g. an extended tokenizer)
        ids = [same] if same is not None else base.ids(token_bytes(piece))
        rows.append(ids)
        report.note("copied" if len(ids) == 1 else "averaged" if ids else "no_source", piece)
    return rows, report


def transplant(model: torch.nn.Module, new: Tokenizer, base_tokenizer_dir: str | Path,
               special_map: dict[str, str], vocab_size: int, mode: str = "strings",
               zero3_config: dict | None = None) -> TransplantReport | None:
    """Resize ``model`` to ``vocab_size`` rows laid out for the ``new`` tokenizer, in place;
    ``mode`` is ``model.transplant`` (``mean``: every row the mean base row).

    ``zero3_config`` (a model built under ``deepspeed.zero.Init`` with that DeepSpeed config, on
    every rank together): the embedding and LM head are gathered, the new ones built partitioned,
    and rank 0 alone computes and writes the rows (``GatheredParameters(modifier_rank=0)``
    re-partitions them), so the rows are the ones a whole model gets. Returns the report on the
    rank that wrote the rows, None on the others."""
    writer = zero3_config is None or distributed.rank() == 0
    # every rank, though only the writer uses them: a bad base tokenizer then fails on all ranks
    # alike, not on rank 0 alone while the others wait in the gather below
    if mode == "mean":
        rows, report = [], TransplantReport(mode="mean", no_source=vocab_size)
    else:
        rows, report = source_rows(new, load_base_tokenizer(base_tokenizer_dir), special_map)
    tied = model.config.tie_word_embeddings
    # fp32 copies: the means are taken in fp32 whatever the model's dtype
    with _gathered(_rows_of(model), zero3_config):
        old = [w.detach().to(torch.float32, copy=True) if writer else None for w in _rows_of(model)]
    if zero3_config is None:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    else:
        _resize_partitioned(model, vocab_size, zero3_config)
    with _gathered(_rows_of(model), zero3_config, modifier_rank=0), torch.no_grad():
        for weight, base in zip(_rows_of(model), old, strict=True):
            if not writer:
                continue
            mean = base.mean(dim=0)
            for i in range(vocab_size):
                ids = rows[i] if i < len(rows) else []
                weight[i] = base[ids].mean(dim=0) if ids else mean
    if tied:
        model.tie_weights()
    return report if writer else None


def _rows_of(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights with one row per token: the input embedding, and the LM head unless tied."""
    rows = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        rows.append(model.get_output_embeddings().weight)
    return rows


def _gathered(params: list[torch.nn.Parameter], zero3_config: dict | None, modifier_rank: int | None = None):
    """The whole of ZeRO-3-partitioned ``params`` for the block (written back from
    ``modifier_rank`` and re-partitioned after it); a plain model's are whole already."""
    if zero3_config is None:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _resize_partitioned(model: torch.nn.Module, vocab_size: int, zero3_config: dict) -> None:
    """New embedding (and LM head) modules of ``vocab_size`` rows, built partitioned under
    ``deepspeed.zero.Init`` with the engine's config, uninitialised (the transplant writes every
    row). transformers' own resize builds them whole on every rank, which is what ZeRO-3 avoids."""
    import deepspeed
    from transformers.initialization import no_init_weights

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not model.config.tie_word_embeddings and head.bias is not None:
        raise NorallmError("the base model's LM head has a bias, which the vocabulary transplant does not lay out; "
                           "norallm warm-starts bases without one (training.model.families).")
    padding_idx = emb.padding_idx if emb.padding_idx is not None and emb.padding_idx < vocab_size else None
    if type(emb) is torch.nn.Embedding:
        new_embedding = functools.partial(torch.nn.Embedding, vocab_size, emb.embedding_dim, padding_idx=padding_idx)
    elif hasattr(emb, "scalar_embed_scale"):  # Gemma's embedding, scaled by sqrt(hidden) in forward
        new_embedding = functools.partial(type(emb), vocab_size, emb.embedding_dim, padding_idx,
                                          embed_scale=emb.scalar_embed_scale)
    else:
        raise NorallmError(f"the base model's input embedding is a {type(emb).__name__}, which a ZeRO-3 vocabulary "
                           "transplant cannot rebuild; use zero.stage 2 for the warm start.")
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=zero3_config):
        model.set_input_embeddings(new_embedding())
        if not model.config.tie_word_embeddings:
            model.set_output_embeddings(torch.nn.Linear(head.in_features, vocab_size, bias=False))
    model.config.get_text_config().vocab_size = vocab_size
    model.vocab_size = vocab_size  # as transformers' resize_token_embeddings leaves it


def write_report(report: TransplantReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
