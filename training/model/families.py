"""Model families and flavors, as plain data: importing this needs neither torch nor transformers,
so that parsing a config (training.config_checks) and `norallm plan`/`submit` stay light.

A *family* is an architecture transformers builds (``mistral``, ``bloom``); a *flavor* is a named
shape of one family. The tiny flavors are what tests train; the 7B ones are the NORA recipes
(NORA.md): NorMistral-7B is Mistral-7B-v0.1's shape with the 32,768-entry tokenizer, NorBLOOM-7B
the published 32-layer BLOOM (``norbloom-7b``; ``bloom-7b`` is BLOOM-7b1's 30 layers).
training.model.build turns a flavor into a transformers config and model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Flavor:
    arch: str  # the family: "mistral" or "bloom"
    config: dict[str, Any] = field(default_factory=dict)

    def max_positions(self, overrides: dict[str, Any]) -> int | None:
        """Longest sequence the flavor supports (None: ALiBi has no learned limit)."""
        if self.arch == "bloom":
            return None
        return int({**self.config, **overrides}.get("max_position_embeddings", 2048))


_MISTRAL_ROPE = {"rope_type": "default", "rope_theta": 10_000.0}

FLAVORS: dict[str, Flavor] = {
    "tiny-mistral": Flavor("mistral", dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_parameters=_MISTRAL_ROPE, sliding_window=None, tie_word_embeddings=False,
    )),
    "mistral-7b": Flavor("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_parameters=_MISTRAL_ROPE, sliding_window=2048, tie_word_embeddings=False,
    )),
    "tiny-bloom": Flavor("bloom", dict(hidden_size=64, n_layer=2, n_head=4)),
    "bloom-7b": Flavor("bloom", dict(hidden_size=4096, n_layer=30, n_head=32)),  # BLOOM-7b1's shape
    # NorBLOOM-7b-scratch's published config.json: 32 layers (6,578,388,992 parameters at 32,768 rows)
    "norbloom-7b": Flavor("bloom", dict(hidden_size=4096, n_layer=32, n_head=32)),
}


# What makes a checkpoint one shape: the fields a warm start takes from (or checks against) the
# base model's config.json. Context length and sliding window are the recipe's, not the base's.
SHAPE_KEYS = {
    "mistral": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings"),
    "bloom": ("hidden_size", "n_layer", "n_head", "layer_norm_epsilon", "tie_word_embeddings"),
}

# The flavor a base model's shape goes over, per family (its shape fields become overrides).
FAMILY_FLAVOR = {"mistral": "mistral-7b", "bloom": "bloom-7b"}

# Output projections that write into the residual stream, per family (the scratch init scales them).
RESIDUAL_OUT = {"mistral": ("o_proj", "down_proj"), "bloom": ("self_attention.dense", "dense_4h_to_h")}


def is_bloom(flavor: object) -> bool:
    """Whether ``flavor`` names a BLOOM flavor (False for an unknown name or a non-string)."""
    return isinstance(flavor, str) and flavor in FLAVORS and FLAVORS[flavor].arch == "bloom"


def shape_of(config) -> dict[str, Any]:
    """The SHAPE_KEYS values of an HF config object (rope theta read from ``rope_parameters``)."""
    arch = config.model_type
    out = {k: getattr(config, k, None) for k in SHAPE_KEYS.get(arch, ())}
    if "rope_theta" in out:
        out["rope_theta"] = float((getattr(config, "rope_parameters", None) or {}).get(
            "rope_theta", getattr(config, "rope_theta", 10_000.0)))
    return out
