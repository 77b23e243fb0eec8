"""`norallm prepare` at scale: work units, parallel workers, Slurm array tasks, restarts after a
kill, `--verify`, the columnar formats, and every class of bad input (each counted in the
manifest or refused with a clear error — never a document lost without a count)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.prepare import PrepareOptions, prepare, read_unit_record
from data_pipeline.shards import open_split, read_manifest
from data_pipeline.sources import BadRecords, is_validation
from data_pipeline.tokenizer import Tokenizer, train_bpe
from data_pipeline.units import iter_documents, iter_unit, plan_units
from training.cli import main

REPO = Path(__file__).resolve().parents[1]
WORDS = "fjord fjell skog elv bre dal vidde myr li ås vik øy holme skjær nes sund".split()


def text_of(i: int) -> str:
    """A distinct, varied Norwegian-ish document; its number is in it, so it can be found again."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(5 + i % 23)]
    return f"Dokument {i}: " + " ".join(words) + "."


def jline(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def jsonl(texts) -> bytes:
    return b"".join(jline({"text": t}) for t in texts)


def opts(**kw) -> PrepareOptions:
    base = dict(valid_fraction=0.0, max_bad_fraction=1.0, shard_tokens=256, batch_documents=7, progress=False)
    base.update(kw)
    return PrepareOptions(**base)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_bpe([text_of(i) for i in range(300)], tmp_path_factory.mktemp("tok"), vocab_size=400,
                     min_frequency=1)


def decoded(root: Path, name: str, split: str, tok: Tokenizer) -> list[str]:
    """Every document of a split, decoded from the shards (EOS stripped), in order."""
    stream = open_split(root, [name], split, tok.fingerprint)
    ids = stream.tokens(0, stream.total_tokens)
    ends = np.flatnonzero(ids == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]


def accounted(manifest: dict) -> int:
    """Assert every record read is either a document in the shards or a counted skip."""
    bad = manifest["bad_records"]
    docs = manifest["documents"]["train"] + manifest["documents"]["valid"]
    assert bad["records_seen"] == docs + sum(bad["skipped"].values()), manifest
    return docs


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".tmp")}


# ------------------------------------------------------------------------ bad input, one test each


def prepare_one(tmp_path, tok, name: str, data: bytes, **kw):
    path = tmp_path / name
    path.write_bytes(data)
    (m,) = prepare([SourceConfig(name="s", paths=[str(path)])], tok, tmp_path / "shards", opts(**kw))
    return m, path


def test_bad_input_malformed_json_is_counted(tmp_path, tok):
    data = jsonl([text_of(1)]) + b'{"text": "ikke lukket\n' + b'{"text": 3,}\n' + jsonl([text_of(2)])
    m, path = prepare_one(tmp_path, tok, "a.jsonl", data)
    assert m["bad_records"]["skipped"] == {"malformed_json": 2}
    assert m["bad_records"]["examples"]["malformed_json"][0].startswith(f"{path}:2: ")
    assert accounted(m) == 2
    assert decoded(tmp_path / "shards", "s", "train", tok) == [text_of(1), text_of(2)]


def test_bad_input_invalid_utf8_is_counted(tmp_path, tok):
    data = jsonl([text_of(1)]) + b'{"text": "bl\xe5b\xe6r"}\n' + jsonl([text_of(2)])
    m, path = prepare_one(tmp_path, tok, "a.jsonl", data)
    assert m["bad_records"]["skipped"] == {"invalid_utf8": 1}
    assert m["bad_records"]["examples"]["invalid_utf8"] == [f"{path}:2: byte 12"]
    assert accounted(m) == 2


def test_bad_input_missing_or_non_string_text_field_is_counted(tmp_path, tok):
    data = (jsonl([text_of(1)]) + jline({"tekst": "feil felt"}) + jline({"text": 42}) + jline({"text": None})
            + jline({"text": ["a", "b"]}) + jline(["ikke", "objekt"]))
    m, _ = prepare_one(tmp_path, tok, "a.jsonl", data)
    assert m["bad_records"]["skipped"] == {"missing_text_field": 1, "non_string_text": 3, "not_an_object": 1}
    assert accounted(m) == 1


def test_bad_input_empty_and_whitespace_documents_are_counted(tmp_path, tok):
    data = jsonl(["", "   ", "\t\n ", text_of(5)]) + b"\n" + b"  \r\n"
    m, _ = prepare_one(tmp_path, tok, "a.jsonl", data)
    assert m["bad_records"]["skipped"] == {"empty_text": 3, "blank_line": 2}
    assert accounted(m) == 1


def test_bad_input_huge_document_is_skipped_and_counted_without_reading_it_whole(tmp_path, tok):
    huge = "Et langt dokument. " * (52_000_000 // 19)  # ≥ 50 MB on one JSONL line
    data = jsonl([text_of(1)]) + jline({"text": huge}) + jsonl([text_of(2)])
    assert len(data) > 50_000_000
    m, path = prepare_one(tmp_path, tok, "a.jsonl", data, max_document_bytes=16 * 2**20)
    assert m["bad_records"]["skipped"] == {"document_too_long": 1}
    assert m["bad_records"]["examples"]["document_too_long"] == [f"{path}:2: line longer than 16,777,216 bytes"]
    assert accounted(m) == 2
    # the documents after the huge line are read normally
    assert decoded(tmp_path / "shards", "s", "train", tok) == [text_of(1), text_of(2)]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_bad_input_truncated_compressed_file_fails_by_default(tmp_path, tok, suffix):
    """Half of a 4,000-line file lost used to pass as 0.07 % bad records."""
    import zstandard

    texts = [text_of(i) for i in range(4000)]
    full = gzip.compress(jsonl(texts)) if suffix == ".gz" else zstandard.ZstdCompressor().compress(jsonl(texts))
    with pytest.raises(DataError, match=r"1 compressed file\(s\) end in the middle of their data: .*a\.jsonl"):
        prepare_one(tmp_path, tok, f"a.jsonl{suffix}", full[: len(full) // 2], allow_truncated_files=False)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_bad_input_truncated_compressed_file_is_counted_when_allowed(tmp_path, tok, suffix):
    import zstandard

    texts = [text_of(i) for i in range(4000)]  # > one 128 KiB zstd block, so a prefix survives the cut
    raw = jsonl(texts)
    full = gzip.compress(raw) if suffix == ".gz" else zstandard.ZstdCompressor().compress(raw)
    m, path = prepare_one(tmp_path, tok, f"a.jsonl{suffix}", full[: len(full) // 2], allow_truncated_files=True)
    assert m["bad_records"]["skipped"] == {"truncated_file": 1}
    (example,) = m["bad_records"]["examples"]["truncated_file"]
    assert example.startswith(f"{path}:") and "the rest of the file is lost" in example
    n = accounted(m)
    assert 0 < n < len(texts)
    assert decoded(tmp_path / "shards", "s", "train", tok) == texts[:n], "an exact prefix, nothing invented"


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_bad_input_an_empty_compressed_file_is_a_truncated_file(tmp_path, tok, suffix):
    """A 0-byte .gz/.zst (a download cut before its first byte) read as an empty stream: 'none skipped'."""
    (tmp_path / "good.jsonl").write_bytes(jsonl([text_of(i) for i in range(5)]))
    (tmp_path / f"empty.jsonl{suffix}").write_bytes(b"")
    spec = SourceConfig(name="s", paths=[str(tmp_path / "good.jsonl"), str(tmp_path / f"empty.jsonl{suffix}")])
    with pytest.raises(DataError, match=rf"1 compressed file\(s\) end in the middle .*empty\.jsonl{suffix}:1: "
                                        r"EOFError: the file is empty \(0 bytes\)"):
        prepare([spec], tok, tmp_path / "shards", opts())
    (m,) = prepare([spec], tok, tmp_path / "shards", opts(allow_truncated_files=True))
    assert m["bad_records"]["skipped"] == {"truncated_file": 1} and accounted(m) == 5


@pytest.mark.parametrize("name,data", [("empty.jsonl.gz", b""), ("blank.jsonl", b"\n\n")])
def test_bad_input_a_source_without_documents_is_a_clear_error(tmp_path, tok, name, data):
    """Alone, it used to pass prepare and then fail the plan with 'source shares [0.0] must be non-negative'."""
    with pytest.raises(DataError, match=r"source 's' has no documents; .*remove the source from data.sources"):
        prepare_one(tmp_path, tok, name, data, allow_truncated_files=True)
    assert read_manifest(tmp_path / "shards", "s") is None


def test_bad_input_unreadable_parquet_is_a_clear_error(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "p" / "0.parquet"
    good.parent.mkdir()
    pq.write_table(pa.table({"text": [text_of(1)]}), good)
    (tmp_path / "p" / "1.parquet").write_bytes(b"PAR1 this is not a parquet file")
    spec = SourceConfig(name="web", paths=[str(tmp_path / "p" / "*.parquet")], format="parquet")
    with pytest.raises(DataError) as e:
        prepare([spec], tok, tmp_path / "shards", opts())
    msg = str(e.value)
    assert "source 'web'" in msg and "1.parquet" in msg and "cannot read Parquet file" in msg
    assert "Replace it" in msg
    assert read_manifest(tmp_path / "shards", "web") is None
    # a readable file whose text column is missing or not text is refused just as clearly
    pq.write_table(pa.table({"body": [text_of(1)]}), tmp_path / "p" / "1.parquet")
    with pytest.raises(DataError, match=r"has no column 'text' \(it has body\)"):
        prepare([spec], tok, tmp_path / "shards", opts())
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "p" / "1.parquet")
    with pytest.raises(DataError, match="is int64, not text"):
        prepare([spec], tok, tmp_path / "shards", opts())


def test_bad_input_source_matching_no_files_is_a_clear_error(tmp_path, tok):
    (tmp_path / "ok.jsonl").write_bytes(jsonl([text_of(1)]))
    ok = SourceConfig(name="ok", paths=[str(tmp_path / "ok.jsonl")])
    missing = SourceConfig(name="nynorsk", paths=[str(tmp_path / "nowhere" / "*.jsonl.zst")])
    with pytest.raises(DataError) as e:
        prepare([ok, missing], tok, tmp_path / "shards", opts())
    msg = str(e.value)
    assert "source 'nynorsk'" in msg and "matches no file" in msg and "*.jsonl.zst" in msg
    assert not (tmp_path / "shards" / "ok").exists(), "nothing is tokenized before every source resolves"


def test_bad_input_tokenizer_disagreeing_with_shards(tmp_path, tok, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl([text_of(i) for i in range(30)]))
    spec = SourceConfig(name="s", paths=[str(tmp_path / "a.jsonl")])
    root = tmp_path / "shards"
    prepare([spec], tok, root, opts())
    other = train_bpe([text_of(i) for i in range(50)], tmp_path / "tok2", vocab_size=300, min_frequency=1)
    from data_pipeline.verify import verify

    with pytest.raises(DataError) as e:  # --verify names both tokenizers
        verify([spec], other, root, opts())
    assert f"tokenized with tokenizer {tok.fingerprint} at {tok.path}" in str(e.value)
    assert f"the config's tokenizer at {other.path} is {other.fingerprint}" in str(e.value)
    with pytest.raises(DataError) as e:  # training refuses them, naming where the shards' tokenizer was
        open_split(root, ["s"], "train", other.fingerprint)
    assert f"tokenized with tokenizer {tok.fingerprint} (at {tok.path})" in str(e.value)
    capsys.readouterr()
    (m,) = prepare([spec], other, root, opts())  # prepare redoes them with the new one
    assert "up to date" not in capsys.readouterr().out
    assert m["tokenizer_fingerprint"] == other.fingerprint
    assert decoded(root, "s", "train", other) == [text_of(i) for i in range(30)]


# -------------------------------------------------------------------------------------- work units


def test_large_plain_jsonl_is_cut_into_byte_ranges_that_lose_no_line(tmp_path, tok):
    texts = [text_of(i) for i in range(200)]
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl(texts))
    spec = SourceConfig(name="big", paths=[str(path)])
    units = plan_units(spec, unit_bytes=1000)
    assert len(units) == -(-path.stat().st_size // 1000) > 5
    pieces = [u.pieces[0] for u in units]
    assert pieces[0].start == 0 and pieces[-1].stop == path.stat().st_size
    assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:], strict=False)), "contiguous ranges"
    got = [d.text for u in units for d in iter_unit(spec, u, BadRecords())]
    assert got == texts, "every line exactly once, in order, whatever the cut"
    (m,) = prepare([spec], tok, tmp_path / "shards", opts(unit_bytes=1000))
    assert len(m["units"]) == len(units)
    assert decoded(tmp_path / "shards", "big", "train", tok) == texts


def test_small_files_are_grouped_and_compressed_files_are_not_cut(tmp_path):
    for i in range(5):  # equal sizes: the same documents with another digit
        (tmp_path / f"{i}.jsonl").write_bytes(jsonl([text_of(j) + str(i) for j in range(10)]))
    (tmp_path / "9.jsonl.gz").write_bytes(gzip.compress(jsonl([text_of(j) for j in range(500)])))
    spec = SourceConfig(name="s", paths=[str(tmp_path / "*.jsonl*")])
    size = (tmp_path / "0.jsonl").stat().st_size
    units = plan_units(spec, unit_bytes=2 * size + 10)
    assert [[Path(p.path).name for p in u.pieces] for u in units] == [
        ["0.jsonl", "1.jsonl"], ["2.jsonl", "3.jsonl"], ["4.jsonl"], ["9.jsonl.gz"]]
    assert [d.text for u in units for d in iter_unit(spec, u, BadRecords())] == [
        d.text for d in iter_documents(spec)]


def test_two_task_array_with_workers_is_byte_identical_to_one_prepare(tmp_path, tok, capsys):
    texts = [text_of(i) for i in range(600)]
    (tmp_path / "a.jsonl").write_bytes(jsonl(texts[:400]))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(texts[400:])))
    (tmp_path / "c.jsonl").write_bytes(jsonl(texts[::3]))
    specs = [SourceConfig(name="ab", paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")]),
             SourceConfig(name="c", paths=[str(tmp_path / "c.jsonl")], valid_fraction=0.2)]
    o = dict(unit_bytes=4000, valid_fraction=0.1)
    single = prepare(specs, tok, tmp_path / "one", opts(**o))

    first = prepare(specs, tok, tmp_path / "arr", opts(**o, task_index=0, num_tasks=2, workers=2))
    out = capsys.readouterr().out
    assert "task 0 of 2" in out and "the task that finishes the last one writes its manifest" in out
    assert first == [], "after task 0 alone no source is complete"
    assert not (tmp_path / "arr" / "ab" / "manifest.json").exists()
    second = prepare(specs, tok, tmp_path / "arr", opts(**o, task_index=1, num_tasks=2, workers=2))
    assert second == single, "the last task writes the same manifests"
    assert file_hashes(tmp_path / "arr") == file_hashes(tmp_path / "one")
    assert len(single[0]["units"]) > 4 and single[1]["valid_fraction"] == 0.2


def test_killed_prepare_keeps_finished_units_and_redoes_the_rest(tmp_path, tok):
    texts = [text_of(i) * 40 for i in range(1500)]
    (tmp_path / "big.jsonl").write_bytes(jsonl(texts))
    raw = {"model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(tok.path)},
           "data": {"sources": [{"name": "big", "paths": [str(tmp_path / "big.jsonl")]}],
                    "shards_dir": str(tmp_path / "shards"), "seq_len": 16, "prepare_unit_bytes": 40_000,
                    "shard_tokens": 4096, "valid_fraction": 0.05},
           "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1, "lr": 1e-3}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    units = tmp_path / "shards" / "big" / "units"
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "prepare", str(config), "--no-progress"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not units.is_dir() or len(list(units.glob("*.json"))) < 3):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {f.name: f.stat().st_mtime_ns for f in units.glob("*.json")}
    n_units = len(plan_units(SourceConfig(name="big", paths=[str(tmp_path / "big.jsonl")]), 40_000))
    assert 3 <= len(done) < n_units, "killed in the middle"
    assert read_manifest(tmp_path / "shards", "big") is None
    kept_shards = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "shards" / "big").glob("*.bin")
                   if f.name.split("-")[1] + ".json" in done}

    assert main(["prepare", str(config), "--no-progress"]) == 0
    for name, stamp in done.items():
        assert (units / name).stat().st_mtime_ns == stamp, f"finished unit {name} was redone"
    for name, stamp in kept_shards.items():
        assert (tmp_path / "shards" / "big" / name).stat().st_mtime_ns == stamp
    assert not list((tmp_path / "shards").rglob("*.tmp")), "the killed run's partial files are gone"
    reference = prepare([SourceConfig(name="big", paths=[str(tmp_path / "big.jsonl")])], tok, tmp_path / "ref",
                        opts(unit_bytes=40_000, shard_tokens=4096, valid_fraction=0.05))
    assert read_manifest(tmp_path / "shards", "big") == reference[0]
    assert file_hashes(tmp_path / "shards") == file_hashes(tmp_path / "ref")


# ------------------------------------------------------------------------------------------ verify


def write_cli_config(tmp_path: Path, tok: Tokenizer, sources: list[dict], **data) -> Path:
    raw = {"model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(tok.path)},
           "data": {"sources": sources, "shards_dir": str(tmp_path / "shards"), "seq_len": 16,
                    "prepare_unit_bytes": 3000, "shard_tokens": 1024, **data},
           "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1, "lr": 1e-3}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_verify_checks_the_union_of_the_tasks(tmp_path, tok, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl([text_of(i) for i in range(300)]))
    config = write_cli_config(tmp_path, tok, [{"name": "a", "paths": [str(tmp_path / "a.jsonl")]}])
    assert main(["prepare", str(config), "--no-progress", "--task-index", "0", "--num-tasks", "3"]) == 0
    capsys.readouterr()
    assert main(["prepare", str(config), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prepared data under") and "re-run `norallm prepare CONFIG`" in err
    assert "units not finished (units 1, 2, 4, 5" in err and "a: no manifest.json" in err

    for i in (1, 2):
        assert main(["prepare", str(config), "--no-progress", "--task-index", str(i), "--num-tasks", "3"]) == 0
    capsys.readouterr()
    assert main(["prepare", str(config), "--verify", "--workers", "2"]) == 0
    assert capsys.readouterr().out.startswith("ok a: ")

    shard = next((tmp_path / "shards" / "a").glob("train-00003-*.bin"))
    data = bytearray(shard.read_bytes())
    data[5] ^= 1  # same size, one flipped bit
    shard.write_bytes(bytes(data))
    assert main(["prepare", str(config), "--verify"]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "sha256" in err and "units/00003.json" in err


def test_prepare_flags_are_checked(tmp_path, tok, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl([text_of(1)]))
    config = write_cli_config(tmp_path, tok, [{"name": "a", "paths": [str(tmp_path / "a.jsonl")]}])
    for args, phrase in [(["--task-index", "1"], "go together"), (["--num-tasks", "2"], "go together"),
                         (["--task-index", "2", "--num-tasks", "2"], "must be in [0, --num-tasks 2)"),
                         (["--workers", "0"], "at least 1 worker")]:
        assert main(["prepare", str(config), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and phrase in err and "Traceback" not in err


def test_array_tasks_refuse_to_train_the_tokenizer(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl([text_of(1)]))
    raw = {"model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(tmp_path / "tok"), "train": True},
           "data": {"sources": [{"name": "a", "paths": [str(tmp_path / "a.jsonl")]}],
                    "shards_dir": str(tmp_path / "shards"), "seq_len": 16},
           "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1, "lr": 1e-3}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["prepare", str(config), "--task-index", "0", "--num-tasks", "2"]) == 2
    assert "norallm tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_progress_reports_documents_tokens_rate_and_eta(tmp_path, tok, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl([text_of(i) for i in range(100)]))
    prepare([SourceConfig(name="a", paths=[str(tmp_path / "a.jsonl")])], tok, tmp_path / "shards",
            opts(progress=True, unit_bytes=2000))
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "units," in x]
    n_units = len(plan_units(SourceConfig(name="a", paths=[str(tmp_path / "a.jsonl")]), 2000))
    m = read_manifest(tmp_path / "shards", "a")
    assert line.startswith(f"[prepare] {n_units}/{n_units} units, 100 documents, {m['tokens']['train']:,} tokens, ")
    assert " MB/s, ETA 00:00:00" in line


# ------------------------------------------------------------------------------- columnar sources


def test_parquet_source_in_row_group_units(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [text_of(i) for i in range(120)]
    values = [t.encode() for t in texts]
    values[7], values[50] = None, b"bl\xe5"  # a null and undecodable bytes: both counted
    values[90] = b"   "
    pq.write_table(pa.table({"id": list(range(120)), "content": pa.array(values, pa.binary())}),
                   tmp_path / "a.parquet", row_group_size=10)
    spec = SourceConfig(name="pq", paths=[str(tmp_path / "a.parquet")], format="parquet", text_field="content")
    units = plan_units(spec, unit_bytes=2000)
    assert len(units) > 2 and all(len(u.pieces) == 1 for u in units)
    (m,) = prepare([spec], tok, tmp_path / "shards", opts(unit_bytes=2000))
    assert m["bad_records"]["skipped"] == {"non_string_text": 1, "invalid_utf8": 1, "empty_text": 1}
    assert f"{tmp_path / 'a.parquet'}#row50: byte 2" in m["bad_records"]["examples"]["invalid_utf8"]
    assert accounted(m) == 117
    want = [t for i, t in enumerate(texts) if i not in (7, 50, 90)]
    assert decoded(tmp_path / "shards", "pq", "train", tok) == want


def test_hf_datasets_sources_stream_local_dirs(tmp_path, tok):
    import datasets

    texts = [text_of(i) for i in range(40)]
    d = tmp_path / "jsonl_dir"
    d.mkdir()
    (d / "part-0.jsonl").write_bytes(jsonl(texts[:25]))
    (d / "part-1.jsonl").write_bytes(jsonl(texts[25:]))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    streamed = SourceConfig(name="hub_like", paths=[str(d)], format="hf")
    saved = SourceConfig(name="saved", paths=[str(tmp_path / "saved")], format="hf")
    assert len(plan_units(streamed, None)) == 2, "one unit per data file (shard)"
    m1, m2 = prepare([streamed, saved], tok, tmp_path / "shards", opts())
    for name, m in (("hub_like", m1), ("saved", m2)):
        assert accounted(m) == 40
        assert decoded(tmp_path / "shards", name, "train", tok) == texts
    with pytest.raises(DataError, match="cannot open HF dataset 'no-such-org/no-such-dataset'"):
        prepare([SourceConfig(name="x", paths=["no-such-org/no-such-dataset"], format="hf")], tok, tmp_path / "s2", opts())


# ------------------------------------------------------------------------------ hold-out, BPE sample


def test_per_source_hold_out(tmp_path, tok):
    texts = [text_of(i) for i in range(200)]
    (tmp_path / "a.jsonl").write_bytes(jsonl(texts))
    a = SourceConfig(name="a", paths=[str(tmp_path / "a.jsonl")])
    b = SourceConfig(name="b", paths=[str(tmp_path / "a.jsonl")], valid_fraction=0.25)
    ma, mb = prepare([a, b], tok, tmp_path / "shards", opts(valid_fraction=0.05))
    assert (ma["valid_fraction"], mb["valid_fraction"]) == (0.05, 0.25)
    assert decoded(tmp_path / "shards", "b", "valid", tok) == [t for t in texts if is_validation(t, 0.25)]
    assert decoded(tmp_path / "shards", "a", "valid", tok) == [t for t in texts if is_validation(t, 0.05)]


def test_bpe_training_sample_spreads_over_sources_and_units(tmp_path):
    from training.config import parse_config
    from training.data.pretraining import training_sample

    for name, first in (("x", 0), ("y", 1000)):
        (tmp_path / f"{name}.jsonl").write_bytes(jsonl([text_of(i) for i in range(first, first + 400)]))
    raw = {"model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(tmp_path / "tok")},
           "data": {"sources": [{"name": n, "paths": [str(tmp_path / f"{n}.jsonl")]} for n in "xy"],
                    "shards_dir": str(tmp_path / "shards"), "seq_len": 16, "prepare_unit_bytes": 5000,
                    "valid_fraction": 0.2},
           "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1, "lr": 1e-3}}
    cfg = parse_config(raw)
    sample = list(training_sample(cfg.data, 60))
    numbers = [int(t.split(":")[0].split()[1]) for t in sample]
    assert len(sample) == 60 and not any(is_validation(t, 0.2) for t in sample)
    # round-robin over the sources; only the hold-out (~20 % of either) unbalances it
    assert 24 <= sum(n >= 1000 for n in numbers) <= 36, "about half from each source"
    assert max(n for n in numbers if n < 1000) > 300, "later units of a source are sampled too"


def test_unit_record_describes_its_pieces(tmp_path, tok):
    (tmp_path / "a.jsonl").write_bytes(jsonl([text_of(i) for i in range(50)]))
    spec = SourceConfig(name="a", paths=[str(tmp_path / "a.jsonl")])
    (m,) = prepare([spec], tok, tmp_path / "shards", opts(unit_bytes=1500))
    record = read_unit_record(tmp_path / "shards", "a", 1)
    assert record["pieces"][0]["path"] == str(tmp_path / "a.jsonl") and record["pieces"][0]["start"] > 0
    assert record["fingerprint"] == m["units"][1]["fingerprint"]
    assert sum(u["documents"]["train"] for u in m["units"]) == m["documents"]["train"] == 50
    assert os.path.basename(m["shards"][0]["file"]).startswith("train-00000-")


def test_purged_inputs_keep_prepared_shards(tmp_path, tok, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl([text_of(i) for i in range(40)]))
    spec = SourceConfig(name="a", paths=[str(tmp_path / "a.jsonl")])
    (first,) = prepare([spec], tok, tmp_path / "shards", opts())
    (tmp_path / "a.jsonl").unlink()  # scratch purged after preparing
    capsys.readouterr()
    assert prepare([spec], tok, tmp_path / "shards", opts()) == [first]
    assert "its inputs cannot be read" in capsys.readouterr().out
    from data_pipeline.verify import verify

    (line,) = verify([spec], tok, tmp_path / "shards", opts())
    assert "shards checked against the manifest only" in line
    with pytest.raises(DataError, match="matches no file"):  # not prepared and no input: still an error
        prepare([SourceConfig(name="b", paths=[str(tmp_path / "b.jsonl")])], tok, tmp_path / "shards", opts())


def test_a_failing_source_does_not_keep_the_others_from_finishing(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_bytes(jsonl([text_of(1)]) + b"{oops\n" * 5)
    (tmp_path / "good.jsonl").write_bytes(jsonl([text_of(i) for i in range(20)]))
    specs = [SourceConfig(name="bad", paths=[str(tmp_path / "bad.jsonl")]), SourceConfig(name="good", paths=[str(tmp_path / "good.jsonl")])]
    with pytest.raises(DataError, match=r"source 'bad': 83.33% of records are unusable"):
        prepare(specs, tok, tmp_path / "shards", opts(max_bad_fraction=0.1))
    assert read_manifest(tmp_path / "shards", "bad") is None
    assert read_manifest(tmp_path / "shards", "good")["documents"]["train"] == 20
