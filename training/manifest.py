"""Checksums of a checkpoint: ``manifest.json`` lists every file with its size and sha256, written
with the checkpoint and verified before it is loaded, so that a truncated, deleted or bit-flipped
file is found (and named) before DeepSpeed unpickles it.

Hashing is shared between ranks: rank r hashes files r, r + world, … of the sorted listing, so a
7B checkpoint (~100 GB with optimizer states) costs each of 64 ranks ~1.6 GB of reading.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from norallm.files import write_text_atomic

MANIFEST = "manifest.json"
_CHUNK = 16 * 2**20


def digest(path: Path) -> list:
    """[bytes, sha256 hex] of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return [path.stat().st_size, h.hexdigest()]


def _listing(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_share(ckpt: Path, rank: int, world: int) -> dict[str, list]:
    """This rank's share of the checkpoint's files, hashed."""
    return {rel: digest(ckpt / rel) for rel in _listing(ckpt)[rank::world]}


def write(ckpt: Path, shares: list[dict[str, list]]) -> None:
    files = {k: v for share in shares for k, v in share.items()}
    write_text_atomic(ckpt / MANIFEST, json.dumps({"version": 1, "files": dict(sorted(files.items()))}, indent=1))


def read(ckpt: Path) -> dict[str, list] | None:
    """The manifest's files, or None for a checkpoint written before manifests existed. A manifest
    that cannot be read is reported as a problem of the checkpoint (raised as ValueError)."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return files


def verify_share(ckpt: Path, files: dict[str, list], rank: int, world: int) -> list[str]:
    """Problems with this rank's share of the listed files: missing, wrong size, wrong checksum."""
    problems = []
    for rel in sorted(files)[rank::world]:
        path = ckpt / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size, sha = files[rel]
        actual_size = path.stat().st_size
        if actual_size != size:
            problems.append(f"{path} has {actual_size:,} bytes, the manifest says {size:,} (truncated or replaced)")
        elif digest(path)[1] != sha:
            problems.append(f"{path} does not match its sha256 in the manifest (corrupted)")
    return problems


def refresh(ckpt: Path, rel: str) -> None:
    """Re-record one file that was rewritten on purpose (a checkpoint's meta.json marked unhealthy)."""
    files = read(ckpt)
    if files is not None:
        files[rel] = digest(ckpt / rel)
        write(ckpt, [files])
