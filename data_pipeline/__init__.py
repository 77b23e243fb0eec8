"""Streaming data pipeline: sources → tokenizer → shards → packed, rank-sharded batches.

config               the typed tokenizer and data sections of a config (sources included)
sources / columnar   documents from JSONL, whole files, Parquet, HF datasets; bad records counted
units                the cut of a source into independent work units
tokenizer            byte-level BPE training; HF tokenizer.json and SentencePiece loading
prepare / parallel   units → shards with worker processes and array tasks; verify checks the union
dedup / clusters     exact and near duplicates and evaluation text (normalize, contamination), dropped before prepare
shards               the on-disk format (documented there) and memory-mapped token streams
plan / mixture       the budget plan; the global sample order by arithmetic (permutation: the shuffle)
loader               rank-sharded batches; state = samples consumed + fingerprint

This package never imports ``training``; the trainer builds on it, not the other way round.
"""

from data_pipeline.errors import DataError

__all__ = ["DataError"]
