"""Fingerprints are a contract with what is on disk: a unit record, a source manifest and a
checkpoint's loader state each carry one, and a changed value makes prepare redo finished work
and a resume refuse its checkpoint. These values were computed before the data sections moved
into data_pipeline and a source got one representation; they must never change by accident."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from data_pipeline.config import SourceConfig
from data_pipeline.loader import fingerprint
from data_pipeline.prepare import PrepareOptions, source_fingerprint, unit_fingerprint
from data_pipeline.units import Piece, Unit
from training.config import parse_config
from training.data.modes import Pretraining
from training.data.pretraining import fingerprint_parts, prepare_options

OPTS = PrepareOptions(valid_fraction=0.01, shard_tokens=4096, unit_bytes=2**20, max_document_bytes=2**20)
UNITS = [Unit("s", 0, (Piece("/data/s/a.jsonl", 0, None, 1000, 1000), Piece("/data/s/b.jsonl.gz", 0, None, 50, 50))),
         Unit("s", 1, (Piece("/data/s/c.jsonl", 0, 4096, 9000, 4096),))]

SOURCES = {
    "defaults": (SourceConfig(name="s", paths=["/data/s/*.jsonl*"]),
                 "4947f0cc1ff79a3c", "baf69ec56cb669ac"),
    "weighed": (SourceConfig(name="s", paths=["/data/s/*.jsonl*"], share=0.3, max_epochs=2, unique_tokens=10**6),
                "4947f0cc1ff79a3c", "baf69ec56cb669ac"),  # the mixture's fields never change the shards
    "own_valid_fraction": (SourceConfig(name="s", paths=["/data/s/*.jsonl*"], language="nob", valid_fraction=0.2),
                           "db724f2d478af682", "05f309fa6b8a10d5"),
    "parquet": (SourceConfig(name="s", paths=["/a/*.parquet", "/b/*.parquet"], format="parquet", text_field="content",
                             language="code"),
                "a94b9257bb4c2730", "5c4775fcde98af96"),
    "hf": (SourceConfig(name="s", paths=["org/set"], format="hf", hf_split="validation", hf_subset="nb"),
           "fe946fb907d61320", "f2d4739b1487f75d"),
}


@pytest.mark.parametrize("case", SOURCES)
def test_unit_and_source_fingerprints_keep_their_values(case):
    spec, unit_fp, source_fp = SOURCES[case]
    assert unit_fingerprint(spec, UNITS[1], OPTS, "tok0123456789abc") == unit_fp
    assert source_fingerprint(spec, OPTS, UNITS) == source_fp


def _manifest(root, name: str, shas: list[str]) -> None:
    shards = [{"file": f"{name}/train-{i:05d}", "split": "train", "tokens": 1000, "documents": 10, "sha256": sha}
              for i, sha in enumerate(shas)]
    shards.append({"file": f"{name}/valid-00000", "split": "valid", "tokens": 10, "documents": 1, "sha256": "v"})
    (root / name).mkdir(parents=True)
    (root / name / "manifest.json").write_text(json.dumps({
        "format": "norallm-shards/1", "source": name, "vocab_size": 300, "shards": shards,
        "tokens": {"train": 1000 * len(shas), "valid": 10}, "documents": {"train": 10 * len(shas), "valid": 1}}))


def test_loader_fingerprint_parts_keep_their_values(tmp_path):
    _manifest(tmp_path, "nob", ["aa", "bb"])
    _manifest(tmp_path, "code", ["cc"])
    cfg = parse_config({
        "seed": 7, "model": {"flavor": "tiny-mistral"}, "tokenizer": {"path": str(tmp_path / "tok")},
        "data": {"sources": [{"name": "nob", "paths": ["/x/*.jsonl"], "language": "nob"},
                             {"name": "code", "paths": ["/y/*.jsonl"], "share": 0.2}],
                 "shards_dir": str(tmp_path), "seq_len": 16},
        "train": {"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 50, "lr": 1e-3}})
    plan = Pretraining(cfg).plan()
    parts = fingerprint_parts(cfg.data, cfg.seed, SimpleNamespace(fingerprint="tok0123456789abc"), plan)
    assert parts == {"tokenizer": "tok0123456789abc", "seed": "7", "seq_len": "16", "shuffle": "True",
                     "shards:nob": "54106c74709b7e8f", "shards:code": "ab83ea063c12c989",
                     "weight:nob": "838861", "weight:code": "209715"}
    assert fingerprint(**parts) == "487738200405f922"
    nob = cfg.data.sources[0]  # a source as the config gives it
    assert unit_fingerprint(nob, UNITS[1], OPTS, "tok0123456789abc") == "ba9b89501cdf1364"
    assert source_fingerprint(nob, prepare_options(cfg.data), UNITS) == "d48affbd55d1904d"
