"""Checkpoint hashing, serial against training.checkpoint.manifest's parallel hash, on a checkpoint-shaped
directory: per rank, one optimizer-state file of ~12 bytes a parameter, the bf16 weights, and a
tokenizer's small files.

    python bench/manifest_hash.py --gib 4            # a 4 GiB checkpoint in a temp dir
    python bench/manifest_hash.py --dir CKPT         # an existing checkpoint dir (read only)

Prints both timings, their ratio and whether the two manifests are identical (exit 1 if not).
The files are written just before, so they are read from the page cache unless they are larger
than memory or --dir names cold files: cold, on Lustre or a local disk, reading and hashing
overlap and the gain is larger.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.checkpoint import manifest  # noqa: E402


def serial(ckpt: Path) -> dict[str, list]:
    """The reference: one file after another, read then hashed, in this thread."""
    out = {}
    for p in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != manifest.MANIFEST):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(16 * 2**20):
                h.update(chunk)
        out[str(p.relative_to(ckpt))] = [p.stat().st_size, h.hexdigest()]
    return out


def make_checkpoint(root: Path, gib: float, ranks: int) -> None:
    """Per rank 12/14 of the bytes as its optimizer states, rank 0 also the bf16 weights, and a
    few small files (rng, meta, tokenizer) as a norallm checkpoint holds."""
    total = int(gib * 2**30)
    block = os.urandom(2**24)

    def fill(path: Path, size: int) -> None:
        with open(path, "wb") as f:
            while size > 0:
                f.write(block[: min(size, len(block))])
                size -= len(block)

    for r in range(ranks):
        fill(root / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", total * 12 // 14 // ranks)
        fill(root / f"rng_rank{r:05d}.pt", 14_000)
    fill(root / "mp_rank_00_model_states.pt", total * 2 // 14)
    (root / "tokenizer").mkdir()
    for name, size in (("tokenizer.json", 2_000_000), ("tokenizer_config.json", 2_000), ("meta.json", 100)):
        fill(root / "tokenizer" / name, size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=2.0, help="size of the generated checkpoint")
    ap.add_argument("--ranks", type=int, default=4, help="optimizer-state files (one per rank) in it")
    ap.add_argument("--dir", type=Path, help="hash this checkpoint dir instead of generating one")
    args = ap.parse_args()
    tmp = None
    ckpt = args.dir
    if ckpt is None:
        tmp = Path(tempfile.mkdtemp(prefix="manifest_hash_"))
        ckpt = tmp / "ckpt"
        ckpt.mkdir()
        make_checkpoint(ckpt, args.gib, args.ranks)
    try:
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        want = serial(ckpt)
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = manifest.hash_share(ckpt, 0, 1)
        t_parallel = time.perf_counter() - t0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    same = got == want
    print(f"{len(want)} files, {size / 2**30:.2f} GiB, {manifest._threads(len(want))} threads: serial "
          f"{t_serial:.2f} s ({size / 2**30 / t_serial:.2f} GiB/s), parallel {t_parallel:.2f} s "
          f"({size / 2**30 / t_parallel:.2f} GiB/s): ×{t_serial / t_parallel:.2f}; manifests identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
