"""Facts stated once: the source formats and tokenizer kinds (the config's types, the readers'
dispatch, the error messages and the README all read one tuple), the default run dir (the CLI
and the Slurm job resolve it with one function), and the Sigma2 settings the Olivia profile
shares with Betzy and Saga."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from test_config import good_raw

from data_pipeline.config import FORMATS, SourceConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import KINDS, Tokenizer
from data_pipeline.units import plan_units
from norallm.files import default_run_dir
from training.cli import main
from training.config import ConfigError, parse_config
from training.launch.job import resolve_job
from training.launch.profiles import PROFILES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def readme_choices(key: str, values: tuple[str, ...]) -> str:
    """How the README's config table lists a key's values: `key: a|b`, the bars escaped for the table."""
    return f"`{key}: " + "\\|".join(values) + "`"


def test_the_source_formats_are_one_tuple_read_by_the_schema_the_readers_and_the_readme():
    assert get_args(SourceConfig.model_fields["format"].annotation) == FORMATS
    assert readme_choices("format", FORMATS) in README
    raw = good_raw()
    raw["data"]["sources"][0]["format"] = "csv"
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    (message,) = [m for path, m in e.value.problems if path == "data.sources.0.format"]
    assert all(f"'{f}'" in message for f in FORMATS), message
    # the readers' dispatch refuses what the schema would have, with the same list
    unchecked = SourceConfig.model_construct(name="s", paths=["x"], format="csv")
    with pytest.raises(DataError, match="unknown format 'csv'") as e:
        plan_units(unchecked, None)
    assert str(FORMATS) in str(e.value)


def test_the_tokenizer_kinds_are_one_tuple_read_by_the_schema_the_loader_and_the_readme(tmp_path):
    assert get_args(TokenizerConfig.model_fields["kind"].annotation) == KINDS
    assert readme_choices("kind", KINDS) in README
    with pytest.raises(DataError, match="tokenizer kind 'bpe' is unknown") as e:
        Tokenizer(tmp_path, kind="bpe")
    assert str(KINDS) in str(e.value)


def test_the_default_run_dir_is_one_function_for_the_cli_and_the_slurm_job(tmp_path, monkeypatch, capsys):
    assert default_run_dir("exp") == "runs/exp"
    assert default_run_dir("exp", "/scratch/p/u/norallm") == "/scratch/p/u/norallm/exp"
    for command in ("train", "preflight"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"default: {default_run_dir('<name>')}" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USER", "someone")
    cfg = parse_config(good_raw())
    assert resolve_job(cfg, "c.yaml", PROFILES["local"], []).run_dir == tmp_path / default_run_dir("unit")
    raw = good_raw()
    raw["slurm"] = {"account": "project_465000123"}
    lumi = resolve_job(parse_config(raw), "c.yaml", PROFILES["lumi"], [])
    assert lumi.run_dir == Path("/scratch/project_465000123/someone/norallm/unit")


def test_olivia_shares_the_sigma2_settings_of_betzy_and_saga_and_keeps_its_own_network():
    olivia, betzy, saga = PROFILES["olivia"], PROFILES["betzy"], PROFILES["saga"]
    for name in ("account_pattern", "account_example", "default_time", "container_runtime", "container_flags",
                 "binds"):
        assert getattr(olivia, name) == getattr(betzy, name) == getattr(saga, name), name
    assert betzy.env == saga.env and betzy.env.items() <= olivia.env.items()
    assert (olivia.launcher, betzy.launcher, saga.launcher) == ("torchrun", "srun", "srun")
    assert olivia.env["FI_PROVIDER"] == "cxi" and "FI_PROVIDER" not in betzy.env
