"""Supervised fine-tuning data: chat tokenizer, packed conversations, and their sample source for
the one loader (data_pipeline.loader.Loader).

A packed row holds whole conversations and padding (training.data.chat.pack); its batch takes the loss
on the assistant tokens only, and each conversation attends only to itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_pipeline.batch import IGNORE, Batch
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.conversations import SHORTENED, check_source, iter_conversations, skipped_records
from data_pipeline.errors import DataError
from data_pipeline.loader import Loader, eval_rows, fingerprint
from data_pipeline.mixture import EpochShuffle
from data_pipeline.permutation import mix64
from data_pipeline.sources import MAX_LINE_BYTES, BadRecords, is_validation
from data_pipeline.tokenizer import Tokenizer
from norallm.errors import NorallmError
from training.data import chat


def ensure_chat_tokenizer(path: str | Path, base: str | Path) -> Tokenizer:
    """The base model's tokenizer with the chat tokens added (when missing), eos ``<|im_end|>``,
    pad ``</s>`` and the chat template, saved as an HF dir at ``path`` (once)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(base))
        except OSError as e:
            raise NorallmError(f"cannot load the base tokenizer from '{base}' (model.base): {e}") from e
        missing = [t for t in (chat.IM_START, chat.IM_END) if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing})
        tok.bos_token, tok.eos_token, tok.pad_token = chat.BOS, chat.IM_END, chat.PAD
        tok.chat_template = chat.CHAT_TEMPLATE
        tok.save_pretrained(str(path))
        print(f"[sft] chat tokenizer: added {missing or 'nothing'} to the base tokenizer → {path}")
    return Tokenizer(path)


def chat_ids(tokenizer: Tokenizer) -> chat.ChatIds:
    ids = [tokenizer.token_id(t) for t in (chat.BOS, chat.IM_START, chat.IM_END, chat.PAD)]
    if None in ids:
        raise DataError(f"tokenizer {tokenizer.path} lacks one of {chat.BOS}, {chat.IM_START}, {chat.IM_END}, "
                        f"{chat.PAD}; build it with `norallm tokenizer` on the SFT config.")
    return chat.ChatIds(*ids)


def load_split(specs: list[SourceConfig], tokenizer: Tokenizer, window: int, valid_fraction: float,
               bad: BadRecords, *, max_document_bytes: int = MAX_LINE_BYTES, max_bad_fraction: float = 1.0,
               allow_truncated_files: bool = False) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Tokenized conversations per split ('train', 'valid'), in file order, after the policy; each
    source holds out its own valid_fraction, else ``valid_fraction``. A source whose skipped records
    exceed ``max_bad_fraction`` (or with a cut file) fails, as in `norallm prepare`; what every
    source skipped and shortened is added to ``bad``."""
    ids = chat_ids(tokenizer)
    out: dict[str, list] = {"train": [], "valid": []}
    for spec in specs:
        held_out = spec.valid_fraction_or(valid_fraction)
        source_bad = BadRecords(bad.max_examples)
        for messages, where in iter_conversations(spec, source_bad, max_document_bytes):
            tokens, mask, ends = chat.encode(messages, tokenizer, ids)
            fitted = chat.fit(messages, tokens, mask, ends, window, where, source_bad)
            if fitted is not None:
                split = "valid" if is_validation(chat.render(messages), held_out) else "train"
                out[split].append(fitted)
        check_source(spec.name, source_bad, max_bad_fraction, allow_truncated_files)
        bad.merge(source_bad)
    return out


def conversation_batch(packed: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Batch:
    """Packed rows (tokens, loss mask, conversation ids; each (rows, T+1)) → their batch: the
    targets where the loss mask is 1, the conversation ids for attention."""
    tokens, mask, convs = packed
    return Batch(tokens[:, :-1], np.where(mask[:, 1:] != 0, tokens[:, 1:], IGNORE), convs[:, :-1])


def rows_hash(packed: tuple[np.ndarray, np.ndarray, np.ndarray]) -> str:
    """What the packed rows are, for the fingerprint (hashed as the (rows, 3, T+1) int64 stack
    that checkpoints have always been written with)."""
    tokens, mask, convs = packed
    return hashlib.sha256(np.stack([tokens, mask.astype(np.int64), convs], axis=1).tobytes()).hexdigest()[:16]


class PackedConversations:
    """Packed conversation rows as a sample source: global sample ``g`` is row ``g mod n`` of a
    seeded permutation per epoch."""

    every_target_trained = False  # prompts and padding are IGNORE

    def __init__(self, rows: Batch, seed: int, fingerprint: str):
        if len(rows) == 0:
            raise DataError("no training conversations survived the checks; see the report above.")
        self.rows, self.fingerprint = rows, fingerprint
        self._shuffle = EpochShuffle(len(rows), lambda epoch: mix64(seed) ^ epoch)

    def batch(self, samples: range) -> Batch:
        return self.rows[[self._shuffle(g) for g in samples]]

    def epoch(self, samples_consumed: int) -> float:
        return samples_consumed / len(self.rows)

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint}

    def resume(self, state: dict, samples_consumed: int) -> str:
        if state.get("fingerprint") != self.fingerprint:
            raise DataError("the checkpoint's SFT data fingerprint differs from the current one: the "
                            "conversations, tokenizer, seed or seq_len changed. Restore them or start a new run dir.")
        return ""


def sft_report(bad: BadRecords) -> str:
    """The conversation checks' report: what was skipped, and apart from it what was kept but
    shortened (data_pipeline.conversations.SHORTENED: a trailing user turn dropped, exchanges past
    the context cut)."""
    skipped = skipped_records(bad)
    shortened = {r: n for r, n in bad.counts.items() if r in SHORTENED}
    lines = [skipped.report()]
    if shortened:
        lines.append(f"{sum(shortened.values())} kept but shortened:")
        for reason, n in sorted(shortened.items()):
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    e.g. {ex}" for ex in bad.examples.get(reason, []))
    return "\n".join(lines)


def build_sft(data: DataConfig, tokenizer: Tokenizer, seed: int, global_batch_size: int, micro_batch_size: int,
              max_eval_samples: int, rank: int, world_size: int, log=print):
    """(loader, validation sets) over the conversations of ``data.sources``; the conversation
    report is printed on rank 0."""
    window = data.seq_len + 1
    bad = BadRecords()
    splits = load_split(data.sources, tokenizer, window, data.valid_fraction, bad,
                        max_document_bytes=data.max_document_bytes, max_bad_fraction=data.max_bad_fraction,
                        allow_truncated_files=data.allow_truncated_files)
    if rank == 0:
        log(f"[sft] {len(splits['train'])} train / {len(splits['valid'])} valid conversations. {sft_report(bad)}")
    ids = chat_ids(tokenizer)
    train = chat.pack(splits["train"], window, ids.pad)
    fp = fingerprint(kind="sft", rows=rows_hash(train), tokenizer=tokenizer.fingerprint, seed=seed,
                     seq_len=data.seq_len)
    source = PackedConversations(conversation_batch(train), seed, fp)
    loader = Loader(source, global_batch_size, micro_batch_size, rank, world_size)
    valid = conversation_batch(chat.pack(splits["valid"], window, ids.pad))
    mine = eval_rows(len(valid), max_eval_samples, rank, world_size)
    return loader, [("chat", "all", valid[mine])] if len(mine) else []
