"""Models built from transformers' own classes, one per family (training.model.families: Mistral,
Llama, Qwen2, Qwen3, Gemma-2, OLMo-2, BLOOM): a flavor to its HF config, the scratch init, the warm start from a base model
(with the vocabulary transplant), activation checkpointing. No transformer is written here;
speed comes from kernels, not a fork of the model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from norallm.errors import NorallmError
from norallm.files import file_hash
from training.model import partitioned
from training.model.families import FAMILIES, FLAVORS, family
from training.model.partitioned import assign


def base_config(base: str | Path):
    """The base model's HF config from its local dir (no network)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError) as e:
        raise NorallmError(f"cannot read the base model's config.json in model.base '{base}': {e}") from None


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int
    pad: int | None


def hf_config(flavor: str, overrides: dict[str, Any], vocab_size: int, ids: SpecialIds,
              attn_implementation: str = "auto"):
    """The transformers config object for a flavor, with overrides applied."""
    import transformers

    spec = FLAVORS[flavor]
    fam = spec.family
    cls = getattr(transformers, fam.config_class)
    kwargs = spec.merged(overrides)
    cfg = cls(vocab_size=vocab_size, bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
              use_cache=False, **kwargs)
    if attn_implementation == "auto":  # resolved per device by the trainer; elsewhere the family's own
        attn_implementation = fam.auto_attention
    if fam.position == "alibi":
        # transformers' BLOOM has eager attention only; training swaps in the fused ALiBi path on the
        # built model (training.model.alibi), so this config, and the export's, stay HF's plain BLOOM
        attn_implementation = "eager"
    elif attn_implementation not in fam.attention:  # validate refuses it first (config_checks)
        raise NorallmError(f"{flavor} is a {fam.model_type} model, which trains with model.attn_implementation "
                           f"{' or '.join(fam.attention)}, not {attn_implementation}.")
    cfg._attn_implementation = attn_implementation
    return cfg


def family_attention(model_cfg, on_gpu: bool) -> str | None:
    """``model.attn_implementation`` as the family resolves it (None: the trainer's own rule for
    ``auto``): BLOOM's is training.model.alibi's; a family that SDPA cannot compute (Gemma-2's
    soft-capped scores) gets its own for ``auto``."""
    from training.model.alibi import bloom_attention

    fam = FLAVORS[model_cfg.flavor].family
    if fam.position == "alibi":
        return bloom_attention(model_cfg, on_gpu)
    if model_cfg.attn_implementation == "auto" and fam.auto_attention != "sdpa":
        return fam.auto_attention
    return None


def drop_unbound_sliding_window(config, seq_len: int) -> None:
    """A sliding window at least as long as the training sequence cannot bind (NorMistral:
    2048/2048, the instruct model 4096/4096), but transformers still builds a dense windowed mask
    for it, which pushes SDPA off its flash kernel and expands GQA's K/V heads. Dropping it is
    exact; the exported ``config.json`` keeps the published value (it is built from the flavor)."""
    if FAMILIES[config.model_type].sliding_window != "whole-model":  # Gemma-2's local layers: kept as built
        return
    window = getattr(config, "sliding_window", None)
    if window is not None and seq_len <= window:
        config.sliding_window = None


def enable_activation_checkpointing(model) -> None:
    """transformers' activation checkpointing of every decoder layer, non-reentrant (it runs in
    train mode only)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def init_scratch(model: torch.nn.Module, arch: str, std: float, seed: int) -> None:
    """The documented scratch init (GPT-2 / Megatron style):

    - every Linear and Embedding weight ~ N(0, std) (std = ``model.init_std``, 0.02 by default);
    - projections that write into the residual stream (the family's ``residual_out``: o_proj,
      down_proj; BLOOM self_attention.dense, dense_4h_to_h) ~ N(0, std / sqrt(2 · layers)), so the
      residual stream's variance does not grow with depth;
    - biases 0; norm weights the identity (1; Gemma's (1 + weight) norms 0), norm biases 0.

    A ZeRO-3-partitioned model (training.model.partitioned) gets the same values: every rank draws
    each whole weight from the same generator and keeps its own partition of it.
    """
    fam = FAMILIES[arch]
    layers = model.config.num_hidden_layers
    residual_std = std / math.sqrt(2 * layers)
    gen = torch.Generator().manual_seed(seed)

    def shape(p: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(getattr(p, "ds_shape", p.shape))

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            is_residual = any(name.endswith(suffix) for suffix in fam.residual_out)
            with torch.no_grad():
                w = torch.randn(shape(module.weight), generator=gen) * (residual_std if is_residual else std)
                assign(module.weight, w)
                if getattr(module, "bias", None) is not None:
                    assign(module.bias, torch.zeros(shape(module.bias)))
        elif "norm" in type(module).__name__.lower():
            with torch.no_grad():
                assign(module.weight, torch.full(shape(module.weight), fam.norm_weight_init))
                if getattr(module, "bias", None) is not None:
                    assign(module.bias, torch.zeros(shape(module.bias)))


def build_model(config, seed: int, std: float = 0.02, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, zero3_config: dict | None = None) -> torch.nn.Module:
    """A model for ``config`` with the scratch init above, built once: allocated directly on
    ``device`` in ``dtype`` with transformers' own init switched off (init_scratch writes every
    weight), so there is no second init and no full fp32 copy on the way to a GPU. The random
    draws come from a CPU generator, so a seed gives the same init on any hardware.

    ``zero3_config`` (ZeRO-3: the engine's DeepSpeed config, every rank together): built as
    partitions under ``deepspeed.zero.Init`` (training.model.partitioned), never whole on a rank."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    if zero3_config is not None:
        model = partitioned.build(config, dtype, zero3_config)
    else:
        with no_init_weights(), torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if config.tie_word_embeddings:  # tied before the init, as transformers' own init leaves them
            model.tie_weights()
    init_scratch(model, config.model_type, std, seed)
    return model


def count_parameters(config) -> int:
    """Parameters of the model for ``config``, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if config.tie_word_embeddings:  # transformers 5.0 leaves a meta model's head untied
            model.tie_weights()
    return sum(p.numel() for p in model.parameters())


def warm_start(base: str, base_tokenizer: str | None, tokenizer, vocab_size: int,
               special_map: dict[str, str], expected, dtype: torch.dtype = torch.float32,
               load_weights: bool = True, device: str | torch.device = "cpu",
               transplant_mode: str = "strings", keep_tokenizer: bool = False,
               zero3_config: dict | None = None) -> tuple[torch.nn.Module, object | None]:
    """The base model in the training ``dtype``, its vocabulary transplanted (training.model.transplant)
    when ``tokenizer`` is not the base's own, or always with ``transplant_mode`` ``mean`` (the
    ablation). Returns the model and the transplant report (or None). ``keep_tokenizer``
    (model.tokenizer_strategy keep): a tokenizer or vocabulary size other than the base's is an
    error, never a transplant.

    ``load_weights=False`` (every rank but 0 under ZeRO-0/1/2): the same model, built empty on
    ``device`` — DeepSpeed broadcasts rank 0's parameters at initialisation — so a job holds one
    host copy of the base instead of one per rank. Every rank reads the base's config.json and
    checks its shape, so a mismatch is the same error everywhere.

    ``zero3_config`` (ZeRO-3: the engine's DeepSpeed config, every rank together): the model is
    built under ``deepspeed.zero.Init`` with it, so each rank holds only its partition from the
    start, and each rank reads its own partition of the base (training.model.partitioned); the
    transplant is done on the partitioned embedding and LM head. Non-persistent buffers (RoPE
    ``inv_freq``) are computed on every rank as the model is built."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from training.model.transplant import transplant

    if not Path(base).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise NorallmError(f"model.base '{base}' is not a local dir and HF_HUB_OFFLINE=1; download the base "
                           "model on a login node and point model.base at it.")
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise NorallmError(f"cannot load the base model from model.base '{base}': {e}") from e
    if family(config.model_type, f"model.base '{base}'").model_type != expected.model_type:
        raise NorallmError(f"model.base '{base}' is a {config.model_type} model but the flavor builds "
                           f"{expected.model_type}; leave model.flavor out to take the base's.")
    for key in ("hidden_size", "num_hidden_layers"):
        if getattr(config, key) != getattr(expected, key):
            raise NorallmError(f"model.base has {key}={getattr(config, key)} but flavor/overrides say "
                               f"{getattr(expected, key)}; choose the flavor that matches the base model.")
    base_tok = Path(base_tokenizer or base)
    same = (base_tok / "tokenizer.json").is_file() and file_hash(base_tok / "tokenizer.json") == tokenizer.fingerprint
    needs_transplant = transplant_mode == "mean" or not (same and config.vocab_size == vocab_size)
    if keep_tokenizer and needs_transplant:  # validate checks it where the base is readable; this is the launch
        raise NorallmError("model.tokenizer_strategy: keep trains on the base's own tokenizer, but "
                           + (f"the tokenizer is not {base_tok}'s" if not same else
                              f"model.vocab_size {vocab_size} is not the base's {config.vocab_size} rows")
                           + "; leave tokenizer.path and model.vocab_size out to take the base's, or choose replace.")
    attn = expected._attn_implementation
    if not load_weights:
        if needs_transplant:
            config.vocab_size = vocab_size
            config.bos_token_id, config.eos_token_id, config.pad_token_id = (
                tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        config._attn_implementation = attn
        with no_init_weights(), torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if config.tie_word_embeddings:
            model.tie_weights()
        return model, None
    if zero3_config is not None:
        config._attn_implementation = attn
        model = partitioned.build(config, dtype, zero3_config)
        partitioned.load_base(model, base)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=attn)
        except OSError as e:
            raise NorallmError(f"cannot load the base model from model.base '{base}': {e}") from e
    if not needs_transplant:
        return model, None
    report = transplant(model, tokenizer, base_tok, special_map, vocab_size, transplant_mode, zero3_config)
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    model.config.pad_token_id = tokenizer.pad_id
    return model, report
