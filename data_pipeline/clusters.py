"""The clustering pass of `norallm dedup`, and the drop lists it leaves for `norallm prepare`.

Every training document has a global position ``g``: sources in config order, then work units in
order, then documents in reading order (file order, then offset). Within every group of
duplicates the document with the smallest ``g`` is kept: the copy in the source listed first, and
within a source the earliest one. The rule does not depend on how the signatures were computed
(workers, array tasks), so the drop lists are the same for any split of the work.

- exact: documents with the same normalised-text hash (data_pipeline.normalize); all but the
  first are dropped as ``exact``.
- near: among the rest, documents that share any LSH band (a hash of ``rows_per_band``
  consecutive MinHash values) are linked; every connected group keeps its first document and
  drops the others as ``near`` (as datatrove does: a chain A~B~C drops B and C).
- contaminated: documents the signature pass flagged (data_pipeline.contamination), unless
  already dropped as duplicates: ``contaminated`` (action drop) or ``contaminated_kept`` (action
  count: kept, only reported).

Memory, for N documents, one row (the exact hashes, then each band) at a time: the 8-byte hashes,
their 8-byte sort order and the sorted copy (24 bytes × N, less once the values are sorted), a
1-byte reason and the 2-byte source of the kept copy per document; the components need 8-byte
labels and their 8-byte compression (16 bytes × N). So about 27 bytes per document at the peak
(25 GiB per billion documents), plus 16 bytes for each (document, band) whose band value another
document shares. bench/dedup.py measures the peak RSS.

Layout under the dedup dir (data.dedup.dir, default ``<shards_dir>/dedup``)::

    <source>/sig-UUUUU.npy    uint64 (1 + bands, documents): row 0 the exact hash, then one row per band
    <source>/sig-UUUUU.json   the unit's record: fingerprint, documents, bad records, contaminated ordinals
    <source>/drop-UUUUU.npy   the unit's drop list: (ordinal uint32, reason uint8, kept_source uint16)
    references-KEY.npy        the decontamination n-grams (data_pipeline.contamination)
    state.json                the clustering result: fingerprint, per unit its drop list's sha256, counts
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.shards import read_json_record, write_json_atomic

STATE = "state.json"
STATE_FORMAT = "norallm-dedup/1"
REASONS = ("", "exact", "near", "contaminated", "contaminated_kept")
EXACT, NEAR, CONTAMINATED, CONTAMINATED_KEPT = 1, 2, 3, 4
REMOVES = (EXACT, NEAR, CONTAMINATED)  # reasons that take a document out; contaminated_kept only counts it
DROP_DTYPE = np.dtype([("ordinal", "<u4"), ("reason", "u1"), ("kept_source", "<u2")])


def sig_path(root: Path, source: str, index: int) -> Path:
    return root / source / f"sig-{index:05d}.npy"


def sig_record_path(root: Path, source: str, index: int) -> Path:
    return root / source / f"sig-{index:05d}.json"


def drop_path(root: Path, source: str, index: int) -> Path:
    return root / source / f"drop-{index:05d}.npy"


@dataclass(frozen=True)
class UnitSignatures:
    """What the clustering pass needs of one unit's signature pass."""

    source: str
    index: int
    documents: int
    path: str  # its sig-UUUUU.npy
    contaminated: tuple[int, ...]  # ordinals the signature pass flagged


def _load_row(units: list[UnitSignatures], row: int, alive: np.ndarray | None = None) -> np.ndarray:
    """One row of every unit's signatures, concatenated in global order (only the ``alive`` positions)."""
    total = sum(u.documents for u in units) if alive is None else int(np.count_nonzero(alive))
    out = np.empty(total, dtype=np.uint64)
    at = start = 0
    for u in units:
        if u.documents:
            values = np.load(u.path, mmap_mode="r")[row]
            if alive is not None:
                values = values[alive[start : start + u.documents]]
            out[at : at + len(values)] = values
            at += len(values)
        start += u.documents
    return out


def _sorted_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stable sort order of ``values``, True where a run of equal sorted values starts); ``values``
    is consumed (emptied) to keep the peak at three arrays of its size."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    values.resize(0, refcheck=False)
    starts = np.empty(len(ordered), dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    return order, starts


def _exact_duplicates(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions that repeat an earlier position's value, that earlier position), for ``values``
    in global order; the first of equal values is the smallest position (a stable sort)."""
    order, starts = _sorted_runs(values)
    run_first = np.flatnonzero(starts)
    repeats = np.flatnonzero(~starts)
    del starts
    keeper = order[run_first[np.searchsorted(run_first, repeats, side="right") - 1]]
    return order[repeats], keeper


def _compress(labels: np.ndarray) -> None:
    """Point every label at its root (labels only ever point to smaller positions)."""
    while True:
        nxt = labels[labels]
        if np.array_equal(nxt, labels):
            return
        labels[:] = nxt


def _components(total: int, groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Label of each position: the smallest position of its connected group, where every group
    ``(members, starts, sizes)`` lists runs of linked positions."""
    labels = np.arange(total, dtype=np.int64)
    changed = True
    while changed:
        changed = False
        for members, starts, sizes in groups:
            roots = labels[members]
            low = np.repeat(np.minimum.reduceat(roots, starts), sizes)
            hook = low < roots
            if hook.any():
                np.minimum.at(labels, roots[hook], low[hook])
                _compress(labels)
                changed = True
    return labels


def _band_groups(units: list[UnitSignatures], bands: int, alive: np.ndarray):
    """Per band, the runs of (alive) documents sharing that band's value, as global positions."""
    groups = []
    for b in range(bands):
        order, starts = _sorted_runs(_load_row(units, 1 + b, alive))
        shared = ~starts  # a position equal to the one before it, and (below) the one before it too
        shared[:-1] |= shared[1:]
        local = order[shared]
        del order
        run_starts = np.flatnonzero(starts[shared])
        del starts, shared
        if len(local):
            sizes = np.diff(np.append(run_starts, len(local)))
            groups.append((np.flatnonzero(alive)[local], run_starts, sizes))
    return groups


def cluster(sources: list[str], units: list[UnitSignatures], exact: bool, near: bool, bands: int,
            contamination: str | None) -> dict[tuple[str, int], np.ndarray]:
    """The drop list (DROP_DTYPE) of every unit, ``units`` given in global order (see the module
    doc); ``contamination`` is None, "drop" or "count"."""
    total = sum(u.documents for u in units)
    starts = np.cumsum([0] + [u.documents for u in units])
    source_of_unit = np.array([sources.index(u.source) for u in units], dtype=np.uint16)

    def source_of(positions: np.ndarray) -> np.ndarray:
        return source_of_unit[np.searchsorted(starts, positions, side="right") - 1]

    reason = np.zeros(total, dtype=np.uint8)
    kept_source = np.zeros(total, dtype=np.uint16)  # for dropped duplicates: where the kept copy is
    if exact and total:
        dup, keeper = _exact_duplicates(_load_row(units, 0))
        reason[dup], kept_source[dup] = EXACT, source_of(keeper)
        del dup, keeper
    if near and bands and total:
        labels = _components(total, _band_groups(units, bands, reason == 0))
        dup = np.flatnonzero(labels != np.arange(total))
        dup = dup[reason[dup] == 0]
        reason[dup], kept_source[dup] = NEAR, source_of(labels[dup])
        del labels, dup
    if contamination is not None:
        flagged = np.array([starts[i] + o for i, u in enumerate(units) for o in u.contaminated], dtype=np.int64)
        flagged = flagged[reason[flagged] == 0]
        reason[flagged] = CONTAMINATED if contamination == "drop" else CONTAMINATED_KEPT
        kept_source[flagged] = source_of(flagged)
    drops = {}
    for i, u in enumerate(units):
        local = np.flatnonzero(reason[starts[i] : starts[i + 1]])
        arr = np.empty(len(local), dtype=DROP_DTYPE)
        arr["ordinal"], arr["reason"] = local, reason[starts[i] + local]
        arr["kept_source"] = kept_source[starts[i] + local]
        drops[(u.source, u.index)] = arr
    return drops


def drop_summary(drops: np.ndarray, sources: list[str]) -> dict:
    """Documents per reason, and per reason the sources holding the kept copies."""
    out: dict = {}
    for code in np.unique(drops["reason"]):
        picked = drops[drops["reason"] == code]
        entry: dict = {"documents": len(picked)}
        if code in (EXACT, NEAR):
            entry["kept_in"] = {sources[k]: int(n) for k, n in sorted(Counter(picked["kept_source"].tolist()).items())}
        out[REASONS[code]] = entry
    return out


def array_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(arr.tobytes()).hexdigest()


def write_drops(path: Path, arr: np.ndarray) -> str:
    """Write a unit's drop list atomically; returns the sha256 of its contents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
    return array_sha256(arr)


def read_state(root: str | Path) -> dict | None:
    return read_json_record(Path(root) / STATE, STATE_FORMAT)


def write_state(root: Path, state: dict) -> None:
    write_json_atomic(root / STATE, {"format": STATE_FORMAT, **state})


@dataclass(frozen=True)
class UnitDrops:
    """Where prepare finds a unit's drop list, and what it must hold."""

    path: str
    sha256: str
    documents: int  # documents the signature pass read in the unit: prepare must read as many
    sources: tuple[str, ...]  # kept_source → source name


def unit_drops(root: str | Path, source: str, pieces: list[list[dict]]) -> list[UnitDrops]:
    """The drop list of each unit of ``source`` (its units' pieces, in order) from the last
    clustering pass; a DataError naming `norallm dedup` when there is none for these inputs."""
    state = read_state(root)
    entry = (state or {}).get("sources", {}).get(source)
    rerun = "run `norallm dedup CONFIG` (it is run by a prepare without --num-tasks)."
    if entry is None:
        raise DataError(f"source '{source}': no deduplication result under {root}; {rerun}")
    if [u["pieces"] for u in entry["units"]] != pieces:
        raise DataError(f"source '{source}': its files changed since `norallm dedup` ran (the work units differ); "
                        + rerun)
    order = tuple(state["order"])
    return [UnitDrops(str(drop_path(Path(root), source, u["index"])), u["drops_sha256"], u["documents"], order)
            for u in entry["units"]]


def load_drops(d: UnitDrops, source: str) -> dict[int, tuple[int, int]]:
    """ordinal → (reason, kept_source) of one unit, checked against the state's checksum."""
    try:
        arr = np.load(d.path)
    except (OSError, ValueError) as e:
        raise DataError(f"source '{source}': drop list {d.path} cannot be read ({e}); re-run `norallm dedup`.") from e
    if arr.dtype != DROP_DTYPE or array_sha256(arr) != d.sha256:
        raise DataError(f"source '{source}': drop list {d.path} is not the one `norallm dedup` recorded; re-run it.")
    return {int(o): (int(r), int(k)) for o, r, k in arr.tolist()}
