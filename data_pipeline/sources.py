"""Document sources: stream text records from JSONL (plain, .gz, .zst), whole text files, Parquet
or HF ``datasets`` (the last two in :mod:`data_pipeline.columnar`).

Memory stays bounded: files are read one line (or one record batch) at a time, and a line longer
than ``max_line_bytes`` is skipped in chunks rather than read whole. Every record that cannot be
used is counted in a :class:`BadRecords` with its file and line, never dropped silently.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from norallm.files import expand_path, unset_hint

COMPRESSED = (".gz", ".zst", ".zstd")
# A JSONL line above this is skipped (counted as document_too_long) without being read whole.
MAX_LINE_BYTES = 2**28


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    path: str
    line: int  # 1-based line in a JSONL file; 0 for a whole-file document


@dataclass
class BadRecords:
    """Skipped records by reason, with the first few locations of each, for the final report."""

    max_examples: int = 3
    records_seen: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{where}: {detail}" if detail else where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        return self.total / self.records_seen if self.records_seen else 0.0

    def merge(self, other: BadRecords) -> None:
        self.records_seen += other.records_seen
        self.counts.update(other.counts)
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: max(0, self.max_examples - len(mine))])

    def to_json(self) -> dict:
        return {"records_seen": self.records_seen, "skipped": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_json(cls, obj: dict) -> BadRecords:
        return cls(records_seen=obj["records_seen"], counts=Counter(obj["skipped"]),
                   examples={k: list(v) for k, v in obj["examples"].items()})

    def report(self) -> str:
        if not self.total:
            return f"{self.records_seen} records read, none skipped."
        lines = [f"{self.total} of {self.records_seen} records skipped ({self.fraction:.2%}):"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    e.g. {ex}" for ex in self.examples.get(reason, []))
        return "\n".join(lines)


def check_bad_records(source: str, bad: BadRecords, max_bad_fraction: float, allow_truncated_files: bool) -> None:
    """Raise DataError when a source's bad records fail it (prepare, dedup and the
    conversation sources count them alike)."""
    if bad.counts.get("truncated_file") and not allow_truncated_files:
        # Its records count as one bad line, but the part cut off is unknown (it is not on disk):
        # the fraction cannot be trusted, so a truncated file fails the source by default.
        raise DataError(
            f"source '{source}': {bad.counts['truncated_file']} compressed file(s) end in the middle of their "
            f"data: {'; '.join(bad.examples['truncated_file'])}. What is missing after the cut is unknown. "
            "Re-download or re-compress the file(s), or set data.allow_truncated_files: true to keep what could "
            "be read (it is then reported as skipped).")
    if bad.records_seen and bad.fraction > max_bad_fraction:
        raise DataError(
            f"source '{source}': {bad.fraction:.2%} of records are unusable, more than "
            f"data.max_bad_fraction={max_bad_fraction}. Fix the files or raise the limit.\n{bad.report()}"
        )


def resolve_files(spec: SourceConfig) -> list[Path]:
    """Expand the source's paths and glob patterns (``~`` and ``$VARS`` too) into sorted files."""
    files: list[Path] = []
    for pattern in spec.paths:
        expanded = expand_path(pattern)
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise DataError(
                f"source '{spec.name}': '{pattern}' matches no file"
                + (f" (expanded to '{expanded}')" if expanded != pattern else "") + unset_hint(expanded)
                + ". Fix the path in data.sources, or remove the entry."
            )
        files.extend(Path(m) for m in matches if Path(m).is_file())
    if not files:
        raise DataError(f"source '{spec.name}': its paths name only directories; give files or globs.")
    return files


def open_binary(path: Path) -> io.BufferedIOBase:
    """A binary reader for a plain, .gz or .zst file (a cut .zst frame raises EOFError)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """Every frame of a .zst file; a file that ends inside a frame raises EOFError (zstandard's
    ``stream_reader`` reports a cut-off frame as a clean end of stream, losing the rest silently)."""

    def __init__(self, path: Path, chunk: int = 1 << 20):
        import zstandard

        self._new = zstandard.ZstdDecompressor().decompressobj
        self._raw = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._chunk = chunk
        self._dobj = self._new()
        self._in_frame = False  # part of a frame has been fed but the frame has not ended
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending:
            data = self._raw.read(self._chunk)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd file ended in the middle of a frame")
                return 0
            out = []
            while data:
                out.append(self._dobj.decompress(data))
                self._in_frame = not self._dobj.eof
                data = b""
                if self._dobj.eof:  # next frame (concatenated .zst files, pzstd output)
                    data, self._dobj = self._dobj.unused_data, self._new()
            self._pending = b"".join(out)
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _truncation_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return tuple(errors)


def _record_object(raw: bytes, where: str, bad: BadRecords) -> dict | None:
    """The JSON object of one JSONL line, or None after counting why it is not one."""
    if not raw.strip():
        bad.add("blank_line", where)
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.add("invalid_utf8", where, f"byte {e.start}")
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        bad.add("malformed_json", where, e.msg)
        return None
    if not isinstance(record, dict):
        bad.add("not_an_object", where, type(record).__name__)
        return None
    return record


def _record_text(raw: bytes, where: str, spec: SourceConfig, bad: BadRecords) -> str | None:
    """The usable text of one JSONL line, or None after counting why it is unusable."""
    record = _record_object(raw, where, bad)
    if record is None:
        return None
    if spec.text_field not in record:
        bad.add("missing_text_field", where, f"no '{spec.text_field}' key")
        return None
    text = record[spec.text_field]
    if not isinstance(text, str):
        bad.add("non_string_text", where, f"'{spec.text_field}' is {type(text).__name__}")
        return None
    if not text.strip():
        bad.add("empty_text", where)
        return None
    return text


def _skip_rest_of_line(f) -> int:
    """Consume the rest of an over-long line in bounded chunks; returns the bytes skipped."""
    skipped = 0
    while True:
        chunk = f.readline(1 << 20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def iter_jsonl_file(
    spec: SourceConfig,
    path: Path,
    bad: BadRecords,
    start: int = 0,
    stop: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    position: list[int] | None = None,
) -> Iterator[Document]:
    """Documents of one JSONL file. ``start``/``stop`` select the lines that *begin* in that byte
    range of a plain file (a work unit of a large file); ``position[0]`` tracks the bytes read from
    disk (compressed bytes for .gz/.zst) for progress reports."""
    for raw, where, lineno in _jsonl_lines(spec, path, bad, start, stop, max_line_bytes, position):
        if (text := _record_text(raw, where, spec, bad)) is not None:
            yield Document(text, spec.name, str(path), lineno)


def iter_jsonl_records(spec: SourceConfig, path: Path, bad: BadRecords,
                       max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[dict, str]]:
    """(record, 'file:line') for each JSON object of one JSONL file, read as the documents of
    :func:`iter_jsonl_file` are (bounded lines, .gz/.zst, a cut file counted); the rest counted."""
    for raw, where, _ in _jsonl_lines(spec, path, bad, max_line_bytes=max_line_bytes):
        if (record := _record_object(raw, where, bad)) is not None:
            yield record, where


def _jsonl_lines(spec: SourceConfig, path: Path, bad: BadRecords, start: int = 0, stop: int | None = None,
                 max_line_bytes: int = MAX_LINE_BYTES,
                 position: list[int] | None = None) -> Iterator[tuple[bytes, str, int]]:
    """(raw line, where, line number) of the lines of one JSONL file that are at most
    ``max_line_bytes`` long, each counted in ``bad.records_seen``; longer lines are skipped unread
    and a cut compressed file ends the file, both counted as bad."""
    lineno = 0
    pos = start  # byte offset of the current line (uncompressed stream)
    try:
        if start == 0 and path.name.lower().endswith(COMPRESSED) and path.stat().st_size == 0:
            # gzip and zstd read an empty file as an empty stream; it has lost even its header
            raise EOFError("the file is empty (0 bytes), not even a compressed stream's header")
        with open_binary(path) as f:
            raw_file = _raw_file(f)
            if start:
                f.seek(start - 1)
                pos = start - 1 + _skip_rest_of_line(f)  # the line holding byte start-1 belongs to the range before
            while stop is None or pos < stop:
                raw = f.readline(max_line_bytes + 1)
                if not raw:
                    break
                lineno += 1
                bad.records_seen += 1
                where = f"{path}:{lineno}" if start == 0 else f"{path}@byte{pos}"
                pos += len(raw)
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    pos += _skip_rest_of_line(f)
                    bad.add("document_too_long", where, f"line longer than {max_line_bytes:,} bytes")
                else:
                    yield raw, where, lineno
                if position is not None and lineno % 256 == 0:
                    position[0] = raw_file.tell()
    except _truncation_errors() as e:
        bad.records_seen += 1
        where = f"{path}:{lineno + 1}" if start == 0 else f"{path}@byte{pos}"
        bad.add("truncated_file", where, f"{type(e).__name__}: {e}; the rest of the file is lost")
    except OSError as e:
        raise DataError(f"source '{spec.name}': cannot read {path}: {e.strerror or e}") from e


def _raw_file(f):
    """The on-disk file under a (possibly decompressing) reader, for progress in disk bytes."""
    if isinstance(f, gzip.GzipFile):
        return f.fileobj
    if isinstance(f, io.BufferedReader) and isinstance(f.raw, _ZstdReader):
        return f.raw._raw
    return f


def iter_text_file(spec: SourceConfig, path: Path, bad: BadRecords, max_bytes: int = MAX_LINE_BYTES) -> Iterator[Document]:
    bad.records_seen += 1
    try:
        size = path.stat().st_size
        if size > max_bytes:
            bad.add("document_too_long", str(path), f"{size:,} bytes, more than {max_bytes:,}")
            return
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"source '{spec.name}': cannot read {path}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.add("invalid_utf8", str(path), f"byte {e.start}")
        return
    if not text.strip():
        bad.add("empty_text", str(path))
        return
    yield Document(text, spec.name, str(path), 0)


def is_validation(text: str, valid_fraction: float) -> bool:
    """Hold-out decision from a hash of the document text: stable across runs, machines and
    repetitions, so a validation document never enters the training order."""
    if valid_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < valid_fraction * 2**64
