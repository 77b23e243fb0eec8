"""`norallm plan`: the NORA budget from declared sizes, manifests once prepared, shares and weights,
max_epochs refusals, and the mixture checks of the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.plan import Plan, SourceBudget, make_plan, shares_of
from training.cli import main
from training.config import ConfigError, load_config, parse_config
from training.data.modes import Pretraining
from training.data.pretraining import run_prepare

REPO = Path(__file__).resolve().parents[1]
NORA_CONFIGS = ["normistral-7b-warm.yaml", "normistral-7b-scratch.yaml", "norbloom-7b-scratch.yaml"]


@pytest.fixture()
def cli_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.mark.parametrize("name", NORA_CONFIGS)
def test_nora_configs_plan_260b_tokens_six_norwegian_epochs_and_a_fifth_code(name, cli_env, capsys, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("NORALLM_DATA", str(tmp_path))  # nothing prepared there: declared sizes are used
    assert main(["plan", str(REPO / "configs" / name), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"total_tokens", "global_batch_tokens", "steps", "sources"} <= set(plan)
    assert plan["total_tokens"] == plan["steps"] * plan["global_batch_tokens"]
    assert abs(plan["total_tokens"] - 260e9) < plan["global_batch_tokens"], "NORA's 260B-token budget"
    assert plan["global_batch_tokens"] == 1024 * 2048
    by_name = {s["name"]: s for s in plan["sources"]}
    for s in plan["sources"]:
        assert {"name", "unique_tokens", "epochs", "tokens", "share"} <= set(s)
        assert s["basis"] == "declared"
    norwegian = [s for s in plan["sources"] if s["language"] != "code"]
    assert len(norwegian) == 5
    assert sum(s["unique_tokens"] for s in norwegian) == pytest.approx(34.7e9, rel=0.01), "> 34B Norwegian tokens"
    for s in norwegian:
        assert 5.9 < s["epochs"] < 6.1, s
    assert by_name["code"]["share"] == 0.2
    assert by_name["code"]["tokens"] / plan["total_tokens"] == pytest.approx(0.2, abs=1e-6)
    assert sum(s["tokens"] for s in plan["sources"]) == plan["total_tokens"]
    assert plan["gpu_hours"] == pytest.approx(plan["total_tokens"] / 1600 / 3600)


def test_plan_text_shows_table_and_totals(cli_env, capsys):
    assert main(["plan", str(REPO / "configs" / "normistral-7b-warm.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["source", "language", "basis", "unique", "tokens", "share", "tokens",
                                           "epochs", "max"]
    assert "code" in out and "20.00%" in out and "5.99" in out
    for label in ("total tokens        260,000,710,656", "tokens per step     2,097,152 (1024 × 2048)",
                  "steps               123,978", "disk (shards)", "GPU-hours"):
        assert label in out


def test_plan_fails_when_a_source_would_exceed_max_epochs(cli_env, capsys):
    cfg = str(REPO / "configs" / "normistral-7b-warm.yaml")
    assert main(["plan", cfg, "--set", "data.sources.0.max_epochs=4", "--set", "data.sources.5.max_epochs=0.5"]) == 2
    out, err = capsys.readouterr()
    assert "ncc" in out, "the plan is still shown"
    assert err.startswith("error: the data plan does not fit:")
    assert "source 'ncc' would be read 5.99 times, more than its max_epochs 4" in err
    assert "source 'code' would be read 0.87 times, more than its max_epochs 0.5" in err
    assert "Lower train.max_steps, its share or weight" in err and "raise max_epochs" in err
    assert "Traceback" not in err


def tiny(tmp_path: Path, sources: list[dict], **data) -> dict:
    return {"model": {"flavor": "tiny-mistral"},
            "tokenizer": {"path": str(tmp_path / "tok"), "train": True, "vocab_size": 300},
            "data": {"sources": sources, "shards_dir": str(tmp_path / "shards"), "seq_len": 16, **data},
            "train": {"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 50, "lr": 1e-3}}


def plan_of(cfg) -> Plan:
    return Pretraining(cfg).plan()


def test_plan_uses_manifests_once_prepared_and_declared_sizes_before(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"Tekst nummer {i} om fjorden."}) + "\n"
                                              for i in range(200)))
    raw = tiny(tmp_path, [{"name": "a", "paths": [str(tmp_path / "a.jsonl")], "unique_tokens": 10**6},
                          {"name": "b", "paths": [str(tmp_path / "nowhere/*.jsonl")], "unique_tokens": 3000}])
    cfg = parse_config(raw)
    assert [s.basis for s in plan_of(cfg).sources] == ["declared", "declared"]
    prepared = parse_config(tiny(tmp_path, raw["data"]["sources"][:1]))
    run_prepare(prepared.tokenizer, prepared.data, progress=False)
    plan = plan_of(cfg)
    a, b = plan.sources
    manifest = json.loads((tmp_path / "shards" / "a" / "manifest.json").read_text())
    assert (a.basis, a.unique_tokens) == ("manifest", manifest["tokens"]["train"])
    assert (b.basis, b.unique_tokens) == ("declared", 3000)
    assert a.disk_bytes == 2 * (manifest["tokens"]["train"] + manifest["tokens"]["valid"]) + 8 * (
        manifest["documents"]["train"] + manifest["documents"]["valid"] + len(manifest["shards"]))
    assert a.share == pytest.approx(a.unique_tokens / (a.unique_tokens + 3000)), "by size, without weights"

    del raw["data"]["sources"][1]["unique_tokens"]
    with pytest.raises(DataError, match=r"source 'b' has no shards under .* and no declared size.*unique_tokens"):
        plan_of(parse_config(raw))


def declared(name: str, unique_tokens: int, **source) -> SourceBudget:
    """The budget of a source of ``unique_tokens`` declared train tokens."""
    return SourceBudget(SourceConfig(name=name, paths=[f"{name}.jsonl"], **source), unique_tokens, "declared")


def test_shares_weights_and_the_realised_counts():
    budgets = [declared("x", 1000, share=0.2), declared("y", 5000, weight=3),
               declared("z", 9000, weight=1)]
    assert shares_of(budgets) == pytest.approx([0.2, 0.6, 0.2])
    by_size = [declared("y", 5000), declared("z", 15000)]
    assert shares_of(by_size) == pytest.approx([0.25, 0.75])
    plan = make_plan(budgets, seq_len=10, global_batch_size=8, steps=125)
    assert [s.samples for s in plan.sources] == [200, 600, 200]
    assert [s.tokens for s in plan.sources] == [2000, 6000, 2000] and plan.total_tokens == 10_000
    assert [s.windows for s in plan.sources] == [99, 499, 899]
    assert plan.sources[0].epochs == pytest.approx(200 / 99)
    assert plan.gpu_hours is None and plan.problems == []
    plan.check()
    tight = make_plan([declared("x", 100, max_epochs=1.0)], 10, 8, 125)
    with pytest.raises(DataError, match="source 'x' would be read 111.11 times"):
        tight.check()
    empty = make_plan([declared("x", 5, share=0.5), declared("y", 500)], 10, 1, 4)
    assert "fewer than one sample" in empty.problems[0]


def test_a_source_without_training_tokens_is_named(tmp_path, capsys):
    """A manifest of 0 train tokens (an older prepare let a 0-byte .gz through) is not a share of 0."""
    with pytest.raises(DataError, match=r"source 'web' \(manifest: 0 train tokens\) has no training documents.*"
                                        r"norallm prepare"):
        make_plan([SourceBudget(SourceConfig(name="web", paths=["web.jsonl.gz"]), 0, "manifest")], 10, 8, 10)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "Tekst om fjorden."}) + "\n")
    raw = tiny(tmp_path, [{"name": "a", "paths": [str(tmp_path / "a.jsonl")]}])
    cfg = parse_config(raw)
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    manifest = tmp_path / "shards" / "a" / "manifest.json"  # as an older prepare wrote it
    m = json.loads(manifest.read_text())
    m["tokens"]["train"], m["documents"]["train"], m["shards"] = 0, 0, []
    manifest.write_text(json.dumps(m))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert "source 'a' (manifest: 0 train tokens) has no training documents" in err and "non-negative" not in err


@pytest.mark.parametrize("sources,path,phrase", [
    ([{"share": 0.3, "weight": 2}, {}], "data.sources.0", "either share"),
    ([{"share": 0.7}, {"share": 0.6}], "data.sources", "add up to 1.3 > 1"),
    ([{"share": 1.0}, {}], "data.sources", "leaving nothing for 's1'"),
    ([{"share": 0.5}, {"share": 0.3}], "data.sources", "add up to 0.8, not 1"),
    ([{"weight": 2}, {}], "data.sources", "give every one a weight, or none"),
])
def test_config_checks_the_mixture(tmp_path, sources, path, phrase):
    srcs = [{"name": f"s{i}", "paths": ["x.jsonl"], **s} for i, s in enumerate(sources)]
    with pytest.raises(ConfigError) as e:
        parse_config(tiny(tmp_path, srcs))
    got = dict(e.value.problems)
    assert list(got) == [path] and phrase in got[path]


def test_config_refuses_document_boundaries_for_eager_bloom_and_training_a_sentencepiece(tmp_path):
    raw = tiny(tmp_path, [{"name": "a", "paths": ["x.jsonl"]}], document_boundaries=True)
    raw["model"].update(flavor="tiny-bloom", attn_implementation="eager")
    raw["tokenizer"]["kind"] = "sentencepiece"
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    got = dict(e.value.problems)
    assert set(got) == {"data.document_boundaries", "tokenizer.kind"}
    assert "ignores position ids" in got["data.document_boundaries"] and "auto" in got["data.document_boundaries"]
    raw["model"]["flavor"] = "tiny-mistral"
    raw["tokenizer"]["train"] = False
    assert parse_config(raw).data.document_boundaries is True


def test_config_expands_data_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("NORALLM_DATA", "/data/nora")
    cfg = load_config(REPO / "configs" / "normistral-7b-warm.yaml")
    assert cfg.data.shards_dir == "/data/nora/shards/nora-32768"
    assert cfg.tokenizer.path == "/data/nora/tokenizers/nora-32768"
    assert cfg.data.sources[0].paths == ["${NORALLM_DATA}/ncc/*.jsonl.gz"], "source globs expand when read"
    assert yaml.safe_load(cfg.to_yaml())["data"]["shards_dir"] == "/data/nora/shards/nora-32768"


def test_a_separate_dev_file_is_a_validation_only_source(tmp_path):
    """valid_fraction: 1 declares a source (a dev file) validation-only: prepared into its valid split
    only, left out of the plan, the mixture and the loader's fingerprint, and evaluated."""
    from training.data.pretraining import build_loader
    from training.eval.perplexity import validation_sets

    smoke = REPO / "data_pipeline" / "smoke_corpus"
    sources = [{"name": "nob", "paths": [str(smoke / "nob.jsonl")]},
               {"name": "dev", "paths": [str(smoke / "nno.jsonl")], "valid_fraction": 1.0}]
    cfg = parse_config(tiny(tmp_path, sources))
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    dev = json.loads((tmp_path / "shards" / "dev" / "manifest.json").read_text())
    assert dev["tokens"]["train"] == 0 and dev["documents"]["valid"] == 40
    plan = plan_of(cfg)
    assert [s.name for s in plan.sources] == ["nob"] and not plan.problems
    tokenizer = cfg.tokenizer.load()
    loader = build_loader(cfg.data, tokenizer, plan, 1, 1, 0, 1)
    assert "shards:dev" not in loader.state_dict()["fingerprint_parts"] and len(loader.next_step()) == 4
    assert [name for name, _, _ in validation_sets(cfg.data, tokenizer, 4, 0, 1)] == ["nob", "dev"]
    bad = tiny(tmp_path, [sources[0], {**sources[1], "share": 0.5}])
    with pytest.raises(ConfigError, match="validation-only, never trained on: remove its share"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="every source is validation-only"):
        parse_config(tiny(tmp_path, [{**sources[1], "name": "only"}]))
