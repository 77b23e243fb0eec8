"""`norallm prepare`: stream each source once through the tokenizer into train/valid shards.

Work is cut into units (data_pipeline.units); each unit writes its own shard files and then a
record of them (``<source>/units/UUUUU.json``). Units are independent, so they run in parallel
worker processes, and a Slurm array splits them over tasks: task ``I`` of ``N`` takes every unit
whose position in the config's unit list is ``I`` modulo ``N``. Killed and re-run, prepare keeps
every unit with a valid record and redoes the others from scratch.

A source's ``manifest.json`` is written once all its units are finished, by whichever process
finishes the last one; it is kept as long as the tokenizer, the source definition, the input
files and the options that shape the shards are unchanged. Bad records are counted per unit and
reported per source; more than ``max_bad_fraction`` of them fails the source with that report.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.clusters import EXACT, NEAR, REASONS, REMOVES, UnitDrops, load_drops, unit_drops
from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.parallel import run_jobs
from data_pipeline.shards import (
    MANIFEST,
    ShardInfo,
    ShardWriter,
    read_json_record,
    read_manifest,
    token_dtype,
    unit_prefix,
    write_json_atomic,
    write_manifest,
)
from data_pipeline.sources import MAX_LINE_BYTES, BadRecords, Document, check_bad_records, is_validation
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.units import Unit, UnitReader, plan_units
from norallm.files import json_hash

UNIT_FORMAT = "norallm-unit/1"


@dataclass(frozen=True)
class PrepareOptions:
    valid_fraction: float = 0.01  # default hold-out; a source's own valid_fraction wins
    max_bad_fraction: float = 0.01
    allow_truncated_files: bool = False  # a cut .gz/.zst loses an unknown part of the source
    shard_tokens: int = 2**28  # ~512 MiB of uint16 per shard file
    batch_documents: int = 512
    progress: bool = True
    unit_bytes: int = 2**29  # input bytes per work unit (restart and parallelism granularity)
    max_document_bytes: int = MAX_LINE_BYTES
    workers: int = 1
    task_index: int = 0
    num_tasks: int = 1
    dedup_dir: str | None = None  # skip the documents `norallm dedup` dropped (data_pipeline.clusters)


@dataclass(frozen=True)
class UnitJob:
    """One unit to tokenize, with everything a worker process needs."""

    spec: SourceConfig
    unit: Unit
    fingerprint: str
    root: str
    opts: PrepareOptions
    drops: UnitDrops | None = None


def _hash(obj) -> str:
    return json_hash(obj)


# The source's fields that its shards depend on, fingerprinted as they always have been (language
# is recorded in the manifest; valid_fraction as written, besides the resolved hold-out). The others
# (share, weight, max_epochs, unique_tokens) only weigh the source in the plan.
SHAPING_FIELDS = ("name", "paths", "format", "text_field", "language", "valid_fraction", "hf_split", "hf_subset")


def _shaping(spec: SourceConfig, opts: PrepareOptions) -> list:
    """Everything besides the input and the tokenizer that changes the shard bytes."""
    fields = {name: getattr(spec, name) for name in SHAPING_FIELDS}
    return [fields, spec.valid_fraction_or(opts.valid_fraction), opts.max_document_bytes, opts.shard_tokens]


def unit_fingerprint(spec: SourceConfig, unit: Unit, opts: PrepareOptions, tokenizer_fingerprint: str) -> str:
    return _hash([_shaping(spec, opts), unit.to_json(), tokenizer_fingerprint])


def source_fingerprint(spec: SourceConfig, opts: PrepareOptions, units: list[Unit]) -> str:
    """Changes whenever re-tokenising would give different shards (tokenizer aside)."""
    return _hash([_shaping(spec, opts), opts.unit_bytes, [u.to_json() for u in units]])


def _batches(docs: Iterator[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def units_dir(root: Path, source: str) -> Path:
    return root / source / "units"


def _record_path(root: Path, source: str, index: int) -> Path:
    return units_dir(root, source) / f"{index:05d}.json"


def read_unit_record(root: Path, source: str, index: int) -> dict | None:
    return read_json_record(_record_path(root, source, index), UNIT_FORMAT)


def unit_is_done(root: Path, source: str, index: int, fingerprint: str, dtype: np.dtype) -> dict | None:
    """The unit's record when it is finished with these inputs and its shard files are whole."""
    record = read_unit_record(root, source, index)
    if record is None or record["fingerprint"] != fingerprint:
        return None
    for s in record["shards"]:
        bin_file = root / f"{s['file']}.bin"
        if not bin_file.is_file() or bin_file.stat().st_size != s["tokens"] * dtype.itemsize:
            return None
    return record


def clear_unit(root: Path, source: str, index: int) -> None:
    """Remove whatever a killed run left of a unit: shard files, temporaries, its record."""
    for split in ("train", "valid"):
        for f in (root / source).glob(f"{unit_prefix(split, index)}-*"):
            f.unlink(missing_ok=True)
    _record_path(root, source, index).unlink(missing_ok=True)


def _count_removed(removed: dict, reason: int, kept_source: str | None, tokens: int) -> None:
    entry = removed.setdefault(REASONS[reason], {"documents": 0, "tokens": 0})
    entry["documents"] += 1
    entry["tokens"] += tokens
    if kept_source is not None:
        kept_in = entry.setdefault("kept_in", {})
        kept_in[kept_source] = kept_in.get(kept_source, 0) + 1


def merge_removed(parts: list[dict]) -> dict:
    """The removal counts of several units (or sources) added up."""
    out: dict = {}
    for part in parts:
        for reason, entry in part.items():
            mine = out.setdefault(reason, {"documents": 0, "tokens": 0})
            mine["documents"] += entry["documents"]
            mine["tokens"] += entry["tokens"]
            for name, n in entry.get("kept_in", {}).items():
                mine.setdefault("kept_in", {})[name] = mine.get("kept_in", {}).get(name, 0) + n
    return out


def process_unit(job: UnitJob, tokenizer: Tokenizer, progress=None) -> dict:
    """Tokenize one unit into its shard files and write its record; returns the record. Documents
    on the unit's drop list are tokenized only to count their tokens, and not written.

    ``progress(documents, tokens, input_bytes)`` is called after every batch with increments."""
    spec, unit, opts, root = job.spec, job.unit, job.opts, Path(job.root)
    clear_unit(root, spec.name, unit.index)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(root, spec.name, s, dtype, opts.shard_tokens, unit=unit.index) for s in ("train", "valid")}
    bad = BadRecords()
    eos, valid_fraction = tokenizer.eos_id, spec.valid_fraction_or(opts.valid_fraction)
    reader = UnitReader(spec, unit, bad, opts.max_document_bytes)
    drops = load_drops(job.drops, spec.name) if job.drops is not None else {}
    kept_sources = job.drops.sources if job.drops is not None else ()
    removed: dict = {}
    input_done = ordinal = 0
    for batch in _batches(iter(reader), opts.batch_documents):
        texts = [d.text for d in batch]
        flat: dict[str, list[int]] = {"train": [], "valid": []}
        lengths: dict[str, list[int]] = {"train": [], "valid": []}
        for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
            verdict = drops.get(ordinal)
            ordinal += 1
            if verdict is not None:
                reason, kept = verdict
                _count_removed(removed, reason, kept_sources[kept] if reason in (EXACT, NEAR) else None, len(ids) + 1)
                if reason in REMOVES:
                    continue
            split = "valid" if is_validation(text, valid_fraction) else "train"
            flat[split].extend(ids)
            flat[split].append(eos)
            lengths[split].append(len(ids) + 1)
        for split, writer in writers.items():
            if lengths[split]:
                writer.add_batch(np.array(flat[split], dtype=dtype), np.array(lengths[split], dtype=np.int64))
        if progress is not None:
            now = reader.bytes_done()
            progress(len(batch), sum(len(x) for x in flat.values()), now - input_done)
            input_done = now
    if progress is not None:
        progress(0, 0, unit.nbytes - input_done)
    if job.drops is not None and ordinal != job.drops.documents:
        raise DataError(f"source '{spec.name}' unit {unit.index}: read {ordinal:,} documents, `norallm dedup` read "
                        f"{job.drops.documents:,}: the input changed since; re-run `norallm dedup CONFIG`.")
    shards: list[ShardInfo] = writers["train"].close() + writers["valid"].close()
    record = {
        "format": UNIT_FORMAT,
        "source": spec.name,
        "index": unit.index,
        "fingerprint": job.fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "pieces": unit.to_json(),
        "documents": {s: sum(x.documents for x in shards if x.split == s) for s in ("train", "valid")},
        "tokens": {s: sum(x.tokens for x in shards if x.split == s) for s in ("train", "valid")},
        "bad_records": bad.to_json(),
        "shards": [asdict(s) for s in shards],
    }
    if job.drops is not None:
        record["removed"] = removed
    units_dir(root, spec.name).mkdir(parents=True, exist_ok=True)
    write_json_atomic(_record_path(root, spec.name, unit.index), record)
    return record


@dataclass
class SourcePlan:
    """A source's units and fingerprints, computed the same way by every task."""

    spec: SourceConfig
    units: list[Unit]
    fingerprints: list[str]
    source_fingerprint: str
    drops: list[UnitDrops] | None = None  # per unit, with data.dedup (training sources only)

    @classmethod
    def build(cls, spec: SourceConfig, tokenizer: Tokenizer, opts: PrepareOptions) -> SourcePlan:
        units = plan_units(spec, opts.unit_bytes)
        if not units:
            raise DataError(f"source '{spec.name}' has no input; check its paths in data.sources.")
        fps = [unit_fingerprint(spec, u, opts, tokenizer.fingerprint) for u in units]
        source_fp = source_fingerprint(spec, opts, units)
        if opts.dedup_dir is None or spec.validation_only:
            return cls(spec, units, fps, source_fp)
        # without dedup the fingerprints stay as they were, so shards prepared before it stay current
        drops = unit_drops(opts.dedup_dir, spec.name, [u.to_json() for u in units])
        fps = [_hash([fp, d.sha256]) for fp, d in zip(fps, drops, strict=True)]
        return cls(spec, units, fps, _hash([source_fp, [d.sha256 for d in drops]]), drops)

    def manifest_is_current(self, root: Path, tokenizer: Tokenizer) -> dict | None:
        m = read_manifest(root, self.spec.name)
        if (m and m.get("source_fingerprint") == self.source_fingerprint
                and m.get("tokenizer_fingerprint") == tokenizer.fingerprint):
            return m
        return None


def merged_bad_records(records: list[dict]) -> BadRecords:
    """The bad records of several unit records (prepare's or dedup's), added up."""
    bad = BadRecords()
    for r in records:
        bad.merge(BadRecords.from_json(r["bad_records"]))
    return bad


def finalize_source(plan: SourcePlan, tokenizer: Tokenizer, root: Path, opts: PrepareOptions) -> dict | None:
    """Write the source's manifest if every unit is finished (else None). Raises DataError, and
    writes no manifest, when more than ``max_bad_fraction`` of its records are bad."""
    spec, dtype = plan.spec, token_dtype(tokenizer.vocab_size)
    if len(list(units_dir(root, spec.name).glob("*.json"))) < len(plan.units):
        return None  # cheap test first: this runs after every finished unit
    records = []
    for unit, fp in zip(plan.units, plan.fingerprints, strict=True):
        record = unit_is_done(root, spec.name, unit.index, fp, dtype)
        if record is None:
            return None
        records.append(record)
    bad = merged_bad_records(records)
    n_docs = sum(sum(r["documents"].values()) for r in records)
    n_tokens = sum(sum(r["tokens"].values()) for r in records)
    print(f"[prepare] {spec.name}: {n_docs:,} documents, {n_tokens:,} tokens. {bad.report()}", flush=True)
    check_bad_records(spec.name, bad, opts.max_bad_fraction, opts.allow_truncated_files)
    if not n_docs:
        raise DataError(
            f"source '{spec.name}' has no documents; check its files (data.sources[].paths, format, text_field), "
            f"or remove the source from data.sources.\n{bad.report()}")
    shards = [ShardInfo(**s) for r in records for s in r["shards"]]
    _remove_strays(root, spec.name, {s.file for s in shards}, len(plan.units))
    meta = {
        "language": spec.language,
        "source_fingerprint": plan.source_fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_path": str(tokenizer.path),  # for error messages only: the fingerprint decides
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "valid_fraction": spec.valid_fraction_or(opts.valid_fraction),
        "bad_records": bad.to_json(),
        "units": [{k: r[k] for k in ("index", "fingerprint", "documents", "tokens")} for r in records],
    }
    if plan.drops is not None:  # what `norallm dedup` took out, with its tokens (the counts above are what is left)
        meta["removed"] = merge_removed([r["removed"] for r in records])
    return write_manifest(root, spec.name, meta, shards)


def _remove_strays(root: Path, source: str, keep: set[str], n_units: int) -> None:
    """Shard files and unit records the finished source does not use (an older cut, a shrunk
    source, a killed run's temporaries); called only once every unit is finished, so no process
    is writing them."""
    for f in (root / source).iterdir():
        if f.name.startswith(("train-", "valid-")) and f"{source}/{f.name.split('.')[0]}" not in keep:
            f.unlink(missing_ok=True)
    if units_dir(root, source).is_dir():
        for f in units_dir(root, source).glob("*.json"):
            if f.stem.isdigit() and int(f.stem) >= n_units:
                f.unlink(missing_ok=True)
        for f in units_dir(root, source).glob("*.tmp"):  # a unit record's write cut by a kill
            f.unlink(missing_ok=True)


def prepare(sources: list[SourceConfig], tokenizer: Tokenizer, root: str | Path, opts: PrepareOptions) -> list[dict]:
    """Prepare this task's share of every source; returns the manifests of the sources that are
    complete afterwards (all of them when ``num_tasks`` is 1). Raises DataError naming the first
    source that fails."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not sources:
        raise DataError("data.sources is empty: name at least one source to prepare.")
    if not 0 <= opts.task_index < opts.num_tasks:
        raise DataError(f"--task-index {opts.task_index} is outside [0, --num-tasks {opts.num_tasks}).")
    manifests: dict[str, dict] = {}
    plans = []
    for spec in sources:
        try:
            plans.append(SourcePlan.build(spec, tokenizer, opts))
        except DataError as e:  # raw inputs purged after preparing (scratch clean-up) are not an error
            kept_manifest = read_manifest(root, spec.name)
            if kept_manifest is None or kept_manifest.get("tokenizer_fingerprint") != tokenizer.fingerprint:
                raise
            print(f"[prepare] {spec.name}: its inputs cannot be read ({str(e).splitlines()[0]}); keeping its "
                  "prepared shards as they are", flush=True)
            manifests[spec.name] = kept_manifest
    jobs: list[UnitJob] = []
    kept = position = 0
    dtype = token_dtype(tokenizer.vocab_size)
    for plan in plans:
        name = plan.spec.name
        current = plan.manifest_is_current(root, tokenizer)
        if current is not None:
            print(f"[prepare] {name}: up to date ({current['tokens']['train']:,} train tokens), kept")
            manifests[name] = current
            position += len(plan.units)
            continue
        if read_manifest(root, name) is not None:
            (root / name / MANIFEST).unlink(missing_ok=True)  # stale: readers must not trust it
        for unit, fp in zip(plan.units, plan.fingerprints, strict=True):
            mine = position % opts.num_tasks == opts.task_index
            position += 1
            if not mine:
                continue
            if unit_is_done(root, name, unit.index, fp, dtype) is not None:
                kept += 1
            else:
                drops = plan.drops[unit.index] if plan.drops is not None else None
                jobs.append(UnitJob(plan.spec, unit, fp, str(root), opts, drops))
    if opts.num_tasks > 1 or kept:
        todo_bytes = sum(j.unit.nbytes for j in jobs)
        print(f"[prepare] task {opts.task_index} of {opts.num_tasks}: {len(jobs)} unit(s) to tokenize "
              f"({todo_bytes / 1e9:.2f} GB), {kept} already done and kept", flush=True)

    by_source = {p.spec.name: p for p in plans}
    failed: dict[str, DataError] = {}  # a failing source must not keep the others from finishing

    def finish(plan: SourcePlan) -> None:
        name = plan.spec.name
        if name in manifests or name in failed:
            return
        try:
            m = finalize_source(plan, tokenizer, root, opts)
        except DataError as e:
            failed[name] = e
            return
        if m is not None:
            manifests[name] = m

    run_jobs(process_unit, jobs, tokenizer, opts, lambda record: finish(by_source[record["source"]]))
    for plan in plans:  # units finished by other tasks (or an earlier run) may complete a source
        finish(plan)
    if failed:
        raise DataError("\n".join(str(e) for e in failed.values()))
    for plan in plans:
        if plan.spec.name not in manifests:
            done = sum(unit_is_done(root, plan.spec.name, u.index, fp, dtype) is not None
                       for u, fp in zip(plan.units, plan.fingerprints, strict=True))
            print(f"[prepare] {plan.spec.name}: {done} of {len(plan.units)} units done; the task that "
                  "finishes the last one writes its manifest", flush=True)
    return [manifests[spec.name] for spec in sources if spec.name in manifests]
