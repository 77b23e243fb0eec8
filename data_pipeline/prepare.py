"""`norallm prepare`: stream each source once through the tokenizer into train/valid shards.

A source whose manifest already matches (same tokenizer, same source definition, same hold-out)
is kept; anything else for that source is rewritten. Bad records are counted per source and
reported at the end; more than ``max_bad_fraction`` of them fails the source with that report.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.shards import ShardWriter, read_manifest, token_dtype, write_manifest
from data_pipeline.sources import BadRecords, Document, SourceSpec, is_validation, iter_documents
from data_pipeline.tokenizer import Tokenizer


@dataclass(frozen=True)
class PrepareOptions:
    valid_fraction: float = 0.01
    max_bad_fraction: float = 0.01
    shard_tokens: int = 2**28  # ~512 MiB of uint16 per shard file
    batch_documents: int = 512
    progress: bool = True


def source_fingerprint(spec: SourceSpec, opts: PrepareOptions) -> str:
    """Changes whenever re-tokenising would give different shards."""
    key = json.dumps([asdict(spec), opts.valid_fraction], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _batches(docs: Iterator[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_source(spec: SourceSpec, tokenizer: Tokenizer, root: Path, opts: PrepareOptions) -> dict:
    """Tokenize one source into shards; returns its manifest (reused if already up to date)."""
    fingerprint = source_fingerprint(spec, opts)
    existing = read_manifest(root, spec.name)
    if (
        existing
        and existing.get("source_fingerprint") == fingerprint
        and existing.get("tokenizer_fingerprint") == tokenizer.fingerprint
    ):
        print(f"[prepare] {spec.name}: up to date ({existing['tokens']['train']:,} train tokens), kept")
        return existing
    shutil.rmtree(root / spec.name, ignore_errors=True)

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(root, spec.name, s, dtype, opts.shard_tokens) for s in ("train", "valid")}
    bad = BadRecords()
    eos = tokenizer.eos_id
    n_docs = n_tokens = n_bytes = 0
    t0 = time.monotonic()
    bar = _progress(spec.name, opts.progress)
    for batch in _batches(iter_documents(spec, bad), opts.batch_documents):
        texts = [d.text for d in batch]
        for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
            ids.append(eos)
            writers["valid" if is_validation(text, opts.valid_fraction) else "train"].add(ids)
            n_tokens += len(ids)
            n_bytes += len(text.encode("utf-8"))
        n_docs += len(batch)
        if bar is not None:
            mb_s = n_bytes / 1e6 / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"{n_tokens:,} tokens, {mb_s:.1f} MB/s", refresh=False)
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    shards = writers["train"].close() + writers["valid"].close()

    print(f"[prepare] {spec.name}: {n_docs:,} documents, {n_tokens:,} tokens. {bad.report()}")
    if bad.records_seen and bad.fraction > opts.max_bad_fraction:
        raise DataError(
            f"source '{spec.name}': {bad.fraction:.2%} of records are unusable, more than "
            f"data.max_bad_fraction={opts.max_bad_fraction}. Fix the files or raise the limit.\n{bad.report()}"
        )
    meta = {
        "language": spec.language,
        "source_fingerprint": fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "valid_fraction": opts.valid_fraction,
        "bad_records": bad.to_json(),
    }
    return write_manifest(root, spec.name, meta, shards)


def _progress(name: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc=f"prepare {name}", unit=" docs", dynamic_ncols=True)


def prepare(sources: list[SourceSpec], tokenizer: Tokenizer, root: str | Path, opts: PrepareOptions) -> list[dict]:
    """Prepare every source; raises DataError naming the first source that fails."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not sources:
        raise DataError("data.sources is empty: name at least one source to prepare.")
    return [prepare_source(spec, tokenizer, root, opts) for spec in sources]
