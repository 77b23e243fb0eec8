"""`norallm dedup` and its use by prepare and plan: exact and near duplicates within and across
sources with the documented keep rule, decontamination against local files, dev sources and lm-eval
tasks, the same result for any split of the work, restart after a kill, bad input counted as
prepare counts it, and the plan's removal report."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_pipeline.clusters import DROP_DTYPE, _components, read_state
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.dedup import DedupOptions, dedup
from data_pipeline.errors import DataError
from data_pipeline.normalize import exact_hash, words
from data_pipeline.shards import open_split, read_manifest
from data_pipeline.tokenizer import Tokenizer, train_bpe
from data_pipeline.units import plan_units
from training.cli import main
from training.data.dedup import run_dedup

REPO = Path(__file__).resolve().parents[1]
SYLLABLES = "fjo rd fjel skog elv bre dal vid de myr li ås vik øy hol me skjær nes sund ber gen tro ms".split()


def vocabulary(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(n)})


VOCAB = vocabulary()


def doc(i: int, n_words: int = 200) -> str:
    """A distinct random document (its number seeds it), about 200 words: unrelated documents
    share no 5-word shingle, so only planted duplicates are found."""
    rng = random.Random(1000 + i)
    return " ".join(rng.choice(VOCAB) for _ in range(n_words)).capitalize() + "."


def edited(text: str, n_edits: int, seed: int) -> str:
    """``text`` with ``n_edits`` words replaced: a near duplicate (1 of 200 words: Jaccard ≈ 0.95)."""
    rng = random.Random(seed)
    w = text.split()
    for k in rng.sample(range(len(w)), n_edits):
        w[k] = "endra" + str(k)
    return " ".join(w)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def opts(**kw) -> DedupOptions:
    return DedupOptions(**{"progress": False, "unit_bytes": 20_000, "max_bad_fraction": 1.0, **kw})


def drops_of(root: Path, source: str) -> set[tuple[int, str, str]]:
    """(ordinal in the source, reason, source of the kept copy) of every dropped or flagged document."""
    state = read_state(root)
    out, base = set(), 0
    for u in state["sources"][source]["units"]:
        arr = np.load(root / source / f"drop-{u['index']:05d}.npy")
        assert arr.dtype == DROP_DTYPE
        for o, r, k in arr.tolist():
            out.add((base + o, ("", "exact", "near", "contaminated", "contaminated_kept")[r], state["order"][k]))
        base += u["documents"]
    return out


def quiet(*_args, **_kw) -> None:
    return None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Two sources: web_a (60 documents, then within-source copies) and web_b (40 of its own, then
    copies of web_a documents and of its own), each copy's planted kind known."""
    root = tmp_path_factory.mktemp("corpus")
    a = [doc(i) for i in range(60)]
    a_extra = [a[3].upper().replace(" ", "  ") + "!!",  # exact after normalisation (case, spaces, punctuation)
               edited(a[5], 2, 1)]  # near, within web_a
    b = [doc(100 + i) for i in range(40)]
    b_extra = [a[7], edited(a[9], 1, 2), edited(b[2], 3, 3), a[3]]  # exact, near across; near within; exact across
    return {"root": root, "a": write_jsonl(root / "a.jsonl", a + a_extra), "b": write_jsonl(root / "b.jsonl", b + b_extra),
            "n_a": 62, "n_b": 44}


def sources_of(corpus: dict, order=("a", "b")) -> list[SourceConfig]:
    return [SourceConfig(name=f"web_{k}", paths=[str(corpus[k])]) for k in order]


EXPECTED_A_FIRST = {
    "web_a": {(60, "exact", "web_a"), (61, "near", "web_a")},
    "web_b": {(40, "exact", "web_a"), (41, "near", "web_a"), (42, "near", "web_b"), (43, "exact", "web_a")},
}


def test_exact_and_near_duplicates_within_and_across_sources_keep_the_copy_listed_first(tmp_path, corpus):
    state = dedup(sources_of(corpus), tmp_path / "d", opts(), log=quiet)
    assert {s: drops_of(tmp_path / "d", s) for s in ("web_a", "web_b")} == EXPECTED_A_FIRST
    assert state["sources"]["web_b"]["removed"] == {"exact": {"documents": 2, "kept_in": {"web_a": 2}},
                                                     "near": {"documents": 2, "kept_in": {"web_a": 1, "web_b": 1}}}
    # Listed the other way round, web_b's copies are the first ones: now web_a loses those documents.
    dedup(sources_of(corpus, ("b", "a")), tmp_path / "r", opts(), log=quiet)
    assert drops_of(tmp_path / "r", "web_b") == {(42, "near", "web_b")}
    assert drops_of(tmp_path / "r", "web_a") == {(3, "exact", "web_b"), (7, "exact", "web_b"), (9, "near", "web_b"),
                                                 (60, "exact", "web_b"), (61, "near", "web_a")}


def test_exact_only_and_near_only(tmp_path, corpus):
    dedup(sources_of(corpus), tmp_path / "e", opts(near=False), log=quiet)
    assert drops_of(tmp_path / "e", "web_b") == {(40, "exact", "web_a"), (43, "exact", "web_a")}
    dedup(sources_of(corpus), tmp_path / "n", opts(exact=False), log=quiet)
    assert {r for _, r, _ in drops_of(tmp_path / "n", "web_b")} == {"near"}, "exact copies are near ones too"
    assert len(drops_of(tmp_path / "n", "web_b")) == 4


def test_normalisation_folds_case_width_space_and_punctuation_but_keeps_letters():
    assert words("Hei,  VERDEN!\u00a0ﬁn (å)") == ["hei", "verden", "fin", "å"]
    assert exact_hash("a", words("Blå Bær.")) == exact_hash("b", words("blå    bær"))
    assert exact_hash("a", words("blå bær")) != exact_hash("b", words("bla baer"))
    assert exact_hash("!!", []) != exact_hash("??", []), "texts without words are compared as written"


def test_components_link_chains_to_their_first_member():
    # runs {5, 2} and {2, 9} and {7, 9}: one group {2, 5, 7, 9}; {0, 3} another; the rest alone
    groups = [(np.array([2, 5, 0, 3]), np.array([0, 2]), np.array([2, 2])),
              (np.array([2, 9]), np.array([0]), np.array([2])),
              (np.array([7, 9]), np.array([0]), np.array([2]))]
    assert _components(10, groups).tolist() == [0, 1, 2, 0, 4, 2, 6, 2, 8, 2]


def _dir_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix == ".npy" or p.name == "state.json"}


def test_same_drop_lists_for_any_number_of_workers_and_array_tasks(tmp_path, corpus):
    dedup(sources_of(corpus), tmp_path / "one", opts(), log=quiet)
    dedup(sources_of(corpus), tmp_path / "pool", opts(workers=2), log=quiet)
    for i in range(3):
        assert dedup(sources_of(corpus), tmp_path / "arr", opts(task_index=i, num_tasks=3), log=quiet) is None
    dedup(sources_of(corpus), tmp_path / "arr", opts(), log=quiet)  # clusters; signs nothing anew
    one = _dir_digest(tmp_path / "one")
    assert len([k for k in one if "sig-" in k]) > 4, "several units per source"
    assert _dir_digest(tmp_path / "pool") == one
    assert _dir_digest(tmp_path / "arr") == one


# ------------------------------------------------------------------------------- restart after kill


def test_killed_dedup_keeps_finished_units_and_gives_the_same_result(tmp_path):
    texts = [doc(i, 150) for i in range(120)] + [doc(i, 150) for i in range(0, 120, 7)]
    write_jsonl(tmp_path / "big.jsonl", texts)
    raw = {"model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(tmp_path / "tok")},
           "data": {"sources": [{"name": "big", "paths": [str(tmp_path / "big.jsonl")]}],
                    "shards_dir": str(tmp_path / "shards"), "seq_len": 16, "prepare_unit_bytes": 2048,
                    "dedup": {}},
           "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1, "lr": 1e-3}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    sigs = tmp_path / "shards" / "dedup" / "big"
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "dedup", str(config), "--no-progress"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not sigs.is_dir() or len(list(sigs.glob("sig-*.json"))) < 3):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {f.name: f.stat().st_mtime_ns for f in sigs.glob("sig-*.json")}
    n_units = len(plan_units(SourceConfig(name="big", paths=[str(tmp_path / "big.jsonl")]), 2048))
    assert 3 <= len(done) < n_units, "killed in the middle of the signature pass"
    assert read_state(tmp_path / "shards" / "dedup") is None, "no clustering result from the killed run"

    assert main(["dedup", str(config), "--no-progress"]) == 0
    for name, stamp in done.items():
        assert (sigs / name).stat().st_mtime_ns == stamp, f"finished unit {name} was redone"
    assert not list(sigs.glob("*.tmp")), "temporaries of the killed run are gone or replaced"
    data = DataConfig.model_validate({**raw["data"], "dedup": {"dir": str(tmp_path / "ref")}})
    run_dedup(data, progress=False)
    assert _dir_digest(tmp_path / "shards" / "dedup") == _dir_digest(tmp_path / "ref")
    assert read_state(tmp_path / "ref")["sources"]["big"]["removed"]["exact"]["documents"] == 18


# ------------------------------------------------------------------------------------- bad input


def test_bad_records_are_counted_as_prepare_counts_them_and_ordinals_stay_aligned(tmp_path, tok):
    a, b = doc(1), doc(2)
    lines = [json.dumps({"text": a}), "{not json", json.dumps({"text": ""}), json.dumps({"txt": a}),
             json.dumps({"text": b}), json.dumps({"text": a.lower()})]
    (tmp_path / "s.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    cfg = write_config(tmp_path, tok, [{"name": "s", "paths": [str(tmp_path / "s.jsonl")]}],
                       max_bad_fraction=0.9)
    assert main(["prepare", str(cfg), "--no-progress"]) == 0
    state = read_state(tmp_path / "shards" / "dedup")
    record = json.loads((tmp_path / "shards" / "dedup" / "s" / "sig-00000.json").read_text())
    assert record["bad_records"]["skipped"] == {"malformed_json": 1, "empty_text": 1, "missing_text_field": 1,
                                                "invalid_utf8": 1}
    assert state["sources"]["s"]["documents"] == 3
    m = read_manifest(tmp_path / "shards", "s")
    assert m["bad_records"]["skipped"] == record["bad_records"]["skipped"], "dedup and prepare count alike"
    assert decoded(tmp_path / "shards", "s", tok) == [a, b], "the third usable document (a's copy) is dropped"
    assert m["removed"]["exact"]["documents"] == 1


def test_too_many_bad_records_fail_dedup_like_prepare(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": doc(1)}) + "\n{bad\n{bad\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"66\.67% of records are unusable.*max_bad_fraction"):
        dedup([SourceConfig(name="s", paths=[str(tmp_path / "s.jsonl")])], tmp_path / "d",
              opts(max_bad_fraction=0.5), log=quiet)
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": doc(2)}) + "\n").encode() * 50)[:-20])
    with pytest.raises(DataError, match="end in the middle of their data"):
        dedup([SourceConfig(name="t", paths=[str(tmp_path / "t.jsonl.gz")])], tmp_path / "g", opts(), log=quiet)


# ------------------------------------------------------------------------------- decontamination


def test_decontamination_against_local_files_and_dev_sources(tmp_path, tok):
    test_doc = doc(500, 40)
    dev_doc = doc(501, 40)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": test_doc}) + "\n"
                                         + json.dumps({"question": "for kort"}) + "\n", encoding="utf-8")
    (tmp_path / "quiz.txt").write_text(doc(502, 30), encoding="utf-8")
    write_jsonl(tmp_path / "dev.jsonl", [dev_doc])
    t_words, d_words = test_doc.split(), dev_doc.split()
    train = [doc(1), doc(2) + " " + " ".join(t_words[10:23]),  # a 13-word run of the test passage: contaminated
             doc(3) + " " + " ".join(t_words[10:22]),  # only 12 words of it: not
             " ".join(d_words[:15]) + " " + doc(4),  # 15 words of the dev file
             doc(5) + " " + doc(502, 30).upper(),  # the plain-text file's passage, in capitals
             doc(6)]
    write_jsonl(tmp_path / "train.jsonl", train)
    sources = [{"name": "web", "paths": [str(tmp_path / "train.jsonl")]},
               {"name": "dev", "paths": [str(tmp_path / "dev.jsonl")], "valid_fraction": 1.0}]
    decon = {"files": [str(tmp_path / "test.jsonl"), str(tmp_path / "quiz.txt")], "text_field": "question"}
    cfg = write_config(tmp_path, tok, sources, dedup={"decontamination": decon})
    assert main(["prepare", str(cfg), "--no-progress"]) == 0
    assert drops_of(tmp_path / "shards" / "dedup", "web") == {(1, "contaminated", "web"), (3, "contaminated", "web"),
                                                             (4, "contaminated", "web")}
    refs = json.loads(next((tmp_path / "shards" / "dedup").glob("references-*.json")).read_text())
    assert refs["passages"] == {"test.jsonl": 2, "quiz.txt": 1, "dev": 1} and refs["too_short"] == {"test.jsonl": 1}
    assert decoded(tmp_path / "shards", "web", tok) == [train[0], train[2], train[5]]
    m = read_manifest(tmp_path / "shards", "web")
    assert m["removed"]["contaminated"]["documents"] == 3
    assert m["removed"]["contaminated"]["tokens"] == sum(len(tok.encode(train[i])) + 1 for i in (1, 3, 4))

    # action count: the same documents are reported, and kept
    cfg = write_config(tmp_path, tok, sources, dedup={"decontamination": {**decon, "action": "count"}})
    assert main(["prepare", str(cfg), "--no-progress"]) == 0
    m = read_manifest(tmp_path / "shards", "web")
    assert m["removed"] == {"contaminated_kept": {"documents": 3, "tokens": m["removed"]["contaminated_kept"]["tokens"]}}
    assert decoded(tmp_path / "shards", "web", tok) == train


def test_decontamination_against_lm_eval_tasks(tmp_path, tok, capsys):
    pytest.importorskip("lm_eval")
    nno = [json.loads(line)["text"] for line in
           (REPO / "data_pipeline" / "smoke_corpus" / "nno.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [doc(1), "Innleiing. " + nno[4] + " Slutt.", doc(2)]
    write_jsonl(tmp_path / "train.jsonl", train)
    decon = {"tasks": ["norppl", "normc"], "include_path": str(REPO / "tests" / "harness_tasks")}
    cfg = write_config(tmp_path, tok, [{"name": "web", "paths": [str(tmp_path / "train.jsonl")]}],
                       dedup={"decontamination": decon})
    assert main(["dedup", str(cfg), "--no-progress"]) == 0
    assert drops_of(tmp_path / "shards" / "dedup", "web") == {(1, "contaminated", "web")}
    out = capsys.readouterr().out
    assert "norppl" in out and "normc_p0" in out and "cannot be matched" in out, out  # quiz questions are short

    cfg = write_config(tmp_path, tok, [{"name": "web", "paths": [str(tmp_path / "train.jsonl")]}],
                       dedup={"decontamination": {**decon, "tasks": ["normissing"]}})
    assert main(["dedup", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "norallm eval-cache --tasks normissing" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- prepare and plan


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_bpe([doc(i) for i in range(40)], tmp_path_factory.mktemp("tok"), vocab_size=500, min_frequency=1)


def write_config(tmp_path: Path, tok: Tokenizer, sources: list[dict], **data) -> Path:
    raw = {"model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(tok.path)},
           "data": {"sources": sources, "shards_dir": str(tmp_path / "shards"), "seq_len": 16,
                    "prepare_unit_bytes": 20_000, "shard_tokens": 4096, "valid_fraction": 0.0,
                    "dedup": {}, **data},
           "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 4, "lr": 1e-3}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def decoded(root: Path, name: str, tok: Tokenizer) -> list[str]:
    stream = open_split(root, [name], "train", tok.fingerprint)
    ids = stream.tokens(0, stream.total_tokens)
    ends = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(np.r_[0, ends[:-1] + 1], ends, strict=True)]


def test_prepare_skips_the_drops_and_plan_reports_them_with_epochs_on_what_remains(tmp_path, tok, corpus, capsys):
    sources = [{"name": "web_a", "paths": [str(corpus["a"])]}, {"name": "web_b", "paths": [str(corpus["b"])]}]
    cfg = write_config(tmp_path, tok, sources)
    assert main(["prepare", str(cfg), "--no-progress"]) == 0  # runs dedup first
    texts = {s: [json.loads(x)["text"] for x in corpus[k].read_text(encoding="utf-8").splitlines()]
             for s, k in (("web_a", "a"), ("web_b", "b"))}
    for name, expected in EXPECTED_A_FIRST.items():
        dropped = {o for o, _, _ in expected}
        kept = [t for i, t in enumerate(texts[name]) if i not in dropped]
        assert decoded(tmp_path / "shards", name, tok) == kept
        m = read_manifest(tmp_path / "shards", name)
        assert m["tokens"]["train"] == sum(len(tok.encode(t)) + 1 for t in kept)
        for reason in ("exact", "near"):
            gone = [texts[name][o] for o, r, _ in expected if r == reason]
            assert m["removed"][reason]["documents"] == len(gone)
            assert m["removed"][reason]["tokens"] == sum(len(tok.encode(t)) + 1 for t in gone)
    capsys.readouterr()
    assert main(["plan", str(cfg), "--json"]) == 0
    plan = {s["name"]: s for s in json.loads(capsys.readouterr().out)["sources"]}
    b = read_manifest(tmp_path / "shards", "web_b")
    assert plan["web_b"]["unique_tokens"] == b["tokens"]["train"], "epochs are computed on what remains"
    assert plan["web_b"]["removed"]["near"]["kept_in"] == {"web_a": 1, "web_b": 1}
    assert plan["web_b"]["removed"]["exact"] == b["removed"]["exact"]
    assert main(["plan", str(cfg)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("web_b ") and "docs" in line)
    assert "2 docs" in row and "web_a 3, web_b 1" in row, text

    # the same prepare again keeps everything; a changed corpus makes the array prepare refuse
    assert main(["prepare", str(cfg), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    with open(corpus["b"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": doc(999)}) + "\n")
    try:
        assert main(["prepare", str(cfg), "--no-progress", "--task-index", "0", "--num-tasks", "2"]) == 2
        assert "Run `norallm dedup CONFIG`" in capsys.readouterr().err
    finally:
        corpus["b"].write_text("".join(corpus["b"].read_text(encoding="utf-8").splitlines(keepends=True)[:-1]),
                               encoding="utf-8")


def test_dedup_needs_a_dedup_section_and_a_pretraining_config(tmp_path, tok, capsys):
    cfg = write_config(tmp_path, tok, [{"name": "s", "paths": [str(tmp_path / "x.jsonl")]}], dedup=None)
    assert main(["dedup", str(cfg)]) == 2
    assert "no data.dedup section" in capsys.readouterr().err
    cfg = write_config(tmp_path, tok, [{"name": "dedup", "paths": [str(tmp_path / "x.jsonl")]}])
    assert main(["dedup", str(cfg)]) == 2
    assert "a source is named 'dedup'" in capsys.readouterr().err
