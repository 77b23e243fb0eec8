"""The model-family registry (training.model.families): its records held to the installed
transformers, every tiny flavor built, a base's config.json read without torch as transformers
reads it, and an unsupported base refused by `validate` in one line."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_config import good_raw, problems_of

from training.config import parse_config
from training.model.build import SpecialIds, build_model, hf_config
from training.model.families import FAMILIES, FLAVORS, base_json, shape_from_dict

REPO = Path(__file__).resolve().parents[1]
TINY = sorted(name for name in FLAVORS if name.startswith("tiny-"))


def _hf_shape(config, fam) -> dict:
    """The shape fields as transformers holds them on a config object (not through our reader)."""
    shape = {key: getattr(config, key) for key in fam.shape}
    if "rope_parameters" in shape:
        shape["rope_parameters"] = dict(config.rope_parameters)
    return shape


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_record_matches_the_installed_transformers(model_type):
    """Fields and shape defaults are copied from transformers (so parsing a config needs no torch):
    a transformers release that adds a field or changes a default fails here, not in a run."""
    import transformers

    fam = FAMILIES[model_type]
    cls = getattr(transformers, fam.config_class)
    assert cls.model_type == model_type and hasattr(transformers, fam.model_class)
    defaults = cls().to_dict()
    fields = (set(inspect.signature(cls.__init__).parameters) | set(defaults) | set(cls.attribute_map)) - {"self", "kwargs"}
    assert fam.known_fields() - {"rope_theta", "rope_scaling", "n_embed"} == fields
    for key, value in fam.shape.items():
        if value is None:  # derived when absent (head_dim, num_key_value_heads): held by the next test
            continue
        assert defaults[key] == value, key


@pytest.mark.parametrize("flavor", TINY)
def test_each_tiny_flavor_builds_and_its_registry_names_are_its_modules(flavor, tmp_path):
    fam = FLAVORS[flavor].family
    config = hf_config(flavor, {}, 300, SpecialIds(1, 2, 0))
    model = build_model(config, seed=0)
    logits = model(input_ids=torch.randint(0, 300, (2, 40))).logits
    assert logits.shape == (2, 40, 300) and torch.isfinite(logits).all()
    modules = [name for name, _ in model.named_modules()]
    for suffix in fam.residual_out:  # a wrong name would silently leave the scratch init unscaled
        assert any(name.endswith(suffix) for name in modules), suffix
    params = dict(model.named_parameters(remove_duplicate=False))
    assert model.get_input_embeddings().weight is params[fam.embedding]
    assert model.get_output_embeddings().weight is params[fam.head]
    assert (params[fam.head] is params[fam.embedding]) == config.tie_word_embeddings
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(torch.all(m.weight == fam.norm_weight_init) for m in norms)
    config.save_pretrained(tmp_path)
    from transformers import AutoConfig

    assert shape_from_dict(fam, base_json(tmp_path)) == _hf_shape(AutoConfig.from_pretrained(tmp_path), fam)


# config.json as the published bases wrote them, before transformers' current names
LEGACY = {
    "mistral-7b-v0.1": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096},
    "mistral-nemo": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 14336, "head_dim": 128,
                     "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
                     "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                     "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
                     "sliding_window": 32768},
    "bloom-560m": {"model_type": "bloom", "n_embed": 1024, "n_layer": 24, "num_attention_heads": 16,
                   "layer_norm_epsilon": 1e-5},
}


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_a_legacy_config_json_reads_as_transformers_reads_it(name, tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(LEGACY[name]))
    fam = FAMILIES[LEGACY[name]["model_type"]]
    assert shape_from_dict(fam, base_json(tmp_path)) == _hf_shape(AutoConfig.from_pretrained(tmp_path), fam)


def _warm(base: Path, **model) -> dict:
    raw = good_raw()
    raw["model"] = {"init": "warm", "base": str(base), **model}
    return raw


@pytest.mark.parametrize("flavor", TINY)
def test_a_warm_start_takes_each_familys_shape_from_its_config_json(flavor, tmp_path):
    config = hf_config(flavor, {}, 300, SpecialIds(1, 2, 0))
    config.save_pretrained(tmp_path)
    cfg = parse_config(_warm(tmp_path))
    assert FLAVORS[cfg.model.flavor].arch == FLAVORS[flavor].arch
    rebuilt = hf_config(cfg.model.flavor, cfg.model.overrides, 300, SpecialIds(1, 2, 0))
    fam = FLAVORS[flavor].family
    assert _hf_shape(rebuilt, fam) == _hf_shape(config, fam)
    if fam.model_type not in ("mistral", "bloom"):  # those keep the NORA recipe's context (FAMILY_FLAVOR)
        assert rebuilt.max_position_embeddings == config.max_position_embeddings


def test_an_unsupported_base_fails_validate_in_one_line(tmp_path, capsys):
    from training.cli import main

    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    for model in ({}, {"flavor": "tiny-mistral"}):
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(_warm(base, **model)))
        assert main(["validate", str(config)]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "gpt2" in line]
        assert len(lines) == 1 and "supported model_type values: mistral, llama, qwen2, qwen3, gemma2, olmo2, bloom" \
            in lines[0], err
        assert "Traceback" not in err


def test_a_family_base_under_another_familys_flavor_is_refused(tmp_path):
    hf_config("tiny-qwen3", {}, 300, SpecialIds(1, 2, 0)).save_pretrained(tmp_path)
    got = problems_of(_warm(tmp_path, flavor="tiny-llama"))
    assert "tiny-llama is a llama flavor but model.base is a qwen3 model" in got["model.flavor"][0]


def test_overrides_are_checked_against_each_familys_fields():
    def override_problems(flavor: str, overrides: dict) -> dict:
        raw = good_raw()
        raw["model"] = {"flavor": flavor, "overrides": overrides}
        return problems_of(raw)

    assert "not a Qwen3Config field" in override_problems("tiny-qwen3", {"mlp_bias": True})["model.overrides.mlp_bias"][0]
    parse_config({**good_raw(), "model": {"flavor": "tiny-llama", "overrides": {"mlp_bias": True}}})
    # Qwen2 has no head_dim: its head size is hidden / heads, always
    assert "not divisible by num_attention_heads" in override_problems("tiny-qwen2", {"hidden_size": 66})["model.overrides"][0]
    # Qwen3's head_dim is its own field: any hidden size goes
    parse_config({**good_raw(), "model": {"flavor": "tiny-qwen3", "overrides": {"hidden_size": 66}}})


def test_an_attention_a_family_cannot_train_with_is_refused():
    raw = good_raw()
    raw["model"] = {"flavor": "tiny-gemma2", "attn_implementation": "sdpa"}
    assert "'tiny-gemma2' is gemma2, which trains with eager" in problems_of(raw)["model.attn_implementation"][0]
    raw["model"]["attn_implementation"] = "auto"
    assert hf_config("tiny-gemma2", {}, 300, SpecialIds(1, 2, 0), "auto")._attn_implementation == "eager"


def test_parsing_a_warm_config_of_any_family_imports_no_torch(tmp_path):
    """`plan`, `submit` and `validate` parse the config first: with a base of each family (its
    config.json read as JSON, overrides checked against the registry) nothing imports torch."""
    paths = []
    for flavor in TINY:
        base = tmp_path / flavor
        hf_config(flavor, {}, 300, SpecialIds(1, 2, 0)).save_pretrained(base)
        config = tmp_path / f"{flavor}.yaml"
        config.write_text(yaml.safe_dump(_warm(base, overrides={"attention_dropout": 0.0})))
        paths.append(str(config))
    code = ("import sys\nfrom training.config import load_config\n"
            f"for p in {paths!r}:\n    load_config(p)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_a_legacy_rope_theta_override_is_applied_not_ignored(tmp_path):
    """transformers ignores rope_theta beside rope_parameters (every RoPE flavor has them): the
    override goes into them, for the built model and for the check against a base."""
    assert hf_config("tiny-llama", {"rope_theta": 5e5}, 300, SpecialIds(1, 2, 0)).rope_parameters["rope_theta"] == 5e5
    hf_config("tiny-llama", {"rope_theta": 5e5}, 300, SpecialIds(1, 2, 0)).save_pretrained(tmp_path)
    assert "model.overrides.rope_parameters" in problems_of(_warm(tmp_path, flavor="tiny-llama"))
    parse_config(_warm(tmp_path, flavor="tiny-llama", overrides={"rope_theta": 5e5}))


@pytest.mark.parametrize("flavor", TINY)
def test_a_family_first_built_under_zero3_builds_and_runs_again_outside_it(flavor):
    """A ZeRO-3 build (training.model.partitioned) in a fresh process, then the same family built
    and run plainly, as an export or a second run in one process does. zero.Init puts back the
    ``__init__`` it saw when a class was created under it; a modeling module first imported there
    loses its kernel decorators' ``__init__`` (transformers ≥ 5.25: Qwen2's attention then fails
    its first forward with no ``_kernel_funcs``), so the build imports it first."""
    code = (
        "import os, torch, deepspeed\n"
        "os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT='0')\n"
        "torch.distributed.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "from training.model.build import SpecialIds, hf_config\n"
        "from training.model import partitioned\n"
        f"config = hf_config({flavor!r}, {{}}, 300, SpecialIds(1, 2, 0))\n"
        "ds = {'train_micro_batch_size_per_gpu': 1, 'zero_optimization': {'stage': 3}}\n"
        "partitioned.build(config, torch.float32, ds)\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_config(config)\n"
        "print(tuple(model(torch.ones(1, 4, dtype=torch.long)).logits.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("(1, 4, 300)"), out.stderr[-2000:]
