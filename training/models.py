"""Model flavors built from transformers' MistralForCausalLM and BloomForCausalLM.

A flavor is a named shape. The tiny ones are what tests train; the 7B ones are the NORA recipes
(NORA.md): NorMistral-7B is Mistral-7B-v0.1's shape with the 32,768-entry tokenizer, NorBLOOM-7B
BLOOM-7b1's. No transformer is written here; speed comes from kernels, not a fork of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Flavor:
    arch: str  # "mistral" or "bloom"
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
    "bloom-7b": Flavor("bloom", dict(hidden_size=4096, n_layer=30, n_head=32)),
}


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int
    pad: int | None


def hf_config(flavor: str, overrides: dict[str, Any], vocab_size: int, ids: SpecialIds,
              attn_implementation: str = "sdpa"):
    """The transformers config object for a flavor, with overrides applied."""
    from transformers import BloomConfig, MistralConfig

    spec = FLAVORS[flavor]
    cls = MistralConfig if spec.arch == "mistral" else BloomConfig
    kwargs = {**spec.config, **overrides}
    cfg = cls(vocab_size=vocab_size, bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
              use_cache=False, **kwargs)
    cfg._attn_implementation = attn_implementation if spec.arch == "mistral" else "eager"
    return cfg


def build_model(config, seed: int) -> torch.nn.Module:
    """A randomly initialised model (transformers' init: normal(0, initializer_range))."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def count_parameters(config) -> int:
    """Parameters of the model for ``config``, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
