"""`norallm dedup`: exact and near-duplicate documents, within and across the training sources,
and documents that contain evaluation text, found before tokenizing.

Two passes, restartable and splittable like prepare:

1. Signatures, per work unit (the units of data_pipeline.units, cut exactly as prepare cuts them,
   so a document's ordinal in its unit is the same in both): for each usable document its
   normalised-text hash, its MinHash signature folded into one 64-bit hash per LSH band, and
   whether it shares an n-gram with the evaluation text. MinHash is rensa's (``RMinHash``, Rust):
   seeded, and on bench/dedup.py's corpus several times faster than datasketch's pure-Python
   MinHash for the same signatures' quality. Each unit writes ``sig-UUUUU.npy`` and then its
   record; killed and re-run, finished units are kept. ``--workers`` processes, and task ``I``
   of ``N`` takes every unit whose position is ``I`` modulo ``N``, as in prepare.
2. Clustering (data_pipeline.clusters), in one process, once every unit has its signatures (a
   run without ``--num-tasks``): drop lists per unit and ``state.json``. prepare then skips the
   dropped documents (and counts them, with their tokens, in its manifests).

Bad records are counted exactly as prepare counts them, and fail the source the same way.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.clusters import (
    REMOVES,
    UnitSignatures,
    array_sha256,
    cluster,
    drop_path,
    drop_summary,
    read_state,
    sig_path,
    sig_record_path,
    write_drops,
    write_state,
)
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.contamination import References, ReferenceSummary, build_references, save_references
from data_pipeline.errors import DataError
from data_pipeline.normalize import exact_hash, mix64, shingles, words
from data_pipeline.parallel import run_jobs
from data_pipeline.prepare import merged_bad_records
from data_pipeline.shards import read_json_record, write_json_atomic
from data_pipeline.sources import BadRecords, check_bad_records
from data_pipeline.units import Unit, UnitReader, plan_units
from norallm.files import json_hash

SIG_FORMAT = "norallm-dedup-unit/1"
_BATCH = 1024  # documents per rensa call: bounds the shingles held at once
_BAND_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
READ_FIELDS = ("name", "paths", "format", "text_field", "hf_split", "hf_subset")  # what a unit's documents depend on


def _minhash_library() -> str:
    try:
        return f"rensa {importlib.metadata.version('rensa')}"
    except importlib.metadata.PackageNotFoundError:
        raise DataError("data.dedup needs the rensa package (MinHash): pip install rensa, or reinstall norallm "
                        "(it is a dependency).") from None


@dataclass(frozen=True)
class DedupOptions:
    exact: bool = True
    near: bool = True
    shingle_words: int = 5
    bands: int = 14
    rows_per_band: int = 8
    seed: int = 1
    ngram_words: int | None = None  # decontamination n-gram length; None: no decontamination
    contamination: str | None = None  # None, "drop" or "count"
    reference_key: str = ""  # what the evaluation text was made from (reference_key())
    unit_bytes: int = 2**29
    max_document_bytes: int = 2**28
    max_bad_fraction: float = 0.01
    allow_truncated_files: bool = False
    progress: bool = True
    workers: int = 1
    task_index: int = 0
    num_tasks: int = 1

    @classmethod
    def from_config(cls, data: DataConfig, reference_key: str = "", **run) -> DedupOptions:
        d = data.dedup
        decon = d.decontamination
        return cls(exact=d.exact, near=d.near, shingle_words=d.shingle_words, bands=d.bands,
                   rows_per_band=d.rows_per_band, seed=d.seed, ngram_words=decon.ngram_words if decon else None,
                   contamination=decon.action if decon else None, reference_key=reference_key,
                   unit_bytes=data.prepare_unit_bytes, max_document_bytes=data.max_document_bytes,
                   max_bad_fraction=data.max_bad_fraction, allow_truncated_files=data.allow_truncated_files, **run)

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows_per_band

    def signature_settings(self) -> list:
        """Everything besides the input that changes a unit's signature file or record."""
        near = [self.shingle_words, self.bands, self.rows_per_band, self.seed, _minhash_library()] if self.near else []
        decon = [self.ngram_words, self.reference_key] if self.ngram_words else []
        return [near, decon, self.max_document_bytes]


def reference_key(ngram_words: int, tasks: list[str], include_path: str | None, files: list[Path],
                  dev_sources: list[tuple[SourceConfig, list[Unit]]], extra: str = "") -> str:
    """Identifies the evaluation text without reading it: task names (and ``extra``, e.g. the
    lm-eval version), the files by path, size and mtime, the dev sources by their work units."""
    return json_hash([ngram_words, tasks, include_path, extra,
                      [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                      [([getattr(s, k) for k in READ_FIELDS], [u.to_json() for u in units]) for s, units in dev_sources]])


def unit_fingerprint(spec: SourceConfig, unit: Unit, opts: DedupOptions) -> str:
    return json_hash([[getattr(spec, k) for k in READ_FIELDS], unit.to_json(), opts.signature_settings()])


@dataclass(frozen=True)
class SigJob:
    spec: SourceConfig
    unit: Unit
    fingerprint: str
    root: str
    opts: DedupOptions
    references: str | None  # the n-gram file, when decontaminating


def _band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(bands, documents) uint64: each band's ``rows`` MinHash values folded into one hash."""
    sig = signatures.astype(np.uint64).reshape(len(signatures), bands, rows)
    acc = sig[:, :, 0].copy()
    for j in range(1, rows):
        acc *= _BAND_MULTIPLIER
        acc += sig[:, :, j]
    return mix64(acc).T


def _minhash(flat: list[np.ndarray], opts: DedupOptions) -> np.ndarray:
    import rensa

    offsets = np.zeros(len(flat) + 1, dtype=np.uint64)
    np.cumsum([len(s) for s in flat], out=offsets[1:])
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(np.concatenate(flat), offsets, opts.num_perm,
                                                                 opts.seed)
    return np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(len(flat), opts.num_perm)


def read_sig_record(root: Path, source: str, index: int) -> dict | None:
    return read_json_record(sig_record_path(root, source, index), SIG_FORMAT)


def sig_is_done(root: Path, source: str, index: int, fingerprint: str) -> dict | None:
    """The unit's record when its signatures are finished with these inputs and settings."""
    record = read_sig_record(root, source, index)
    if record is None or record["fingerprint"] != fingerprint or not sig_path(root, source, index).is_file():
        return None
    return record


def signature_unit(job: SigJob, _tokenizer=None, progress=None) -> dict:
    """Signatures of one unit: ``sig-UUUUU.npy`` then its record (returned)."""
    spec, unit, opts, root = job.spec, job.unit, job.opts, Path(job.root)
    record_path, out = sig_record_path(root, spec.name, unit.index), sig_path(root, spec.name, unit.index)
    record_path.unlink(missing_ok=True)
    for stale in out.parent.glob(f"sig-{unit.index:05d}.*tmp"):  # a killed run's partial files
        stale.unlink(missing_ok=True)
    refs = References(job.references, opts.ngram_words) if job.references else None
    bad = BadRecords()
    reader = UnitReader(spec, unit, bad, opts.max_document_bytes)
    exact: list[int] = []
    bands: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    contaminated: list[int] = []
    done_bytes = 0

    def flush() -> None:
        nonlocal done_bytes
        if opts.near and pending:
            bands.append(_band_hashes(_minhash(pending, opts), opts.bands, opts.rows_per_band))
        if progress is not None:
            now = reader.bytes_done()
            progress(len(pending), 0, now - done_bytes)
            done_bytes = now
        pending.clear()

    for ordinal, doc in enumerate(reader):
        normalised = words(doc.text)
        exact.append(exact_hash(doc.text, normalised))
        pending.append(shingles(doc.text, normalised, opts.shingle_words))
        if refs is not None and refs.hits(normalised):
            contaminated.append(ordinal)
        if len(pending) == _BATCH:
            flush()
    flush()
    if progress is not None:
        progress(0, 0, unit.nbytes - done_bytes)
    rows = [np.array(exact, dtype=np.uint64)[None, :]]
    if opts.near:
        rows.append(np.concatenate(bands, axis=1) if bands else np.empty((opts.bands, 0), dtype=np.uint64))
    sig = np.concatenate(rows, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, sig)
    tmp.replace(out)
    record = {"format": SIG_FORMAT, "source": spec.name, "index": unit.index, "fingerprint": job.fingerprint,
              "pieces": unit.to_json(), "documents": len(exact), "sha256": array_sha256(sig),
              "bad_records": bad.to_json(), "contaminated": contaminated}
    write_json_atomic(record_path, record)
    return record


@dataclass
class SigPlan:
    spec: SourceConfig
    units: list[Unit]
    fingerprints: list[str]

    @classmethod
    def build(cls, spec: SourceConfig, opts: DedupOptions) -> SigPlan:
        units = plan_units(spec, opts.unit_bytes)
        if not units:
            raise DataError(f"source '{spec.name}' has no input; check its paths in data.sources.")
        return cls(spec, units, [unit_fingerprint(spec, u, opts) for u in units])


def _cluster_fingerprint(plans: list[SigPlan], opts: DedupOptions) -> str:
    return json_hash([[[p.spec.name, p.fingerprints] for p in plans], opts.exact, opts.near, opts.contamination])


def is_current(sources: list[SourceConfig], root: str | Path, opts: DedupOptions) -> bool:
    """Whether the last clustering pass under ``root`` is for these sources, inputs and settings."""
    state = read_state(root)
    plans = [SigPlan.build(s, opts) for s in sources]
    return state is not None and state["fingerprint"] == _cluster_fingerprint(plans, opts)


def _check_records(plan: SigPlan, root: Path, opts: DedupOptions) -> tuple[list[dict], BadRecords] | None:
    """The source's unit records (None while one is missing); DataError when its bad records fail it."""
    records = []
    for unit, fp in zip(plan.units, plan.fingerprints, strict=True):
        record = sig_is_done(root, plan.spec.name, unit.index, fp)
        if record is None:
            return None
        records.append(record)
    bad = merged_bad_records(records)
    check_bad_records(plan.spec.name, bad, opts.max_bad_fraction, opts.allow_truncated_files)
    return records, bad


def dedup(sources: list[SourceConfig], root: str | Path, opts: DedupOptions,
          references: Callable[[], Iterable[tuple[str, str]]] | None = None, log=print) -> dict | None:
    """Signatures for this task's units, then (a run of one task) the clustering pass. Returns the
    state (data_pipeline.clusters), or None when other tasks' units are still missing.
    ``references()`` yields ``(set name, passage)`` pairs of evaluation text, read only when some
    unit needs its signatures computed."""
    root = Path(root)
    if not sources:
        raise DataError("data.sources has no training source to deduplicate.")
    if not 0 <= opts.task_index < opts.num_tasks:
        raise DataError(f"--task-index {opts.task_index} is outside [0, --num-tasks {opts.num_tasks}).")
    plans = [SigPlan.build(s, opts) for s in sources]
    fingerprint = _cluster_fingerprint(plans, opts)
    state = read_state(root)
    if state is not None and state["fingerprint"] == fingerprint:
        log("[dedup] up to date, kept")
        return state
    jobs, position, kept = [], 0, 0
    ref_file = root / f"references-{opts.reference_key}.npy" if opts.ngram_words else None
    for plan in plans:
        for unit, fp in zip(plan.units, plan.fingerprints, strict=True):
            mine = position % opts.num_tasks == opts.task_index
            position += 1
            if not mine:
                continue
            if sig_is_done(root, plan.spec.name, unit.index, fp) is not None:
                kept += 1
            else:
                jobs.append(SigJob(plan.spec, unit, fp, str(root), opts, str(ref_file) if ref_file else None))
    if jobs and ref_file is not None and not ref_file.is_file():
        ref, summary = build_references(references() if references else [], opts.ngram_words)
        save_references(ref, ref_file)
        write_json_atomic(ref_file.with_suffix(".json"), summary.to_json())
    if ref_file is not None and ref_file.with_suffix(".json").is_file():
        log(f"[dedup] decontamination: {_reference_report(ref_file, opts.ngram_words)}")
    if opts.num_tasks > 1 or kept:
        log(f"[dedup] task {opts.task_index} of {opts.num_tasks}: {len(jobs)} unit(s) to sign, {kept} already done "
            "and kept")
    run_jobs(signature_unit, jobs, None, opts, lambda record: None, label="dedup")
    if opts.num_tasks > 1:
        log("[dedup] signatures of this task done; `norallm dedup CONFIG` (without --num-tasks) clusters once "
            "every task has finished")
        return None
    return _cluster_and_write(plans, root, opts, fingerprint, log)


def _reference_report(ref_file: Path, n: int) -> str:
    obj = json.loads(ref_file.with_suffix(".json").read_text(encoding="utf-8"))
    return ReferenceSummary(Counter(obj["passages"]), Counter(obj["too_short"]), obj["ngrams"]).report(n)


def _cluster_and_write(plans: list[SigPlan], root: Path, opts: DedupOptions, fingerprint: str, log) -> dict:
    records, bad = {}, {}
    for plan in plans:
        got = _check_records(plan, root, opts)
        if got is None:
            raise DataError(f"source '{plan.spec.name}': some work units have no signatures yet (array tasks still "
                            "running or killed); run the missing tasks, then `norallm dedup CONFIG` again.")
        records[plan.spec.name], bad[plan.spec.name] = got
    names = [p.spec.name for p in plans]
    units = [UnitSignatures(p.spec.name, u.index, r["documents"], str(sig_path(root, p.spec.name, u.index)),
                            tuple(r["contaminated"]))
             for p in plans for u, r in zip(p.units, records[p.spec.name], strict=True)]
    drops = cluster(names, units, opts.exact, opts.near, opts.bands, opts.contamination)
    sources = {}
    for plan in plans:
        entries, all_drops = [], []
        for unit, r in zip(plan.units, records[plan.spec.name], strict=True):
            arr = drops[(plan.spec.name, unit.index)]
            all_drops.append(arr)
            entries.append({"index": unit.index, "pieces": r["pieces"], "documents": r["documents"],
                            "dropped": int(np.isin(arr["reason"], REMOVES).sum()),
                            "drops_sha256": write_drops(drop_path(root, plan.spec.name, unit.index), arr)})
        summary = drop_summary(np.concatenate(all_drops), names)
        documents = sum(e["documents"] for e in entries)
        sources[plan.spec.name] = {"documents": documents, "removed": summary, "units": entries}
        removed = ", ".join(f"{k} {v['documents']:,}" for k, v in summary.items()) or "nothing"
        log(f"[dedup] {plan.spec.name}: {documents:,} documents; removed: {removed}. {bad[plan.spec.name].report()}")
    state = {"fingerprint": fingerprint, "order": names, "settings": {"exact": opts.exact, "near": opts.near,
             "shingle_words": opts.shingle_words, "bands": opts.bands, "rows_per_band": opts.rows_per_band,
             "seed": opts.seed, "minhash": _minhash_library(), "ngram_words": opts.ngram_words,
             "contamination": opts.contamination}, "sources": sources}
    write_state(root, state)
    return state
