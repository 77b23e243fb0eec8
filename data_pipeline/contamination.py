"""Decontamination: find training documents that share a long n-gram of normalised words with
evaluation text (the test and validation documents of lm-eval tasks, files the user lists, the
run's own dev files), as GPT-3 (13-grams) and OLMo did.

The evaluation text arrives here as plain ``(set name, passage)`` pairs — resolving lm-eval tasks
is the training side's job (training.eval.harness), so this package never imports it. Every
``ngram_words``-gram of every passage is hashed (data_pipeline.normalize) into one sorted array of
unique uint64: 8 bytes per distinct n-gram (NorEval's test sets: a few million n-grams, tens of MB),
memory-mapped by each worker. A training document is contaminated when any one of its n-grams is
in the array. A passage shorter than ``ngram_words`` words cannot be matched this way; such
passages are counted and reported, not silently ignored.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.normalize import ngram_hashes, word_hashes, words
from data_pipeline.sources import BadRecords, iter_jsonl_file, iter_text_file, resolve_files

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".ndjson")


@dataclass
class ReferenceSummary:
    """What the reference n-grams were made of, per set (a task, a file, a dev source)."""

    passages: Counter = field(default_factory=Counter)
    too_short: Counter = field(default_factory=Counter)  # fewer words than one n-gram: cannot be matched
    ngrams: int = 0

    def to_json(self) -> dict:
        return {"passages": dict(self.passages), "too_short": dict(self.too_short), "ngrams": self.ngrams}

    def report(self, n: int) -> str:
        sets = ", ".join(f"{k} {v:,}" for k, v in sorted(self.passages.items()))
        short = sum(self.too_short.values())
        line = f"{sum(self.passages.values()):,} evaluation passages ({sets}) → {self.ngrams:,} distinct {n}-grams"
        if short:
            line += (f"; {short:,} passage(s) shorter than {n} words cannot be matched ("
                     + ", ".join(f"{k} {v:,}" for k, v in sorted(self.too_short.items()) if v) + ")")
        return line


def build_references(passages: Iterable[tuple[str, str]], n: int, chunk: int = 4096) -> tuple[np.ndarray, ReferenceSummary]:
    """The sorted unique hashes of every ``n``-gram of the passages, and what they were made of."""
    summary = ReferenceSummary()
    parts: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    for name, text in passages:
        summary.passages[name] += 1
        grams = ngram_hashes(word_hashes(words(text)), n)
        if not len(grams):
            summary.too_short[name] += 1
            continue
        pending.append(grams)
        if len(pending) >= chunk:  # bounded: dedupe as we go rather than hold every passage's n-grams
            parts.append(np.unique(np.concatenate(pending)))
            pending = []
    if pending:
        parts.append(np.unique(np.concatenate(pending)))
    ref = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
    summary.ngrams = len(ref)
    return ref, summary


def file_passages(patterns: list[str], text_field: str, bad: BadRecords) -> Iterator[tuple[str, str]]:
    """Passages of the listed files: a JSONL file's records (``text_field``; bad lines counted in
    ``bad``), or a whole plain-text file as one passage. The set name is the file name."""
    spec = SourceConfig(name="decontamination", paths=patterns, text_field=text_field)
    for path in resolve_files(spec):
        if path.name.lower().endswith(JSONL_SUFFIXES):
            docs = iter_jsonl_file(spec, path, bad)
        else:
            docs = iter_text_file(spec, path, bad)
        for doc in docs:
            yield path.name, doc.text


def save_references(ref: np.ndarray, path: Path) -> None:
    """Write the array atomically (workers memory-map it; array tasks may race to write it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, ref)
    os.replace(tmp, path)


class References:
    """The reference n-grams of one dedup run, memory-mapped."""

    def __init__(self, path: str | Path, n: int):
        try:
            self.hashes = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"decontamination n-grams {path} cannot be read ({e}); re-run `norallm dedup`.") from e
        self.n = n

    def hits(self, normalised: list[str]) -> bool:
        """Whether the document (its normalised words) shares an n-gram with the references."""
        if len(normalised) < self.n or not len(self.hashes):
            return False
        grams = ngram_hashes(word_hashes(normalised), self.n)
        at = np.searchsorted(self.hashes, grams)
        at[at == len(self.hashes)] = 0
        return bool(np.any(self.hashes[at] == grams))
