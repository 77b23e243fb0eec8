"""Checksums of a checkpoint: ``manifest.json`` lists every file with its size and sha256, written
with the checkpoint and verified before it is loaded, so that a truncated, deleted or bit-flipped
file is found (and named) before DeepSpeed unpickles it.

Hashing is shared between ranks: rank r hashes files r, r + world, … of the sorted listing, so a
7B checkpoint (~100 GB with optimizer states) costs each of 64 ranks ~1.6 GB of reading. Within a
rank, files are hashed by a pool of threads, and each file's next chunk is read while the current
one is hashed: file reads and sha256 updates over large buffers both release the GIL, so a rank
uses several cores and keeps a parallel file system (Lustre) busy with several streams instead
of reading one file, then hashing it, a chunk at a time. What is hashed is unchanged: the sha256
of each whole file, so manifests are the same as a serial hash writes (tests/test_checkpoint_safety.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from norallm.files import write_text_atomic

MANIFEST = "manifest.json"
_CHUNK = 8 * 2**20
_MAX_THREADS = 8  # per rank; with up to 2 chunks in flight per file: ~200 MB of buffers at most


def digest(path: Path) -> list:
    """[bytes, sha256 hex] of one file; a reader thread reads ahead while this one hashes."""
    h = hashlib.sha256()
    chunks: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def read() -> None:
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    chunks.put(chunk)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
        finally:
            chunks.put(None)

    reader = threading.Thread(target=read, name=f"digest:{path.name}", daemon=True)
    reader.start()
    while (chunk := chunks.get()) is not None:
        h.update(chunk)
    reader.join()
    if failure:
        raise failure[0]
    return [path.stat().st_size, h.hexdigest()]


def _threads(n_files: int) -> int:
    """Hashing threads for this rank: its cores (a Slurm rank is bound to its share), at most
    _MAX_THREADS, and no more than there are files."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_files, cores, _MAX_THREADS))


def digests(paths: list[Path]) -> list[list]:
    """``digest`` of each path, in order, hashed in parallel."""
    if len(paths) <= 1:
        return [digest(p) for p in paths]
    with ThreadPoolExecutor(_threads(len(paths)), thread_name_prefix="manifest") as pool:
        return list(pool.map(digest, paths))


def _listing(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_share(ckpt: Path, rank: int, world: int) -> dict[str, list]:
    """This rank's share of the checkpoint's files, hashed."""
    mine = _listing(ckpt)[rank::world]
    return dict(zip(mine, digests([ckpt / rel for rel in mine]), strict=True))


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
    problems, to_hash = [], []
    for rel in sorted(files)[rank::world]:
        path = ckpt / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = files[rel][0]
        actual_size = path.stat().st_size
        if actual_size != size:
            problems.append(f"{path} has {actual_size:,} bytes, the manifest says {size:,} (truncated or replaced)")
        else:
            to_hash.append(rel)
    for rel, (_, sha) in zip(to_hash, digests([ckpt / rel for rel in to_hash]), strict=True):
        if sha != files[rel][1]:
            problems.append(f"{ckpt / rel} does not match its sha256 in the manifest (corrupted)")
    return problems


def refresh(ckpt: Path, rel: str) -> None:
    """Re-record one file that was rewritten on purpose (a checkpoint's meta.json marked unhealthy)."""
    files = read(ckpt)
    if files is not None:
        files[rel] = digest(ckpt / rel)
        write(ckpt, [files])
