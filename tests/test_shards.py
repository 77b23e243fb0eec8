"""ShardWriter / manifest / TokenStream, checked exactly on ``range(n)`` fixtures.

Every document is a run of consecutive integers, so the logical concatenation of all shards is
``np.arange(n)`` and any slice of it has a known, exact value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.shards import (
    FORMAT,
    MANIFEST,
    ShardWriter,
    TokenStream,
    open_split,
    read_manifest,
    token_dtype,
    write_manifest,
)

DOC_LENGTHS = [5, 17, 1, 300, 3, 64, 2, 40, 1, 1, 90]
N = sum(DOC_LENGTHS)  # 524
MAX_TOKENS = 32
FP = "tok-fingerprint-0"


def write_range_source(
    root: Path,
    lengths: list[int],
    source: str = "src",
    max_tokens: int = MAX_TOKENS,
    vocab_size: int = 1000,
    fingerprint: str = FP,
    offset: int = 0,
):
    """Write documents ``offset + [0, l0), [l0, l0 + l1), ...`` as the train split of ``source``."""
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(root, source, "train", dtype, max_tokens)
    writer.add_batch(np.arange(offset, offset + sum(lengths), dtype=dtype), np.array(lengths, dtype=np.int64))
    shards = writer.close()
    meta = {"tokenizer_fingerprint": fingerprint, "vocab_size": vocab_size, "dtype": dtype.name}
    manifest = write_manifest(root, source, meta, shards)
    return shards, manifest


def expected_shard_layout(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Documents per shard: a shard closes once it holds >= max_tokens tokens."""
    layout: list[list[int]] = [[]]
    for n in lengths:
        layout[-1].append(n)
        if sum(layout[-1]) >= max_tokens:
            layout.append([])
    return [s for s in layout if s]


@pytest.fixture()
def range_source(tmp_path):
    shards, manifest = write_range_source(tmp_path, DOC_LENGTHS)
    return tmp_path, shards, manifest


def test_writer_splits_into_several_shards_with_manifest_totals(range_source):
    root, shards, manifest = range_source
    layout = expected_shard_layout(DOC_LENGTHS, MAX_TOKENS)
    assert len(layout) >= 4, "fixture must produce several shard files"
    assert [s.documents for s in shards] == [len(docs) for docs in layout]
    assert [s.tokens for s in shards] == [sum(docs) for docs in layout]
    assert [s.file for s in shards] == [f"src/train-{i:05d}" for i in range(len(layout))]
    for s in shards:
        assert (root / f"{s.file}.bin").is_file() and (root / f"{s.file}.idx").is_file()
    # nothing half-written is left behind
    assert not list(root.rglob("*.tmp"))

    assert manifest["format"] == FORMAT
    assert manifest["source"] == "src"
    assert manifest["documents"] == {"train": len(DOC_LENGTHS), "valid": 0}
    assert manifest["tokens"] == {"train": N, "valid": 0}
    on_disk = json.loads((root / "src" / MANIFEST).read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert read_manifest(root, "src") == manifest
    assert read_manifest(root, "no-such-source") is None


def test_shard_sha256_matches_bin_bytes(range_source):
    import hashlib

    root, shards, _ = range_source
    for s in shards:
        assert hashlib.sha256((root / f"{s.file}.bin").read_bytes()).hexdigest() == s.sha256


def test_token_stream_slices_are_exact(range_source):
    root, shards, _ = range_source
    stream = open_split(root, ["src"], "train", FP)
    ref = np.arange(N)
    assert stream.total_tokens == N

    borders = [0]
    for s in shards:
        borders.append(borders[-1] + s.tokens)
    # every pair of points around every shard border, plus the ends
    points = sorted({max(0, min(N, b + d)) for b in borders for d in (-2, -1, 0, 1, 2)})
    pairs = [(a, b) for a in points for b in points if a <= b]
    rng = np.random.default_rng(0)
    for _ in range(300):
        a, b = sorted(int(x) for x in rng.integers(0, N + 1, size=2))
        pairs.append((a, b))
    pairs += [(0, N), (0, 0), (N, N), (borders[1] - 1, borders[-2] + 1)]  # one span over all inner borders
    for a, b in pairs:
        got = stream.tokens(a, b)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref[a:b], err_msg=f"tokens({a}, {b})")


@pytest.mark.parametrize("a,b", [(-1, 3), (5, 4), (0, N + 1), (N, N + 1)])
def test_token_stream_rejects_out_of_range(range_source, a, b):
    root, _, _ = range_source
    stream = open_split(root, ["src"], "train", FP)
    with pytest.raises(IndexError):
        stream.tokens(a, b)


def test_idx_files_hold_per_shard_document_starts(range_source):
    root, shards, _ = range_source
    layout = expected_shard_layout(DOC_LENGTHS, MAX_TOKENS)
    assert len(shards) == len(layout)
    first_token = 0
    for s, docs in zip(shards, layout, strict=True):
        offsets = np.fromfile(root / f"{s.file}.idx", dtype=np.uint64)
        assert offsets.tolist() == [0, *np.cumsum(docs).tolist()]
        # each document of the shard is exactly its range of consecutive integers
        data = np.fromfile(root / f"{s.file}.bin", dtype=np.uint16)
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            doc = data[int(lo) : int(hi)]
            np.testing.assert_array_equal(doc, np.arange(first_token + int(lo), first_token + int(hi)))
        first_token += int(offsets[-1])
    assert first_token == N


def test_two_sources_concatenate_in_order(tmp_path):
    write_range_source(tmp_path, [10, 20, 30], source="a", max_tokens=25)
    write_range_source(tmp_path, [7, 50, 3], source="b", max_tokens=25, offset=60)
    stream = open_split(tmp_path, ["a", "b"], "train", FP)
    assert stream.total_tokens == 120
    np.testing.assert_array_equal(stream.tokens(0, 120), np.arange(120))
    np.testing.assert_array_equal(stream.tokens(55, 70), np.arange(55, 70))
    # valid split is empty: no shards, no tokens, no crash
    valid = open_split(tmp_path, ["a", "b"], "valid", FP)
    assert valid.total_tokens == 0
    assert valid.tokens(0, 0).shape == (0,)


@pytest.mark.parametrize(
    "vocab_size,dtype",
    [(256, np.uint16), (65_535, np.uint16), (65_536, np.uint16), (65_537, np.uint32), (250_000, np.uint32)],
)
def test_token_dtype_by_vocab_size(vocab_size, dtype):
    assert token_dtype(vocab_size) == np.dtype(dtype)


def test_uint32_shards_hold_large_ids_exactly(tmp_path):
    offset = 70_000  # every id above the uint16 range
    shards, manifest = write_range_source(
        tmp_path, [3, 40, 9], vocab_size=131_072, offset=offset, max_tokens=16
    )
    assert manifest["dtype"] == "uint32"
    assert len(shards) >= 2
    for s in shards:
        assert (tmp_path / f"{s.file}.bin").stat().st_size == 4 * s.tokens
    stream = open_split(tmp_path, ["src"], "train", FP)
    np.testing.assert_array_equal(stream.tokens(0, 52), np.arange(offset, offset + 52))
    np.testing.assert_array_equal(stream.tokens(2, 45), np.arange(offset + 2, offset + 45))


def test_uint16_shards_use_two_bytes_per_token(range_source):
    root, shards, manifest = range_source
    assert manifest["dtype"] == "uint16"
    for s in shards:
        assert (root / f"{s.file}.bin").stat().st_size == 2 * s.tokens


def test_fingerprint_mismatch_raises(range_source):
    root, _, _ = range_source
    with pytest.raises(DataError) as e:
        open_split(root, ["src"], "train", "another-tokenizer")
    msg = str(e.value)
    assert "src" in msg and FP in msg and "another-tokenizer" in msg
    assert "prepare" in msg


def test_missing_source_raises(range_source):
    root, _, _ = range_source
    with pytest.raises(DataError, match=r"no shards for source 'ghost'.*norallm prepare"):
        open_split(root, ["src", "ghost"], "train", FP)


def test_wrong_manifest_format_raises(range_source):
    root, _, manifest = range_source
    manifest["format"] = "something-else/9"
    (root / "src" / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DataError, match="re-run prepare"):
        read_manifest(root, "src")


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_bin_length_disagreeing_with_manifest_raises(range_source, change):
    root, shards, _ = range_source
    victim = root / f"{shards[1].file}.bin"
    data = victim.read_bytes()
    victim.write_bytes(data[:-4] if change == "truncate" else data + b"\x00\x00")
    with pytest.raises(DataError) as e:
        open_split(root, ["src"], "train", FP)
    msg = str(e.value)
    assert shards[1].file in msg and "manifest" in msg and "re-run" in msg


def test_missing_shard_file_raises(range_source):
    root, shards, _ = range_source
    (root / f"{shards[2].file}.idx").unlink()
    with pytest.raises(DataError, match="cannot be read"):
        open_split(root, ["src"], "train", FP)


def test_token_stream_skips_empty_shards(tmp_path):
    shards, _ = write_range_source(tmp_path, [4, 4])
    entries = [{"file": "src/never-written", "tokens": 0}] + [
        {"file": s.file, "tokens": s.tokens} for s in shards
    ]
    stream = TokenStream(tmp_path, entries, np.dtype(np.uint16))
    np.testing.assert_array_equal(stream.tokens(0, 8), np.arange(8))


@pytest.mark.parametrize("max_tokens", [1, 7, 32, 10_000])
def test_add_batch_writes_the_same_files_however_documents_are_batched(tmp_path, max_tokens):
    lengths = DOC_LENGTHS * 3
    flat = np.arange(sum(lengths)).astype(np.uint16)
    one = ShardWriter(tmp_path / "one", "src", "train", np.uint16, max_tokens)
    start = 0
    for n in lengths:  # one document at a time
        one.add_batch(flat[start : start + n], np.array([n]))
        start += n
    batched = ShardWriter(tmp_path / "many", "src", "train", np.uint16, max_tokens, unit=3)
    cut = [0, 4, 5, 19, len(lengths)]  # batches of several sizes, one of a single document
    for a, b in zip(cut[:-1], cut[1:], strict=True):
        lo, hi = sum(lengths[:a]), sum(lengths[:b])
        batched.add_batch(flat[lo:hi], np.array(lengths[a:b]))
    a_shards, b_shards = one.close(), batched.close()
    assert [(s.documents, s.tokens, s.sha256) for s in a_shards] == [(s.documents, s.tokens, s.sha256)
                                                                     for s in b_shards]
    assert [s.file for s in b_shards] == [f"src/train-00003-{k:03d}" for k in range(len(b_shards))]
    for s, t in zip(a_shards, b_shards, strict=True):
        for suffix in (".bin", ".idx"):
            assert (tmp_path / "one" / f"{s.file}{suffix}").read_bytes() == (
                tmp_path / "many" / f"{t.file}{suffix}").read_bytes()
