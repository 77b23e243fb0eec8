"""`norallm prepare CONFIG --verify`: check that the union of all prepare tasks is complete and
intact before training starts on it.

Per source: every work unit of the current cut has a record made with the configured tokenizer
and these inputs; the manifest exists, is current and lists exactly the units' shards; every shard
file has the size, document index and sha256 the manifest records. All problems are reported
together; any problem is a DataError (the CLI exits 2 with the list).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare import PrepareOptions, SourcePlan, read_unit_record
from data_pipeline.shards import read_manifest, token_dtype
from data_pipeline.tokenizer import Tokenizer


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _shard_problems(root: Path, shard: dict, dtype: np.dtype) -> list[str]:
    base = root / shard["file"]
    bin_file, idx_file = Path(f"{base}.bin"), Path(f"{base}.idx")
    if not bin_file.is_file() or not idx_file.is_file():
        return [f"shard {shard['file']}: .bin or .idx file is missing"]
    problems = []
    if bin_file.stat().st_size != shard["tokens"] * dtype.itemsize:
        problems.append(f"shard {shard['file']}: {bin_file.stat().st_size} bytes, the manifest says "
                        f"{shard['tokens']} tokens of {dtype.name}")
    offsets = np.fromfile(idx_file, dtype=np.uint64)
    if len(offsets) != shard["documents"] + 1 or (len(offsets) and (offsets[0] != 0 or offsets[-1] != shard["tokens"])):
        problems.append(f"shard {shard['file']}: its .idx does not index {shard['documents']} documents "
                        f"of {shard['tokens']} tokens")
    return problems


def verify(sources: list[SourceConfig], tokenizer: Tokenizer, root: str | Path, opts: PrepareOptions) -> list[str]:
    """Check the prepared shards; returns one summary line per source, raises DataError listing
    every problem otherwise. Checksums are computed by ``opts.workers`` processes."""
    root = Path(root)
    problems: list[str] = []
    summaries: list[str] = []
    to_hash: list[tuple[str, str]] = []  # (file, expected sha256)
    dtype = token_dtype(tokenizer.vocab_size)
    for spec in sources:
        name = spec.name
        try:
            plan = SourcePlan.build(spec, tokenizer, opts)
        except DataError as e:  # raw inputs purged after preparing: the shards can still be checked
            plan, note = None, f" (inputs not readable, {str(e).splitlines()[0]}: shards checked against the manifest only)"
        else:
            note = ""
        missing = []
        for unit, fp in zip(plan.units if plan else [], plan.fingerprints if plan else [], strict=True):
            record = read_unit_record(root, name, unit.index)
            if record is None:
                missing.append(unit.index)
            elif record["fingerprint"] != fp:
                why = ("another tokenizer" if record.get("tokenizer_fingerprint") != tokenizer.fingerprint
                       else "other inputs or options")
                problems.append(f"{name}: unit {unit.index} was made with {why}; re-run prepare to redo it")
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            problems.append(f"{name}: {len(missing)} of {len(plan.units)} units not finished (units {shown})")
        if plan is None and read_manifest(root, name) is None:
            problems.append(f"{name}: not prepared, and its inputs cannot be read ({note.strip(' ()')})")
            continue
        manifest = read_manifest(root, name)
        if manifest is None:
            problems.append(f"{name}: no manifest.json (written when the last unit finishes)")
            continue
        if manifest.get("tokenizer_fingerprint") != tokenizer.fingerprint:
            made_with = manifest.get("tokenizer_path")
            problems.append(f"{name}: shards were tokenized with tokenizer {manifest.get('tokenizer_fingerprint')}"
                            + (f" at {made_with}" if made_with else "")
                            + f", the config's tokenizer at {tokenizer.path} is {tokenizer.fingerprint}")
            continue
        if plan is not None and manifest.get("source_fingerprint") != plan.source_fingerprint:
            problems.append(f"{name}: manifest.json is stale (the source's files or options changed)")
            continue
        for shard in manifest["shards"]:
            found = _shard_problems(root, shard, dtype)
            problems += [f"{name}: {p}" for p in found]
            if not found:
                to_hash.append((str(root / f"{shard['file']}.bin"), shard["sha256"]))
        summaries.append(f"{name}: {len(manifest.get('units', []))} units, {len(manifest['shards'])} shards, "
                         f"{manifest['tokens']['train']:,} train / {manifest['tokens']['valid']:,} valid tokens{note}")
    files = [f for f, _ in to_hash]
    if opts.workers > 1 and len(files) > 1:
        with ProcessPoolExecutor(opts.workers) as pool:
            digests = list(pool.map(_sha256, files, chunksize=4))
    else:
        digests = [_sha256(f) for f in files]
    for (file, want), got in zip(to_hash, digests, strict=True):
        if got != want:
            unit = Path(file).name.split("-")[1]
            problems.append(f"{file}: sha256 {got[:16]}… differs from the manifest's {want[:16]}… (damaged or "
                            f"overwritten); delete {Path(file).parent / 'units' / unit}.json so that prepare redoes it")
    if problems:
        raise DataError(
            f"prepared data under {root} is incomplete or damaged ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}); re-run `norallm prepare CONFIG` (or the array job) to "
            "redo what is missing:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return summaries
