"""Token shards: tokenize once, read many times through memory maps.

Layout under a shards dir, one sub-dir per source::

    <shards_dir>/<source>/train-UUUUU-KKK.bin   tokens of unit U (its K-th file), uint16 (vocab ≤ 65,536)
                                                or uint32, EOS after each document
    <shards_dir>/<source>/train-UUUUU-KKK.idx   uint64 document start offsets, n_docs + 1 entries
    <shards_dir>/<source>/valid-UUUUU-KKK.*     the hold-out documents, likewise
    <shards_dir>/<source>/units/UUUUU.json      a finished work unit (data_pipeline.units): its input
                                                pieces, fingerprint, shards, counts and bad records
    <shards_dir>/<source>/manifest.json         the source, once every unit is finished

``manifest.json`` (format ``norallm-shards/1``) holds::

    format, source, language, dtype, vocab_size, valid_fraction
    source_fingerprint      what was read and how (files, sizes, unit cut, hold-out, limits)
    tokenizer_fingerprint   sha256 prefix of tokenizer.json / the SentencePiece .model
    documents, tokens       {"train": n, "valid": n}
    bad_records             records_seen, skipped {reason: n}, examples {reason: [file:line ...]}
    units                   [{index, fingerprint, documents, tokens}], in order
    shards                  [{file, split, documents, tokens, sha256}], in unit order: the
                            concatenation of a split's shards is the source's document stream

A shard file appears under its final name only once complete (written to ``.tmp``, then
renamed); a unit's record is written after its shards, and the manifest after every unit's record,
so a manifest always describes whole shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from norallm.files import unset_hint, write_text_atomic

FORMAT = "norallm-shards/1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    file: str  # path relative to the shards dir, without suffix
    split: str
    documents: int
    tokens: int
    sha256: str


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")  # array tasks may race


def read_json_record(path: Path, fmt: str) -> dict | None:
    """A JSON record written by write_json_atomic, or None when it is missing or of another format."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if record.get("format") == fmt else None


def unit_prefix(split: str, unit: int) -> str:
    """File-name prefix of a unit's shards of one split (``train-00007``)."""
    return f"{split}-{unit:05d}"


class ShardWriter:
    """Appends documents to ``<split>-NNNNN.bin/.idx`` files (or ``<split>-UUUUU-KKK`` for work unit
    U) of about ``max_tokens`` tokens each: a file closes after the document that fills it."""

    def __init__(self, root: Path, source: str, split: str, dtype: np.dtype, max_tokens: int,
                 unit: int | None = None):
        self.root, self.source, self.split = root, source, split
        self.dtype, self.max_tokens = np.dtype(dtype), max_tokens
        self.unit = unit
        self.shards: list[ShardInfo] = []
        (root / source).mkdir(parents=True, exist_ok=True)
        self._open = False

    def _start(self) -> None:
        k = len(self.shards)
        name = f"{self.split}-{k:05d}" if self.unit is None else f"{unit_prefix(self.split, self.unit)}-{k:03d}"
        self._rel = f"{self.source}/{name}"
        self._bin = open(self.root / f"{self._rel}.bin.tmp", "wb")  # noqa: SIM115 - closed in _finish
        self._sha = hashlib.sha256()
        self._offsets = [0]
        self._open = True

    def add_batch(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: ``flat`` (already of this writer's dtype) is their tokens,
        EOS included, back to back; ``lengths`` their token counts. However the documents are
        batched, the files are the same."""
        ends = np.cumsum(lengths, dtype=np.int64)
        done_docs, done_tokens = 0, 0
        while done_docs < len(lengths):
            if not self._open:
                self._start()
            room = self.max_tokens - self._offsets[-1]
            # the first document whose end fills the shard closes it (or all remaining documents)
            last = int(np.searchsorted(ends, done_tokens + room, side="left"))
            last = min(last, len(lengths) - 1)
            stop_tokens = int(ends[last])
            data = flat[done_tokens:stop_tokens].tobytes()
            self._bin.write(data)
            self._sha.update(data)
            base = self._offsets[-1] - done_tokens
            self._offsets.extend((ends[done_docs : last + 1] + base).tolist())
            done_docs, done_tokens = last + 1, stop_tokens
            if self._offsets[-1] >= self.max_tokens:
                self._finish()

    def _finish(self) -> None:
        self._bin.close()
        base = self.root / self._rel
        np.asarray(self._offsets, dtype=np.uint64).tofile(f"{base}.idx.tmp")
        os.replace(f"{base}.idx.tmp", f"{base}.idx")
        os.replace(f"{base}.bin.tmp", f"{base}.bin")
        self.shards.append(
            ShardInfo(self._rel, self.split, len(self._offsets) - 1, self._offsets[-1], self._sha.hexdigest())
        )
        self._open = False

    def close(self) -> list[ShardInfo]:
        if self._open:
            self._finish()
        return self.shards


def write_manifest(root: Path, source: str, meta: dict, shards: list[ShardInfo]) -> dict:
    manifest = {
        "format": FORMAT,
        "source": source,
        **meta,
        "documents": {s: sum(x.documents for x in shards if x.split == s) for s in ("train", "valid")},
        "tokens": {s: sum(x.tokens for x in shards if x.split == s) for s in ("train", "valid")},
        "shards": [asdict(s) for s in shards],
    }
    write_json_atomic(root / source / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path, source: str) -> dict | None:
    path = Path(root) / source / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; re-run prepare.")
    return manifest


class TokenStream:
    """The logical concatenation of a list of shards, read through memory maps."""

    def __init__(self, root: str | Path, shards: list[dict], dtype: np.dtype):
        self.root = Path(root)
        self._bins: list[np.ndarray] = []
        for s in shards:
            if s["tokens"] == 0:
                continue
            base = self.root / s["file"]
            try:
                self._bins.append(np.memmap(f"{base}.bin", dtype=dtype, mode="r"))
            except OSError as e:
                raise DataError(f"shard {base}.bin cannot be read ({e}); re-run `norallm prepare`.") from e
            if not Path(f"{base}.idx").is_file():  # never read here, but a shard without it is half-written
                raise DataError(f"shard {base}.idx cannot be read (it is missing); re-run `norallm prepare`.")
            if len(self._bins[-1]) != s["tokens"]:
                raise DataError(
                    f"shard {base}.bin has {len(self._bins[-1])} tokens, its manifest says {s['tokens']}; "
                    "the shard dir is damaged or half-written: re-run `norallm prepare`."
                )
        sizes = np.array([len(b) for b in self._bins], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.total_tokens = int(self._starts[-1])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the concatenation as int64, crossing shard borders as needed."""
        if not 0 <= start <= stop <= self.total_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.total_tokens})")
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = 0
        while pos < len(out):
            local = start + pos - int(self._starts[i])
            take = min(len(out) - pos, len(self._bins[i]) - local)
            out[pos : pos + take] = self._bins[i][local : local + take]
            pos += take
            i += 1
        return out


def open_split(root: str | Path, sources: list[str], split: str, tokenizer_fingerprint: str) -> TokenStream:
    """Open one split ('train' or 'valid') of the named sources, checking the tokenizer matches."""
    shards: list[dict] = []
    dtype = None
    for name in sources:
        manifest = read_manifest(root, name)
        if manifest is None:
            raise DataError(f"no shards for source '{name}' under {root}{unset_hint(root)}; run `norallm prepare "
                            "CONFIG` first.")
        if manifest["tokenizer_fingerprint"] != tokenizer_fingerprint:
            made_with = manifest.get("tokenizer_path")  # recorded since 2026-12; older manifests: the hash only
            raise DataError(
                f"shards of source '{name}' were tokenized with tokenizer {manifest['tokenizer_fingerprint']}"
                + (f" (at {made_with})" if made_with else "")
                + f", but the configured tokenizer (tokenizer.path) is another one (fingerprint "
                f"{tokenizer_fingerprint}). Re-run `norallm prepare` with this tokenizer, or set tokenizer.path to "
                f"the one the shards under {root} were made with."
            )
        dtype = np.dtype(manifest["dtype"])
        shards.extend(s for s in manifest["shards"] if s["split"] == split)
    return TokenStream(root, shards, dtype or np.dtype(np.uint16))
