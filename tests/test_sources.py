"""Document sources and `prepare`: bad records are counted with file:line, compressed files read
like plain ones, hold-out is a stable hash, and prepare is strict about bad fractions and restartable."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.shards import open_split, read_manifest
from data_pipeline.sources import BadRecords, is_validation, resolve_files
from data_pipeline.tokenizer import Tokenizer, train_bpe
from data_pipeline.units import iter_documents

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "norwegian"

GOOD = [
    "Det var en gang en gutt som het Per.",
    "Han bodde på en gård langt oppe i dalen.",
    "Om vinteren gikk han på ski til skolen.",
    "Bestemor laget blåbærsyltetøy hver høst.",
    "Æ, ø og å er norske bokstaver.",
    "Øystein og Åse gikk tur langs fjorden.",
    "Eg høyrer at det snør i Ålesund.",
    "Ærlig talt, Tromsø er kaldt om vinteren.",
]


def jline(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def good_jsonl(texts: list[str]) -> bytes:
    return b"".join(jline({"id": i, "text": t}) for i, t in enumerate(texts))


def opts(**kw) -> PrepareOptions:
    base = dict(valid_fraction=0.0, max_bad_fraction=0.0, shard_tokens=64, batch_documents=3, progress=False)
    base.update(kw)
    return PrepareOptions(**base)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_bpe(GOOD * 10, tmp_path_factory.mktemp("tok"), vocab_size=320, min_frequency=1)


def read_docs(spec: SourceConfig) -> tuple[list, BadRecords]:
    bad = BadRecords()
    return list(iter_documents(spec, bad)), bad


def decoded_documents(root: Path, name: str, split: str, tok: Tokenizer) -> list[str]:
    """Every document of a split, decoded from the shards via the .idx offsets (EOS stripped)."""
    stream = open_split(root, [name], split, tok.fingerprint)
    texts, base = [], 0
    for shard in (s for s in read_manifest(root, name)["shards"] if s["split"] == split and s["tokens"]):
        offsets = np.fromfile(root / f"{shard['file']}.idx", dtype=np.uint64)
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            ids = stream.tokens(base + int(lo), base + int(hi))
            assert ids[-1] == tok.eos_id, "each document ends with EOS"
            assert tok.eos_id not in ids[:-1]
            texts.append(tok.decode(ids[:-1].tolist()))
        base += int(offsets[-1])
    assert base == stream.total_tokens
    return texts


# ------------------------------------------------------------------------------------- bad records


def test_every_bad_record_class_is_counted_with_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        jline({"text": "første gode"}),  # 1 good
        b'{"text": "ikke lukket"\n',  # 2 malformed JSON
        b'{"text": "bl\xe5b\xe6r"}\n',  # 3 latin-1 bytes: invalid UTF-8
        jline({"body": "feil felt"}),  # 4 missing text field
        jline({"text": 42}),  # 5 non-string text
        jline({"text": "   \t "}),  # 6 empty/whitespace text
        b"\n",  # 7 blank line
        b"   \r\n",  # 8 whitespace-only line
        jline(["ikke", "et", "objekt"]),  # 9 not an object
        jline({"text": None}),  # 10 non-string text again
        jline({"text": "siste gode"}),  # 11 good, no trailing newline below
    ]
    path.write_bytes(b"".join(lines).rstrip(b"\n"))
    docs, bad = read_docs(SourceConfig(name="mix", paths=[str(path)]))

    assert [(d.text, d.line, d.source, d.path) for d in docs] == [
        ("første gode", 1, "mix", str(path)),
        ("siste gode", 11, "mix", str(path)),
    ]
    assert bad.records_seen == 11
    assert dict(bad.counts) == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "missing_text_field": 1,
        "non_string_text": 2,
        "empty_text": 1,
        "blank_line": 2,
        "not_an_object": 1,
    }
    assert bad.total == 9 and bad.fraction == pytest.approx(9 / 11)
    ex = bad.examples
    assert ex["malformed_json"] == [f"{path}:2: Expecting ',' delimiter"]
    assert ex["invalid_utf8"] == [f"{path}:3: byte 12"]
    assert ex["missing_text_field"] == [f"{path}:4: no 'text' key"]
    assert ex["non_string_text"] == [f"{path}:5: 'text' is int", f"{path}:10: 'text' is NoneType"]
    assert ex["empty_text"] == [f"{path}:6"]
    assert ex["blank_line"] == [f"{path}:7", f"{path}:8"]
    assert ex["not_an_object"] == [f"{path}:9: list"]

    report = bad.report()
    assert report.startswith("9 of 11 records skipped (81.82%):")
    assert f"e.g. {path}:3: byte 12" in report
    assert bad.to_json()["skipped"]["blank_line"] == 2


def test_custom_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(jline({"content": "hei"}) + jline({"text": "hallo"}))
    docs, bad = read_docs(SourceConfig(name="c", paths=[str(path)], text_field="content"))
    assert [d.text for d in docs] == ["hei"]
    assert bad.examples["missing_text_field"] == [f"{path}:2: no 'content' key"]


def test_examples_are_capped_but_counts_are_not(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n" * 10 + jline({"text": "x"}))
    docs, bad = read_docs(SourceConfig(name="b", paths=[str(path)]))
    assert len(docs) == 1
    assert bad.counts["blank_line"] == 10
    assert bad.examples["blank_line"] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_bad_records_merge():
    a, b = BadRecords(), BadRecords()
    a.records_seen, b.records_seen = 5, 7
    a.add("blank_line", "a:1")
    for i in range(4):
        b.add("blank_line", f"b:{i}")
    b.add("empty_text", "b:9")
    a.merge(b)
    assert a.records_seen == 12 and a.total == 6
    assert a.counts == {"blank_line": 5, "empty_text": 1}
    assert a.examples["blank_line"] == ["a:1", "b:0", "b:1"]
    assert BadRecords().report() == "0 records read, none skipped."


# ------------------------------------------------------------------------------- compressed files


def many_records(n: int = 400) -> bytes:
    # varied text so that the compressed stream is long enough to cut in the middle
    return good_jsonl([f"{GOOD[i % len(GOOD)]} Dokument {i}, sjekksum {i * 7919 % 10007}." for i in range(n)])


def test_gz_and_zst_read_like_plain(tmp_path):
    import zstandard

    data = many_records() + b"\n" + b'{"oops"\n' + jline({"text": "til slutt"})
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    (tmp_path / "b.jsonl.zstd").write_bytes(zstandard.ZstdCompressor().compress(data))

    results = {}
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "b.jsonl.zstd"):
        docs, bad = read_docs(SourceConfig(name="s", paths=[str(tmp_path / name)]))
        results[name] = ([(d.text, d.line) for d in docs], dict(bad.counts), bad.records_seen)
    plain = results["a.jsonl"]
    assert len(plain[0]) == 401 and plain[1] == {"blank_line": 1, "malformed_json": 1} and plain[2] == 403
    for name, got in results.items():
        assert got == plain, name


def test_multi_frame_zst_and_multi_member_gz_are_read_whole(tmp_path):
    import zstandard

    parts = [good_jsonl(GOOD[:4]), good_jsonl(GOOD[4:])]
    c = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(b"".join(c.compress(p) for p in parts))
    (tmp_path / "m.jsonl.gz").write_bytes(b"".join(gzip.compress(p) for p in parts))
    for name in ("m.jsonl.zst", "m.jsonl.gz"):
        docs, bad = read_docs(SourceConfig(name="m", paths=[str(tmp_path / name)]))
        assert [d.text for d in docs] == GOOD, name
        assert bad.total == 0


def test_truncated_gz_is_counted_not_silent(tmp_path):
    data = many_records()
    full = gzip.compress(data)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    docs, bad = read_docs(SourceConfig(name="cut", paths=[str(path)]))

    expected = [json.loads(line)["text"] for line in data.splitlines()]
    assert 0 < len(docs) < len(expected)
    # what was read is an exact prefix; nothing after the cut is invented
    assert [d.text for d in docs] == expected[: len(docs)]
    assert [d.line for d in docs] == list(range(1, len(docs) + 1))
    assert bad.counts["truncated_file"] == 1
    (example,) = bad.examples["truncated_file"]
    assert example.startswith(f"{path}:{len(docs) + 1}: EOFError")
    assert "the rest of the file is lost" in example
    assert "truncated_file: 1" in bad.report()


def test_gz_cut_inside_the_trailer_is_still_truncated(tmp_path):
    full = gzip.compress(good_jsonl(GOOD))
    path = tmp_path / "trailer.jsonl.gz"
    path.write_bytes(full[:-3])  # the CRC/size trailer is incomplete
    docs, bad = read_docs(SourceConfig(name="t", paths=[str(path)]))
    assert [d.text for d in docs] == GOOD, "all data arrived; only the end marker is missing"
    assert bad.counts["truncated_file"] == 1
    assert bad.examples["truncated_file"][0].startswith(f"{path}:{len(GOOD) + 1}: ")


def test_truncated_zst_is_counted_not_silent(tmp_path):
    import zstandard

    full = zstandard.ZstdCompressor().compress(many_records())
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(full[: len(full) // 2])
    docs, bad = read_docs(SourceConfig(name="cut", paths=[str(path)]))
    expected = [json.loads(line)["text"] for line in many_records().splitlines()]
    assert [d.text for d in docs] == expected[: len(docs)]
    assert bad.counts["truncated_file"] == 1
    assert bad.examples["truncated_file"][0].startswith(f"{path}:{len(docs) + 1}: ")


# ----------------------------------------------------------------------------------- resolving paths


def test_glob_matching_nothing_names_the_source(tmp_path):
    spec = SourceConfig(name="nynorsk-web", paths=[str(tmp_path / "nowhere" / "*.jsonl")])
    with pytest.raises(DataError) as e:
        resolve_files(spec)
    msg = str(e.value)
    assert "source 'nynorsk-web'" in msg and "matches no file" in msg and "*.jsonl" in msg
    with pytest.raises(DataError, match="nynorsk-web"):
        list(iter_documents(spec))


def test_glob_is_sorted_recursive_and_expands_vars(tmp_path, monkeypatch):
    for rel in ("b/2.jsonl", "a/1.jsonl", "a/deep/3.jsonl"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jline({"text": rel}))
    monkeypatch.setenv("NORALLM_TEST_ROOT", str(tmp_path))
    spec = SourceConfig(name="s", paths=["$NORALLM_TEST_ROOT/**/*.jsonl"])
    files = resolve_files(spec)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/1.jsonl", "a/deep/3.jsonl", "b/2.jsonl"]
    assert [d.text for d in iter_documents(spec)] == ["a/1.jsonl", "a/deep/3.jsonl", "b/2.jsonl"]
    with pytest.raises(DataError, match="expanded to"):
        resolve_files(SourceConfig(name="s", paths=["$NORALLM_TEST_ROOT/none/*.jsonl"]))
    with pytest.raises(DataError, match="only directories"):
        resolve_files(SourceConfig(name="s", paths=[str(tmp_path / "a")]))


def test_files_format_and_unknown_format(tmp_path):
    (tmp_path / "1.txt").write_text("Hele filen er ett dokument.\nTo linjer.", encoding="utf-8")
    (tmp_path / "2.txt").write_bytes(b"\xff\xfe ikke utf-8")
    (tmp_path / "3.txt").write_text("  \n ", encoding="utf-8")
    docs, bad = read_docs(SourceConfig(name="f", paths=[str(tmp_path / "*.txt")], format="files"))
    assert [(d.text, d.line) for d in docs] == [("Hele filen er ett dokument.\nTo linjer.", 0)]
    assert bad.records_seen == 3 and dict(bad.counts) == {"invalid_utf8": 1, "empty_text": 1}
    assert bad.examples["invalid_utf8"] == [f"{tmp_path / '2.txt'}: byte 0"]
    with pytest.raises(DataError, match="unknown format 'csv'"):
        # the config refuses such a format; the pipeline checks it too
        list(iter_documents(SourceConfig.model_construct(name="f", paths=[str(tmp_path / "*.txt")], format="csv")))


# --------------------------------------------------------------------------------------- hold-out


def test_is_validation_is_deterministic_and_close_to_the_fraction():
    texts = [f"dokument nummer {i}: {GOOD[i % len(GOOD)]}" for i in range(20_000)]
    for frac in (0.01, 0.1, 0.3):
        first = [is_validation(t, frac) for t in texts]
        assert first == [is_validation(t, frac) for t in texts]
        assert sum(first) / len(texts) == pytest.approx(frac, abs=0.01 + frac * 0.1)
    # thresholds nest: a validation document stays one when the fraction grows
    small = {t for t in texts if is_validation(t, 0.05)}
    large = {t for t in texts if is_validation(t, 0.2)}
    assert small < large
    assert not any(is_validation(t, 0.0) for t in texts[:1000])
    assert all(is_validation(t, 1.0) for t in texts[:1000])
    # the decision depends on the text only, not on where the document sits
    assert is_validation("Æøå", 0.5) == is_validation("Æøå", 0.5)


# ---------------------------------------------------------------------------------------- prepare


def write_source(tmp_path: Path, name: str, n_bad: int, texts: list[str] = GOOD) -> SourceConfig:
    d = tmp_path / "raw" / name
    d.mkdir(parents=True)
    bad_lines = [b'{"text": broken\n', b"\n", jline({"tekst": "feil"})]
    (d / "part-0.jsonl").write_bytes(good_jsonl(texts[:4]) + b"".join(bad_lines[i % 3] for i in range(n_bad)))
    (d / "part-1.jsonl.gz").write_bytes(gzip.compress(good_jsonl(texts[4:])))
    return SourceConfig(name=name, paths=[str(d / "part-*")], language="nob")


def test_prepare_fails_above_max_bad_fraction(tmp_path, tok, capsys):
    spec = write_source(tmp_path, "skitten", n_bad=2)  # 2 of 10 records bad
    root = tmp_path / "shards"
    with pytest.raises(DataError) as e:
        prepare([spec], tok, root, opts(max_bad_fraction=0.1))
    msg = str(e.value)
    assert "source 'skitten'" in msg and "20.00%" in msg and "max_bad_fraction=0.1" in msg
    assert "malformed_json: 1" in msg and "blank_line: 1" in msg
    assert "part-0.jsonl:5" in msg, "the report shows file:line examples"
    # no manifest: the failed source is not taken as prepared on the next run
    assert read_manifest(root, "skitten") is None


def test_prepare_succeeds_below_max_bad_fraction_and_reports(tmp_path, tok, capsys):
    spec = write_source(tmp_path, "skitten", n_bad=3)  # 3 of 11 records bad
    root = tmp_path / "shards"
    (manifest,) = prepare([spec], tok, root, opts(max_bad_fraction=0.3, valid_fraction=0.3))
    out = capsys.readouterr().out
    assert "[prepare] skitten: 8 documents" in out and "3 of 11 records skipped (27.27%)" in out

    assert manifest["bad_records"]["records_seen"] == 11
    assert manifest["bad_records"]["skipped"] == {
        "malformed_json": 1,
        "blank_line": 1,
        "missing_text_field": 1,
    }
    assert manifest["bad_records"]["examples"]["missing_text_field"] == [
        f"{tmp_path / 'raw' / 'skitten' / 'part-0.jsonl'}:7: no 'text' key"
    ]
    assert manifest["language"] == "nob" and manifest["dtype"] == "uint16"
    assert manifest["tokenizer_fingerprint"] == tok.fingerprint
    assert manifest["vocab_size"] == tok.vocab_size

    # the hold-out follows is_validation, and the shards decode back to the exact texts, in order
    want_valid = [t for t in GOOD if is_validation(t, 0.3)]
    want_train = [t for t in GOOD if not is_validation(t, 0.3)]
    assert want_valid and want_train, "the fixture should exercise both splits"
    assert decoded_documents(root, "skitten", "train", tok) == want_train
    assert decoded_documents(root, "skitten", "valid", tok) == want_valid
    assert manifest["documents"] == {"train": len(want_train), "valid": len(want_valid)}
    total = sum(len(tok.encode(t)) + 1 for t in GOOD)
    assert manifest["tokens"]["train"] + manifest["tokens"]["valid"] == total


def test_prepare_twice_keeps_the_shards(tmp_path, tok, capsys):
    spec = write_source(tmp_path, "ren", n_bad=0)
    root = tmp_path / "shards"
    (first,) = prepare([spec], tok, root, opts())
    out1 = capsys.readouterr().out
    assert "up to date" not in out1
    assert "8 records read, none skipped." in out1
    files = sorted((root / "ren").iterdir())
    assert len([f for f in files if f.suffix == ".bin"]) > 1, "shard_tokens=64 gives several shards"
    stamps = {f.name: f.stat().st_mtime_ns for f in files}

    (second,) = prepare([spec], tok, root, opts())
    out2 = capsys.readouterr().out
    assert f"[prepare] ren: up to date ({first['tokens']['train']:,} train tokens), kept" in out2
    assert second == first
    assert {f.name: f.stat().st_mtime_ns for f in sorted((root / "ren").iterdir())} == stamps

    # a different hold-out fraction changes the shards, so they are rewritten
    (third,) = prepare([spec], tok, root, opts(valid_fraction=0.4))
    out3 = capsys.readouterr().out
    assert "up to date" not in out3
    assert third["source_fingerprint"] != first["source_fingerprint"]
    assert third["documents"]["valid"] == sum(is_validation(t, 0.4) for t in GOOD)


def test_prepare_rewrites_for_another_tokenizer(tmp_path, tok, capsys):
    spec = write_source(tmp_path, "ren", n_bad=0)
    root = tmp_path / "shards"
    prepare([spec], tok, root, opts())
    other = train_bpe(GOOD, tmp_path / "tok2", vocab_size=270, min_frequency=1)
    capsys.readouterr()
    (m,) = prepare([spec], other, root, opts())
    assert "up to date" not in capsys.readouterr().out
    assert m["tokenizer_fingerprint"] == other.fingerprint
    assert decoded_documents(root, "ren", "train", other) == GOOD
    with pytest.raises(DataError, match="tokenized with tokenizer"):
        open_split(root, ["ren"], "train", tok.fingerprint)


def test_prepare_names_the_failing_source(tmp_path, tok, capsys):
    ok = write_source(tmp_path, "ok", n_bad=0)
    missing = SourceConfig(name="mangler", paths=[str(tmp_path / "nope" / "*.jsonl")])
    with pytest.raises(DataError, match="source 'mangler'"):
        prepare([ok, missing], tok, tmp_path / "shards", opts())
    with pytest.raises(DataError, match="data.sources is empty"):
        prepare([], tok, tmp_path / "shards", opts())


def test_prepare_real_norwegian_round_trip(tmp_path, tok, capsys):
    if not (SHARED / "dev.jsonl").is_file():
        pytest.skip(f"shared Norwegian corpus not found at {SHARED} (read from there, never copied)")
    spec = SourceConfig(name="dev", paths=[str(SHARED / "dev.jsonl")], language="nob+nno")
    (m,) = prepare([spec], tok, tmp_path / "shards", opts(valid_fraction=0.05, shard_tokens=50_000))
    texts = [
        json.loads(line)["text"] for line in (SHARED / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert m["bad_records"]["records_seen"] == len(texts) and not m["bad_records"]["skipped"]
    train = decoded_documents(tmp_path / "shards", "dev", "train", tok)
    valid = decoded_documents(tmp_path / "shards", "dev", "valid", tok)
    assert train == [t for t in texts if not is_validation(t, 0.05)]
    assert valid == [t for t in texts if is_validation(t, 0.05)]
    assert len(m["shards"]) > 2
    stream = open_split(tmp_path / "shards", ["dev"], "train", tok.fingerprint)
    assert stream.tokens(0, stream.total_tokens).max() < tok.vocab_size
    assert np.count_nonzero(stream.tokens(0, stream.total_tokens) == tok.eos_id) == len(train)


# ------------------------------------------------------------------------------ byte ranges, limits


def test_byte_ranges_take_the_lines_that_begin_in_them(tmp_path):
    from data_pipeline.sources import iter_jsonl_file

    texts = [f"linje {i} " + "x" * (i % 7) for i in range(60)]
    path = tmp_path / "r.jsonl"
    path.write_bytes(good_jsonl(texts) + b'{"text": broken\n')
    size = path.stat().st_size
    for step in (1, 13, 97, size):
        got, bad = [], BadRecords()
        for a in range(0, size, step):
            got += [d.text for d in iter_jsonl_file(SourceConfig(name="r", paths=[str(path)]), path, bad, a, min(a + step, size))]
        assert got == texts, step
        assert bad.records_seen == 61 and dict(bad.counts) == {"malformed_json": 1}
    # a range not at the start reports its bad lines by byte offset
    bad = BadRecords()
    last_line = size - len(b'{"text": broken\n')
    list(iter_jsonl_file(SourceConfig(name="r", paths=[str(path)]), path, bad, last_line - 3, size))
    assert bad.examples["malformed_json"] == [f"{path}@byte{last_line}: Expecting value"]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_over_long_lines_are_skipped_without_reading_them_whole(tmp_path, suffix):
    from data_pipeline.sources import iter_jsonl_file

    data = good_jsonl(GOOD[:2]) + jline({"text": "å" * 5000}) + good_jsonl(GOOD[2:4])
    path = tmp_path / f"l.jsonl{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    bad = BadRecords()
    docs = list(iter_jsonl_file(SourceConfig(name="l", paths=[str(path)]), path, bad, max_line_bytes=1000))
    assert [d.text for d in docs] == GOOD[:4] and [d.line for d in docs] == [1, 2, 4, 5]
    assert bad.examples["document_too_long"] == [f"{path}:3: line longer than 1,000 bytes"]


def test_whole_file_documents_have_a_size_limit_too(tmp_path):
    from data_pipeline.sources import iter_text_file

    (tmp_path / "big.py").write_text("x = 1\n" * 1000, encoding="utf-8")
    bad = BadRecords()
    assert list(iter_text_file(SourceConfig(name="c", paths=[str(tmp_path / "big.py")], format="files"), tmp_path / "big.py", bad, 100)) == []
    assert bad.counts == {"document_too_long": 1} and "6,000 bytes, more than 100" in bad.examples[
        "document_too_long"][0]


def test_bad_records_round_trip_through_json():
    bad = BadRecords()
    bad.records_seen = 9
    bad.add("blank_line", "f:1")
    bad.add("empty_text", "f:2", "x")
    again = BadRecords.from_json(json.loads(json.dumps(bad.to_json())))
    assert again.to_json() == bad.to_json() and again.report() == bad.report()
