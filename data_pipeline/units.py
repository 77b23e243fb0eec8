"""Work units: how a source is cut into independent pieces of work for parallel, restartable,
array-job preparation.

A unit is a list of pieces read in order; a piece is a whole file, a byte range of a large plain
JSONL file (the lines that *begin* in the range), a range of row groups of a large Parquet file,
or one shard of an HF dataset. Small files are grouped until a unit holds about ``unit_bytes``.

The cut depends only on the source's files (sorted paths and sizes) and ``unit_bytes`` — never on
the number of workers or array tasks — and the concatenation of a source's units, in order, is
exactly the source's document stream. So every unit can write its own shard files, and any split
of the units over processes or Slurm tasks yields byte-identical shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.config import FORMATS, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import (
    COMPRESSED,
    MAX_LINE_BYTES,
    BadRecords,
    Document,
    iter_jsonl_file,
    iter_text_file,
    resolve_files,
)


@dataclass(frozen=True)
class Piece:
    path: str
    start: int = 0  # plain JSONL: first byte; Parquet: first row group; hf: shard index
    stop: int | None = None  # exclusive; None: to the end of the file
    file_bytes: int = 0  # the file's size when planned: a changed file changes the unit
    nbytes: int = 0  # input bytes this piece stands for (progress and ETA)


@dataclass(frozen=True)
class Unit:
    source: str
    index: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def to_json(self) -> list[dict]:
        return [asdict(p) for p in self.pieces]


def _ranges(total: int, unit_bytes: int) -> list[tuple[int, int]]:
    """``[0, total)`` cut into ⌈total / unit_bytes⌉ near-equal consecutive ranges."""
    n = -(-total // unit_bytes)
    return [(i * total // n, (i + 1) * total // n) for i in range(n)]


def _group_ranges(weights: list[int], unit_bytes: int) -> list[tuple[int, int]]:
    """Consecutive index ranges of ``weights`` (Parquet row groups), each about ``unit_bytes``."""
    out, first, acc = [], 0, 0
    for i, w in enumerate(weights):
        if acc and acc + w > unit_bytes:
            out.append((first, i))
            first, acc = i, 0
        acc += w
    out.append((first, len(weights)))
    return out


def plan_units(spec: SourceConfig, unit_bytes: int | None) -> list[Unit]:
    """The source's work units. ``unit_bytes=None``: one unit per file (or HF shard), unsplit."""
    if spec.format not in FORMATS:
        raise DataError(f"source '{spec.name}': unknown format '{spec.format}'; use one of {FORMATS}.")
    pieces_per_unit: list[list[Piece]] = []
    if spec.format == "hf":
        from data_pipeline.columnar import hf_shards

        for path in spec.paths:
            pieces_per_unit += [[Piece(path, i, i + 1)] for i in range(hf_shards(spec, path))]
        return [Unit(spec.name, i, tuple(p)) for i, p in enumerate(pieces_per_unit)]

    group: list[Piece] = []

    def flush() -> None:
        if group:
            pieces_per_unit.append(list(group))
            group.clear()

    for path in resolve_files(spec):
        size = path.stat().st_size
        if spec.format == "parquet":
            from data_pipeline.columnar import parquet_row_groups

            groups = parquet_row_groups(spec, path)  # also checks every file is readable, up front
            weight = sum(groups)
            if unit_bytes and weight > unit_bytes and len(groups) > 1:
                flush()
                for a, b in _group_ranges(groups, unit_bytes):
                    pieces_per_unit.append([Piece(str(path), a, b, size, sum(groups[a:b]))])
                continue
            piece = Piece(str(path), 0, None, size, weight)
        elif (spec.format == "jsonl" and unit_bytes and size > unit_bytes
              and not path.name.lower().endswith(COMPRESSED)):
            flush()
            pieces_per_unit += [[Piece(str(path), a, b, size, b - a)] for a, b in _ranges(size, unit_bytes)]
            continue
        else:
            piece = Piece(str(path), 0, None, size, size)
        if unit_bytes is None or (group and sum(p.nbytes for p in group) + piece.nbytes > unit_bytes):
            flush()
        group.append(piece)
    flush()
    return [Unit(spec.name, i, tuple(p)) for i, p in enumerate(pieces_per_unit)]


class UnitReader:
    """Iterates a unit's documents; ``bytes_done()`` tells how far into the unit's input it is."""

    def __init__(self, spec: SourceConfig, unit: Unit, bad: BadRecords, max_document_bytes: int = MAX_LINE_BYTES):
        self.spec, self.unit, self.bad, self.max_bytes = spec, unit, bad, max_document_bytes
        self._done = 0
        self._position = [0]
        self._base = 0

    def bytes_done(self) -> int:
        return self._done + max(0, self._position[0] - self._base)

    def __iter__(self) -> Iterator[Document]:
        spec = self.spec
        for piece in self.unit.pieces:
            path = Path(piece.path)
            plain_range = spec.format == "jsonl" and not path.name.lower().endswith(COMPRESSED)
            self._base = piece.start if plain_range else 0
            self._position = [self._base]
            if spec.format == "jsonl":
                yield from iter_jsonl_file(spec, path, self.bad, piece.start, piece.stop, self.max_bytes, self._position)
            elif spec.format == "files":
                yield from iter_text_file(spec, path, self.bad, self.max_bytes)
            elif spec.format == "parquet":
                from data_pipeline.columnar import iter_parquet

                yield from iter_parquet(spec, path, self.bad, piece.start, piece.stop, self.max_bytes, self._position)
            else:
                from data_pipeline.columnar import iter_hf

                yield from iter_hf(spec, piece.path, self.bad, piece.start, self.max_bytes)
            self._done += piece.nbytes
            self._position, self._base = [0], 0


def iter_unit(spec: SourceConfig, unit: Unit, bad: BadRecords, max_document_bytes: int = MAX_LINE_BYTES):
    """The unit's usable documents, in order; bad records counted in ``bad``."""
    return iter(UnitReader(spec, unit, bad, max_document_bytes))


def iter_documents(spec: SourceConfig, bad: BadRecords | None = None) -> Iterator[Document]:
    """Yield the source's usable documents in a stable order; count the rest in ``bad``.

    The order is that of the concatenated work units (data_pipeline.units), so shards written
    unit by unit hold the documents in exactly this order."""
    bad = bad if bad is not None else BadRecords()
    for unit in plan_units(spec, unit_bytes=None):
        yield from iter_unit(spec, unit, bad)
