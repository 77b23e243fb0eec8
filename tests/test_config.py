"""The config schema: every problem reported at once with its dotted path, --set overrides, the
shipped configs, and `norallm validate`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from training.cli import main
from training.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
# templates have blanks to fill: tests/test_tokenizer_strategies.py fills and validates them
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("template-"))


def good_raw() -> dict:
    """A small valid config as a plain dict (a fresh copy each call)."""
    return {
        "name": "unit",
        "seed": 1,
        "model": {"flavor": "tiny-mistral"},
        "tokenizer": {"path": "tok", "vocab_size": 512},
        "data": {
            "sources": [
                {"name": "nob", "paths": ["nob/*.jsonl"], "language": "nob"},
                {"name": "nno", "paths": ["nno/*.jsonl"], "language": "nno"},
            ],
            "shards_dir": "shards",
            "seq_len": 64,
        },
        "train": {
            "global_batch_size": 16,
            "micro_batch_size": 4,
            "world_size": 2,
            "max_steps": 100,
            "lr": 1e-3,
            "warmup_steps": 10,
        },
    }


def problems_of(raw, overrides=None) -> dict[str, list[str]]:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, overrides=overrides)
    out: dict[str, list[str]] = {}
    for path, msg in e.value.problems:
        out.setdefault(path, []).append(msg)
    return out


def test_good_config_parses_with_defaults():
    cfg = parse_config(good_raw())
    assert isinstance(cfg, Config)
    assert cfg.name == "unit" and cfg.seed == 1
    assert [s.name for s in cfg.data.sources] == ["nob", "nno"]
    assert cfg.data.valid_fraction == 0.01 and cfg.zero.stage == 2 and cfg.train.schedule == "cosine"
    assert cfg.model_vocab_size == 512
    assert cfg.train.accum_steps(2) == 2 and cfg.tokens_per_step == 16 * 64
    # the resolved YAML round-trips to the same config
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()


def test_all_problems_reported_at_once_with_dotted_paths():
    raw = good_raw()
    raw["modle"] = {}  # unknown top-level section, close to 'model'
    raw["seed"] = "abc"  # wrong type at top level
    raw["model"]["flavor"] = "gpt-9"  # unknown flavor
    del raw["tokenizer"]["path"]  # missing required field
    raw["tokenizer"]["vocab_sise"] = 600  # unknown key with a did-you-mean
    raw["train"]["global_batch_size"] = 18  # not divisible by micro_batch_size × world_size = 8
    raw["train"]["warmup_steps"] = 500  # > max_steps
    raw["data"]["sources"][1]["name"] = "nob"  # duplicate source name
    raw["eval"] = {"max_samples": "lots"}  # wrong type
    raw["checkpoint"] = {"keep_last": 0}  # out of range (ge=1)
    raw["zero"] = {"stage": 5}  # not an allowed value
    # field errors in a section do not hide inconsistencies between its other fields
    raw["train"]["max_step"] = 3  # typo next to the warmup/batch inconsistencies above
    raw["data"]["shuffle"] = "maybe"  # wrong type next to the duplicate source name

    with pytest.raises(ConfigError) as e:
        parse_config(raw, source="exp.yaml")
    err = e.value
    got = dict(err.problems)
    assert len(err.problems) == len(got), "one problem per path here"

    expected = {
        "modle": "did you mean 'model'",
        "seed": "must be int",
        "model.flavor": "unknown flavor 'gpt-9'",
        "tokenizer.path": "required but missing",
        "tokenizer.vocab_sise": "did you mean 'vocab_size'",
        "train.global_batch_size": "not divisible by micro_batch_size × world_size",
        "train.warmup_steps": "500 > max_steps 100",
        "data.sources": "source name 'nob' is used twice",
        "eval.max_samples": "valid integer",
        "checkpoint.keep_last": "greater than or equal to 1",
        "zero.stage": "0, 1, 2 or 3",
        "train.max_step": "did you mean 'max_steps'",
        "data.shuffle": "valid boolean",
    }
    assert set(got) == set(expected)
    for path, phrase in expected.items():
        assert phrase in got[path], f"{path}: {got[path]!r} lacks {phrase!r}"
    assert "unknown key" in got["tokenizer.vocab_sise"]
    assert "tiny-mistral" in got["model.flavor"], "the message lists the known flavors"
    assert "multiple of 8" in got["train.global_batch_size"]

    # the message lists every problem, headed by the source name and count
    text = str(err)
    assert text.startswith(f"exp.yaml: {len(expected)} problems:")
    for path in expected:
        assert f"  - {path}: " in text


def test_missing_sections_and_fields():
    raw = good_raw()
    del raw["train"]
    del raw["data"]["seq_len"]
    raw["data"]["sources"] = []
    got = problems_of(raw)
    assert "required section is missing" in got["train"][0]
    assert "required but missing" in got["data.seq_len"][0]
    assert "at least 1 item" in got["data.sources"][0]


@pytest.mark.parametrize(
    "path,value,phrase",
    [
        ("train.lr", 0, "greater than 0"),
        ("train.max_steps", 0, "greater than or equal to 1"),
        ("data.valid_fraction", 0.9, "less than or equal to 0.5"),
        ("data.seq_len", 4, "greater than or equal to 8"),
        ("tokenizer.vocab_size", 100, "greater than or equal to 260"),
        ("train.precision", "fp8", "'fp32' or 'bf16'"),
        ("train.micro_batch_size", "four", "valid integer"),
        ("data.shuffle", "maybe", "valid boolean"),
    ],
)
def test_single_field_problems(path, value, phrase):
    section, key = path.split(".")
    raw = good_raw()
    raw[section][key] = value
    got = problems_of(raw)
    assert list(got) == [path]
    assert phrase in got[path][0]
    assert repr(value) in got[path][0], "the message shows the offending value"


def test_unknown_source_key_has_list_index_in_path():
    raw = good_raw()
    raw["data"]["sources"][1]["text_feild"] = "body"
    got = problems_of(raw)
    assert list(got) == ["data.sources.1.text_feild"]
    assert "did you mean 'text_field'" in got["data.sources.1.text_feild"][0]


def test_consistency_checks_without_world_size():
    raw = good_raw()
    raw["train"].update(world_size=None, global_batch_size=18, min_lr=1.0)
    raw["model"]["vocab_size"] = 100
    raw["data"]["seq_len"] = 4096  # tiny-mistral has 1024 positions
    got = problems_of(raw)
    assert "not a multiple of micro_batch_size 4" in got["train.global_batch_size"][0]
    assert "floor must not exceed the peak" in got["train.min_lr"][0]
    assert "100 < tokenizer.vocab_size 512" in got["model.vocab_size"][0]
    assert "exceeds the model's 1024 positions" in got["data.seq_len"][0]


def test_zero_0_is_refused_with_bf16_and_kept_with_fp32():
    """DeepSpeed 0.19 keeps no fp32 master weights without ZeRO (bf16 + fp32 gradient accumulation
    raises NotImplementedError in deepspeed.initialize): refused at validate, with the fix."""
    raw = good_raw()
    raw["zero"] = {"stage": 0}
    raw["train"]["precision"] = "bf16"
    got = problems_of(raw)
    assert list(got) == ["zero.stage"] and "use zero.stage 1" in got["zero.stage"][0]
    raw["train"]["precision"] = "fp32"
    assert parse_config(raw).zero.stage == 0
    raw["zero"]["stage"], raw["train"]["precision"] = 1, "bf16"
    assert parse_config(raw).train.precision == "bf16"


def test_grad_accum_steps_must_match():
    raw = good_raw()
    raw["train"]["grad_accum_steps"] = 3
    got = problems_of(raw)
    assert list(got) == ["train.grad_accum_steps"]
    assert "set it to 2" in got["train.grad_accum_steps"][0]
    raw["train"]["grad_accum_steps"] = 2
    assert parse_config(raw).train.grad_accum_steps == 2


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError) as e:
        parse_config(["not", "a", "mapping"])
    assert e.value.problems[0][0] == "(top level)"


# ------------------------------------------------------------------------------------------ overrides


def test_set_overrides_scalars_lists_and_new_keys():
    cfg = parse_config(
        good_raw(),
        overrides=[
            "data.sources.0.name=bokmaal",
            "data.sources.1.paths=[a.jsonl, 'b c.jsonl']",
            "train.max_steps=5",
            "train.warmup_steps=2",
            "train.lr=3.0e-4",
            "logging.wandb=true",
            "eval.every_steps=0",
            "name=with=equals",
            "model.overrides.num_hidden_layers=3",
        ],
    )
    assert [s.name for s in cfg.data.sources] == ["bokmaal", "nno"]
    assert cfg.data.sources[1].paths == ["a.jsonl", "b c.jsonl"]
    assert cfg.train.max_steps == 5 and cfg.train.warmup_steps == 2
    assert cfg.train.lr == pytest.approx(3.0e-4)
    assert cfg.logging.wandb is True
    assert cfg.eval.every_steps == 0
    assert cfg.name == "with=equals", "only the first '=' separates path and value"
    assert cfg.model.overrides == {"num_hidden_layers": 3}


def test_set_override_replaces_list_items_by_index():
    cfg = parse_config(
        good_raw(),
        overrides=[
            "data.sources.1={name: web, paths: [w/*.zst], format: jsonl}",
            "data.sources.0.paths.0=x.jsonl",
        ],
    )
    assert [s.name for s in cfg.data.sources] == ["nob", "web"]
    assert cfg.data.sources[1].paths == ["w/*.zst"] and cfg.data.sources[1].language == ""
    assert cfg.data.sources[0].paths == ["x.jsonl"]


def test_set_overrides_are_validated_like_the_file():
    got = problems_of(good_raw(), overrides=["train.max_steps=5"])
    assert list(got) == ["train.warmup_steps"] and "10 > max_steps 5" in got["train.warmup_steps"][0]
    got = problems_of(good_raw(), overrides=["train.lrr=1", "data.sources.0.name=a b"])
    assert set(got) == {"train.lrr", "data.sources.0.name"}
    assert "did you mean 'lr'" in got["train.lrr"][0]
    assert "pattern" in got["data.sources.0.name"][0]


def test_set_override_without_equals_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        parse_config(good_raw(), overrides=["train.max_steps"])
    assert e.value.problems == [("train.max_steps", "an override must look like key.path=value")]


def test_load_config_applies_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(good_raw()), encoding="utf-8")
    cfg = load_config(p, ["data.sources.1.name=nynorsk", "seed=99"])
    assert cfg.data.sources[1].name == "nynorsk" and cfg.seed == 99


@pytest.mark.parametrize(
    "assignment",
    [
        "data.sources.5.name=x",  # list index out of range -> IndexError
        "data.sources.first.name=x",  # non-integer list index -> ValueError
        "seed.x=1",  # item assignment into an int -> TypeError
        "seed.x.y=1",  # descending into an int -> AttributeError
        "data.sources.0.paths=[a",  # unparsable YAML value -> yaml.YAMLError
    ],
)
def test_set_override_with_bad_path_is_a_config_error(assignment):
    with pytest.raises(ConfigError) as e:
        parse_config(good_raw(), overrides=[assignment])
    assert e.value.problems[0][0] == assignment.split("=", 1)[0]


def test_load_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


# ------------------------------------------------------------------------------------ shipped configs


def test_there_are_shipped_configs():
    assert CONFIGS, f"no YAML under {REPO / 'configs'}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.sources and cfg.train.max_steps >= 1
    # resolving and re-parsing is a fixed point
    assert parse_config(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture()
def cli_env(monkeypatch):
    # main() sets TOKENIZERS_PARALLELISM with setdefault; pin it so the test leaves the environment as it found it
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_cli_validate_prints_resolved_yaml_and_parameters(cli_env, capsys):
    smoke = REPO / "configs" / "smoke.yaml"
    rc = main(["validate", str(smoke), "--set", "train.max_steps=70"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    body, _, tail = out.rpartition("# parameters:")
    assert tail, "a '# parameters:' line is printed"
    resolved = yaml.safe_load(body)
    cfg = load_config(smoke, ["train.max_steps=70"])
    assert resolved == cfg.to_dict()
    assert resolved["train"]["max_steps"] == 70
    n = int(tail.split()[0].replace(",", ""))
    assert n > 0
    assert f"({cfg.model.flavor}, vocab {cfg.model_vocab_size:,})" in tail
    assert "Traceback" not in err


def test_cli_validate_bad_config_exits_2_without_traceback(cli_env, capsys, tmp_path):
    raw = good_raw()
    raw["train"]["warmup_steps"] = 1000
    raw["model"]["flavor"] = "gpt-9"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw), encoding="utf-8")
    rc = main(["validate", str(p)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("error: ")
    assert "train.warmup_steps" in err and "model.flavor" in err and str(p) in err
    assert "Traceback" not in err and "Traceback" not in out
    assert "# parameters:" not in out


@pytest.mark.parametrize("extra", [["--set", "train.lr=-1"], ["--set", "nonsense"]])
def test_cli_bad_override_exits_2(cli_env, capsys, extra):
    rc = main(["validate", str(REPO / "configs" / "smoke.yaml"), *extra])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err


def test_cli_missing_config_exits_2(cli_env, capsys, tmp_path):
    rc = main(["validate", str(tmp_path / "nope.yaml")])
    _, err = capsys.readouterr()
    assert rc == 2 and "no such file" in err


def test_config_does_not_mutate_callers_dict_unless_overridden():
    raw = good_raw()
    before = copy.deepcopy(raw)
    parse_config(raw)
    assert raw == before


def test_a_null_switch_section_is_off_and_round_trips():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    assert cfg.sft is None
    again = parse_config(yaml.safe_load(cfg.to_yaml()))  # the resolved config, as a run dir stores it
    assert again.sft is None and isinstance(again, Config)
    raw = yaml.safe_load(cfg.to_yaml())
    raw["sft"] = {}
    assert parse_config(raw).sft is not None


def test_secret_env_values_never_reach_config_yaml_checkpoints_or_wandb():
    from training.config import parse_config

    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw["slurm"] = {"env": {"WANDB_API_KEY": "abc123", "HF_TOKEN": "hf_x", "DB_PASSWORD": "pw", "OMP_NUM_THREADS": "8"}}
    cfg = parse_config(raw)
    assert cfg.slurm.env["WANDB_API_KEY"] == "abc123"  # the job itself still gets it
    written = cfg.to_yaml()
    assert "abc123" not in written and "hf_x" not in written and "pw\n" not in written
    assert cfg.to_dict()["slurm"]["env"]["OMP_NUM_THREADS"] == "8"
    assert cfg.to_dict()["slurm"]["env"]["HF_TOKEN"].startswith("<redacted")


@pytest.mark.parametrize("name", ["GITHUBTOKEN", "MY_APIKEY", "db_passwd", "AWS_SECRET_ACCESS_KEY", "SlackAuth",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN", "ssh_passphrase", "hfToken"])
def test_a_secret_is_found_by_the_words_in_its_name_not_by_a_list(name):
    from training.config import is_secret_name, parse_config

    assert is_secret_name(name)
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    raw["slurm"] = {"env": {name: "s3cr3t-value"}}
    assert "s3cr3t-value" not in parse_config(raw).to_yaml()


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "MAX_TOKENS", "HF_HOME", "NCCL_DEBUG"])
def test_ordinary_variables_are_not_taken_for_secrets(name):
    from training.config import is_secret_name

    assert not is_secret_name(name)


def test_model_overrides_are_checked_before_queueing():
    from training.config import parse_config

    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())

    def problems(overrides: dict) -> str:
        with pytest.raises(ConfigError) as e:
            parse_config({**raw, "model": {**raw["model"], "overrides": overrides}})
        return str(e.value)

    assert "model.overrides.num_hidden_layer: not a MistralConfig field" in problems({"num_hidden_layer": 8})
    assert "Did you mean 'num_hidden_layers'?" in problems({"num_hidden_layer": 8})
    assert "hidden_size 250 is not divisible by num_attention_heads" in problems({"hidden_size": 250})
    assert "num_key_value_heads: 3 does not divide num_attention_heads" in problems({"num_key_value_heads": 3})
    parse_config({**raw, "model": {**raw["model"], "overrides": {"num_hidden_layers": 3, "rope_theta": 1e6}}})


def test_smoke_never_deletes_a_run_dir_that_is_not_its_own(tmp_path, capsys):
    """`norallm smoke` starts afresh by deleting its run dir: refused for a dir that is not a smoke
    run, and for a smoke run on other data (the export sft-smoke.yaml builds on) unless --overwrite;
    both before any work is done."""
    from training.cli import main

    real = tmp_path / "real-run"
    (real / "checkpoints").mkdir(parents=True)
    assert main(["smoke", "--run-dir", str(real)]) == 2
    assert "not a smoke run dir" in capsys.readouterr().err and (real / "checkpoints").is_dir()
    earlier = tmp_path / "smoke"
    earlier.mkdir()
    (earlier / "smoke.yaml").write_text(yaml.safe_dump({"data": {"sources": [{"name": "nob", "paths": ["/x.jsonl"]}]}}))
    assert main(["smoke", "--run-dir", str(earlier)]) == 2
    assert "on other data" in capsys.readouterr().err and (earlier / "smoke.yaml").is_file()


def _base_dir(tmp_path: Path, flavor: str = "tiny-mistral", **overrides) -> Path:
    """A base model dir as a warm start finds it: just its config.json (no weights needed to validate)."""
    from training.model.build import SpecialIds, hf_config

    base = tmp_path / f"base-{flavor}"
    hf_config(flavor, overrides, 1000, SpecialIds(1, 2, 0)).save_pretrained(base)
    return base


def test_a_warm_start_takes_the_base_shape_from_its_config_json(tmp_path, capsys):
    """No flavor restated: the base's shape becomes flavor + overrides in the resolved config (so
    export and resume never need the base), and `validate` counts the base's shape."""
    from training.cli import main
    from training.model.build import SpecialIds, count_parameters, hf_config

    base = _base_dir(tmp_path, intermediate_size=128, rms_norm_eps=1e-6)
    raw = good_raw()
    raw["model"] = {"init": "warm", "base": str(base), "overrides": {"max_position_embeddings": 512}}
    cfg = parse_config(raw)
    assert cfg.model.flavor == "mistral-7b"
    o = cfg.model.overrides
    assert (o["hidden_size"], o["intermediate_size"], o["num_hidden_layers"], o["rms_norm_eps"]) == (64, 128, 2, 1e-6)
    assert o["max_position_embeddings"] == 512 and o["rope_parameters"]["rope_theta"] == 10_000.0  # user's kept
    config = tmp_path / "warm.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(config)]) == 0
    expected = count_parameters(hf_config("tiny-mistral", {"intermediate_size": 128}, 512, SpecialIds(1, 2, 0)))
    assert f"# parameters: {expected:,} (mistral-7b" in capsys.readouterr().out


def test_a_warm_start_whose_flavor_is_not_the_base_shape_is_refused_field_by_field(tmp_path):
    base = _base_dir(tmp_path, intermediate_size=128, rms_norm_eps=1e-6)
    raw = good_raw()
    raw["model"] = {"flavor": "tiny-mistral", "init": "warm", "base": str(base)}
    got = problems_of(raw)
    assert set(got) == {"model.overrides.intermediate_size", "model.overrides.rms_norm_eps"}
    assert "the base has intermediate_size=128, tiny-mistral with these overrides gives 176; set it to 128" in \
        got["model.overrides.intermediate_size"][0]
    raw["model"]["overrides"] = {"intermediate_size": 128, "rms_norm_eps": 1e-6}
    parse_config(raw)  # restated correctly: accepted
    raw["model"] = {"flavor": "tiny-bloom", "init": "warm", "base": str(base)}
    assert "tiny-bloom is a bloom flavor but model.base is a mistral model" in problems_of(raw)["model.flavor"][0]
    raw["model"] = {"init": "warm", "base": str(tmp_path / "nowhere")}
    assert "model.base/config.json, which is not there" in " ".join(problems_of(raw)["model.flavor"])


def test_the_launch_is_checked_with_the_same_batch_rule_and_fix_as_validate():
    """A config without world_size validates; launched on 3 ranks its batch does not split: the
    launch check says what `validate` would, with the multiple to choose."""
    from training.loop.setup import check_world

    raw = good_raw()
    del raw["train"]["world_size"]
    cfg = parse_config(raw)  # 16 sequences, micro-batch 4
    check_world(cfg, 2)
    with pytest.raises(ConfigError) as e:
        check_world(cfg, 3)
    assert e.value.problems == [("train.global_batch_size", "16 is not divisible by micro_batch_size × world_size "
                                 "= 4 × 3; make it a multiple of 12.")]
    raw["train"]["world_size"] = 3
    assert problems_of(raw)["train.global_batch_size"] == [e.value.problems[0][1]]
