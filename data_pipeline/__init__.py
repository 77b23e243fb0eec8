"""Streaming data pipeline: sources → tokenizer → shards → packed, rank-sharded batches.

This package never imports ``training``; the trainer builds on it, not the other way round.
"""

from data_pipeline.errors import DataError, NorallmError

__all__ = ["DataError", "NorallmError"]
