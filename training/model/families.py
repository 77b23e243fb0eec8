"""Model families and flavors, as plain data: importing this needs neither torch nor transformers,
so that parsing a config (training.config_checks) and `norallm plan`/`submit` stay light.

A *family* is an architecture transformers builds, named by its ``model_type`` (``mistral``,
``llama``, ``qwen2``, ``qwen3``, ``gemma2``, ``olmo2``, ``bloom``): what norallm must know of it
to build, warm-start, scratch-init, speed up and export it is one ``Family`` record here, so a
new family is one entry, not a branch in every module. A *flavor* is a named shape of one family.
The tiny flavors are what tests train; the 7B ones are the NORA recipes (NORA.md): NorMistral-7B
is Mistral-7B-v0.1's shape with the 32,768-entry tokenizer, NorBLOOM-7B the published 32-layer
BLOOM (``norbloom-7b``; ``bloom-7b`` is BLOOM-7b1's 30 layers). training.model.build turns a
flavor into a transformers config and model (the class names here are resolved there).

A base model's config.json is read here as JSON (``shape_from_json``), its absent fields filled
with the transformers defaults recorded per family; tests/test_families.py holds those records
to the installed transformers, so a drift is a failing test, not a silent mis-build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from norallm.errors import NorallmError

# Fields every transformers config has (PretrainedConfig's own, and what every family names alike).
_COMMON_FIELDS = frozenset({
    "_name_or_path", "architectures", "attention_dropout", "bos_token_id", "chunk_size_feed_forward", "dtype",
    "eos_token_id", "hidden_size", "id2label", "initializer_range", "is_encoder_decoder", "label2id",
    "model_type", "num_attention_heads", "num_hidden_layers", "output_attentions", "output_hidden_states",
    "pad_token_id", "problem_type", "return_dict", "tie_word_embeddings", "transformers_version", "use_cache",
    "vocab_size",
})
# Names transformers still maps onto the current ones when it reads a config.
_LEGACY_FIELDS = frozenset({"rope_theta", "rope_scaling"})
_DECODER = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
_ROPE_DEFAULT = {"rope_type": "default", "rope_theta": 10_000.0}
_SWIGLU_RESIDUAL = ("o_proj", "down_proj")
# The attention kernels a RoPE decoder trains with through transformers' own attention interface.
_HF_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention")


@dataclass(frozen=True)
class Family:
    """What norallm needs to know of one transformers architecture."""

    model_type: str  # config.json's model_type
    config_class: str  # transformers class names, resolved lazily (training.model.build)
    model_class: str
    fields: frozenset[str]  # the config's own fields beyond _COMMON_FIELDS (model.overrides is checked against them)
    # What makes a checkpoint one shape: the fields a warm start takes from (or checks against) the
    # base model's config.json; with the transformers default of each, for a config.json without it.
    shape: dict[str, Any]
    head_dim: str  # "derived": hidden/heads unless given; "fixed": always hidden/heads; "explicit": its own field
    embedding: str  # the input embedding's parameter name
    head: str  # the LM head's parameter name (the embedding's, when tie_word_embeddings)
    residual_out: tuple[str, ...]  # projections writing into the residual stream (scaled by the scratch init)
    norm_weight_init: float = 1.0  # Gemma's RMSNorm multiplies by (1 + weight): its identity is 0
    position: str = "rope"  # "rope" or "alibi"
    gqa: bool = True  # num_key_value_heads < num_attention_heads is built
    # "whole-model": one window on every layer (dropped when it cannot bind); "interleaved":
    # alternating local and global layers, part of the shape; None: no sliding window
    sliding_window: str | None = None
    attention: tuple[str, ...] = _HF_ATTENTION  # model.attn_implementation values it trains with
    auto_attention: str = "sdpa"  # what model.attn_implementation auto becomes (BLOOM: training.model.alibi)
    liger: str | None = None  # liger_kernel.transformers' apply function for it (None: no kernels)
    liger_kwargs: dict[str, bool] = field(default_factory=dict)
    layers_key: str = "num_hidden_layers"
    heads_key: str = "num_attention_heads"
    aliases: dict[str, str] = field(default_factory=dict)  # legacy config.json names → the field

    def known_fields(self) -> frozenset[str]:
        return _COMMON_FIELDS | self.fields | _LEGACY_FIELDS | frozenset(self.aliases)


def _rope_family(model_type: str, prefix: str, fields: tuple[str, ...], shape: dict[str, Any], **rules) -> Family:
    return Family(model_type=model_type, config_class=f"{prefix}Config", model_class=f"{prefix}ForCausalLM",
                  fields=frozenset(fields), shape=shape, embedding="model.embed_tokens.weight",
                  head="lm_head.weight", residual_out=_SWIGLU_RESIDUAL, **rules)


_SWIGLU_LIGER = {"rope": True, "rms_norm": True, "swiglu": True}
_LLAMA_SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                "rope_parameters": _ROPE_DEFAULT, "attention_bias": False, "mlp_bias": False,
                "tie_word_embeddings": False}

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _rope_family("mistral", "Mistral",
                 ("head_dim", "hidden_act", "intermediate_size", "max_position_embeddings", "num_key_value_heads",
                  "rms_norm_eps", "rope_parameters", "sliding_window"),
                 {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                  "rope_parameters": _ROPE_DEFAULT, "tie_word_embeddings": False},
                 head_dim="derived", sliding_window="whole-model", liger="apply_liger_kernel_to_mistral",
                 liger_kwargs=_SWIGLU_LIGER),
    _rope_family("llama", "Llama",
                 ("attention_bias", "head_dim", "hidden_act", "intermediate_size", "max_position_embeddings",
                  "mlp_bias", "num_key_value_heads", "pretraining_tp", "rms_norm_eps", "rope_parameters"),
                 _LLAMA_SHAPE, head_dim="derived", liger="apply_liger_kernel_to_llama", liger_kwargs=_SWIGLU_LIGER),
    _rope_family("qwen2", "Qwen2",
                 ("hidden_act", "intermediate_size", "layer_types", "max_position_embeddings", "max_window_layers",
                  "num_key_value_heads", "rms_norm_eps", "rope_parameters", "sliding_window", "use_sliding_window"),
                 {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                  "rope_parameters": _ROPE_DEFAULT, "use_sliding_window": False, "tie_word_embeddings": False},
                 head_dim="fixed", liger="apply_liger_kernel_to_qwen2", liger_kwargs=_SWIGLU_LIGER),
    _rope_family("qwen3", "Qwen3",
                 ("attention_bias", "head_dim", "hidden_act", "intermediate_size", "layer_types",
                  "max_position_embeddings", "max_window_layers", "num_key_value_heads", "rms_norm_eps",
                  "rope_parameters", "sliding_window", "use_sliding_window"),
                 {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                  "rope_parameters": _ROPE_DEFAULT, "attention_bias": False, "use_sliding_window": False,
                  "tie_word_embeddings": False},
                 head_dim="explicit", liger="apply_liger_kernel_to_qwen3", liger_kwargs=_SWIGLU_LIGER),
    # Gemma-2: tied embeddings scaled by sqrt(hidden), (1 + weight) norms, soft-capped attention
    # and logits (which SDPA cannot do: transformers builds Gemma-2 with eager, FA2 or flex only),
    # local/global layers alternating (the window is part of the shape)
    _rope_family("gemma2", "Gemma2",
                 ("attention_bias", "attn_logit_softcapping", "final_logit_softcapping", "head_dim",
                  "hidden_activation", "intermediate_size", "layer_types", "max_position_embeddings",
                  "num_key_value_heads", "query_pre_attn_scalar", "rms_norm_eps", "rope_parameters", "sliding_window",
                  "use_bidirectional_attention"),
                 {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                  "rms_norm_eps": 1e-6, "rope_parameters": _ROPE_DEFAULT, "attention_bias": False,
                  "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256,
                  "sliding_window": 4096, "tie_word_embeddings": True},
                 head_dim="explicit", norm_weight_init=0.0, sliding_window="interleaved",
                 attention=("eager", "flash_attention_2", "flex_attention"), auto_attention="eager",
                 liger="apply_liger_kernel_to_gemma2", liger_kwargs={"rope": True, "rms_norm": True, "geglu": True}),
    _rope_family("olmo2", "Olmo2",
                 ("attention_bias", "hidden_act", "intermediate_size", "max_position_embeddings",
                  "num_key_value_heads", "rms_norm_eps", "rope_parameters"),
                 {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": None, "hidden_act": "silu", "rms_norm_eps": 1e-5,
                  "rope_parameters": _ROPE_DEFAULT, "attention_bias": False, "tie_word_embeddings": False},
                 head_dim="fixed", liger="apply_liger_kernel_to_olmo2", liger_kwargs=_SWIGLU_LIGER),
    # BLOOM: ALiBi (no positions to outgrow), LayerNorm, tied embeddings; transformers builds it
    # eager only, and training swaps in norallm's fused ALiBi attention (training.model.alibi)
    Family(model_type="bloom", config_class="BloomConfig", model_class="BloomForCausalLM",
           fields=frozenset({"apply_residual_connection_post_layernorm", "hidden_dropout", "layer_norm_epsilon",
                             "n_head", "n_layer", "pretraining_tp", "slow_but_exact"}),
           shape={"hidden_size": 64, "n_layer": 2, "n_head": 8, "layer_norm_epsilon": 1e-5,
                  "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": True},
           head_dim="fixed", embedding="transformer.word_embeddings.weight", head="lm_head.weight",
           residual_out=("self_attention.dense", "dense_4h_to_h"), position="alibi", gqa=False,
           attention=("sdpa", "flex_attention", "eager"), auto_attention="sdpa", layers_key="n_layer",
           heads_key="n_head", aliases={"n_embed": "hidden_size", "num_hidden_layers": "n_layer",
                                        "num_attention_heads": "n_head"}),
)}


def family(model_type: object, where: str) -> Family:
    """The family named ``model_type``; an unknown one is an error naming ``where`` it came from
    and the families norallm builds."""
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    raise NorallmError(f"{where} is a {model_type!r} model, which norallm does not build; supported model_type "
                       f"values: {', '.join(FAMILIES)}.")


@dataclass(frozen=True)
class Flavor:
    arch: str  # the family's model_type
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    def merged(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The flavor's config with ``overrides`` over it. A legacy ``rope_theta`` (or
        ``rope_scaling``) override goes into the flavor's ``rope_parameters``: transformers reads
        the legacy names only without ``rope_parameters``, so given beside the flavor's they
        would be silently ignored."""
        config = {**self.config, **overrides}
        legacy = {k: overrides[k] for k in ("rope_theta", "rope_scaling") if k in overrides}
        if legacy and "rope_parameters" not in overrides and isinstance(self.config.get("rope_parameters"), dict):
            for key in legacy:
                config.pop(key)
            scaling = dict(legacy.get("rope_scaling") or {})
            if "type" in scaling:
                scaling.setdefault("rope_type", scaling.pop("type"))
            config["rope_parameters"] = {**self.config["rope_parameters"], **scaling,
                                         **({"rope_theta": float(legacy["rope_theta"])} if "rope_theta" in legacy else {})}
        return config

    def max_positions(self, overrides: dict[str, Any]) -> int | None:
        """Longest sequence the flavor supports (None: ALiBi has no learned limit)."""
        if self.family.position == "alibi":
            return None
        return int(self.merged(overrides).get("max_position_embeddings", 2048))


def _tiny(arch: str, **config) -> Flavor:
    """A test-sized flavor: 2 layers, hidden 64, 4 heads over 2 KV heads, 1024 positions."""
    return Flavor(arch, {**dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                                rope_parameters=_MISTRAL_ROPE, tie_word_embeddings=False), **config})


_MISTRAL_ROPE = {"rope_type": "default", "rope_theta": 10_000.0}

FLAVORS: dict[str, Flavor] = {
    "tiny-mistral": _tiny("mistral", sliding_window=None),
    # Mistral-Nemo's shape rule in small: head_dim (32) is not hidden / heads (16)
    "tiny-mistral-nemo": _tiny("mistral", sliding_window=None, head_dim=32),
    "tiny-llama": _tiny("llama"),
    "tiny-qwen2": _tiny("qwen2", tie_word_embeddings=True),  # Qwen2.5-0.5B ties its embeddings
    "tiny-qwen3": _tiny("qwen3", head_dim=16),
    # a 32-token window on the local layers: at the tests' 64-token sequences it binds
    "tiny-gemma2": Flavor("gemma2", dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=32, max_position_embeddings=1024,
        rope_parameters=_MISTRAL_ROPE, tie_word_embeddings=True,
    )),
    "tiny-olmo2": _tiny("olmo2"),
    "mistral-7b": Flavor("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_parameters=_MISTRAL_ROPE, sliding_window=2048, tie_word_embeddings=False,
    )),
    # Mistral-Nemo-Base-2407 (NorMistral-11B's base): head_dim 128 with hidden 5120 over 32 heads
    "mistral-nemo-12b": Flavor("mistral", dict(
        hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, sliding_window=None,
        tie_word_embeddings=False,
    )),
    "tiny-bloom": Flavor("bloom", dict(hidden_size=64, n_layer=2, n_head=4)),
    "bloom-7b": Flavor("bloom", dict(hidden_size=4096, n_layer=30, n_head=32)),  # BLOOM-7b1's shape
    # NorBLOOM-7b-scratch's published config.json: 32 layers (6,578,388,992 parameters at 32,768 rows)
    "norbloom-7b": Flavor("bloom", dict(hidden_size=4096, n_layer=32, n_head=32)),
}

# The flavor a base model's shape goes over, per family (its shape fields become overrides):
# Mistral and BLOOM keep the NORA recipes' context and window; a family without a recipe flavor
# goes over its tiny one, and takes the base's context length too (``flavor_from_json``).
FAMILY_FLAVOR = {"mistral": "mistral-7b", "bloom": "bloom-7b", "llama": "tiny-llama", "qwen2": "tiny-qwen2",
                 "qwen3": "tiny-qwen3", "gemma2": "tiny-gemma2", "olmo2": "tiny-olmo2"}


def is_bloom(flavor: object) -> bool:
    """Whether ``flavor`` names a BLOOM flavor (False for an unknown name or a non-string)."""
    return isinstance(flavor, str) and flavor in FLAVORS and FLAVORS[flavor].arch == "bloom"


def _rope(config: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters of a config dict, from ``rope_parameters`` or the legacy ``rope_theta`` and
    ``rope_scaling`` (Llama-3.1's ``llama3`` scaling is kept whole: it changes every rotation)."""
    if isinstance(config.get("rope_parameters"), dict):
        rope = dict(config["rope_parameters"])
    else:
        scaling = dict(config.get("rope_scaling") or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        rope = {"rope_type": "default", **scaling}
        if "rope_theta" in config:
            rope["rope_theta"] = config["rope_theta"]
    rope.setdefault("rope_theta", default["rope_theta"])
    rope["rope_theta"] = float(rope["rope_theta"])
    return rope


def shape_from_dict(fam: Family, config: dict[str, Any]) -> dict[str, Any]:
    """The shape fields of a config dict (a config.json's, or a flavor's with overrides), each field
    absent from it the transformers default, legacy names read as transformers reads them."""
    config = {fam.aliases.get(k, k): v for k, v in config.items()}
    out = {k: config.get(k, default) for k, default in fam.shape.items()}
    if "rope_parameters" in out:
        out["rope_parameters"] = _rope(config, fam.shape["rope_parameters"])
    if "num_key_value_heads" in out and out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    if fam.head_dim == "derived" and out.get("head_dim") is None:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out


def base_json(base: str | Path) -> dict[str, Any]:
    """A base model dir's config.json, as JSON (no transformers, no torch)."""
    path = Path(base) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NorallmError(f"cannot read the base model's config.json in model.base '{base}': {e}") from None
    if not isinstance(config, dict):
        raise NorallmError(f"{path} is not a JSON object; download the base again.")
    return config


def flavor_from_json(base: str | Path) -> tuple[str, dict[str, Any]]:
    """(flavor, overrides) that build the base's shape from its config.json: a warm start need
    not restate it. An unknown model_type is an error listing the supported ones."""
    config = base_json(base)
    fam = family(config.get("model_type"), f"model.base '{base}'")
    if fam.model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise NorallmError(f"model.base '{base}' uses Qwen's per-layer sliding window (use_sliding_window: true), "
                           "which norallm does not lay out; warm-start a base without it.")
    flavor = FAMILY_FLAVOR[fam.model_type]
    shape = shape_from_dict(fam, config)
    if fam.model_type not in ("mistral", "bloom") and "max_position_embeddings" in config:
        shape["max_position_embeddings"] = config["max_position_embeddings"]
    return flavor, shape
