"""Export a checkpoint to a Hugging Face model dir, and sample from one.

ZeRO 1/2/3 shards are consolidated with DeepSpeed's own ``zero_to_fp32`` reader (no process
group needed); a ZeRO-0 checkpoint, which has no partitions, gives the ``module`` state dict of its
model states. Both read the files as weights only (training.checkpoint.safe_load). The model is built on the
meta device and the weights assigned, so exporting a 7B model needs its weights in memory once,
not twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import torch
import yaml

from data_pipeline.tokenizer import Tokenizer
from norallm.errors import NorallmError
from training.checkpoint.safe_load import load as load_weights
from training.checkpoint.safe_load import refuse_non_weights, weights_only
from training.checkpoint.store import (
    CheckpointError,
    checkpoint_problems,
    health_warning,
    newest,
    step_dirs,
    tokens_at,
)
from training.config import parse_config
from training.model.build import SpecialIds, hf_config
from training.model.families import family

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_checkpoint(path: str | Path, warn=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """A checkpoint dir, or a run dir (its newest checkpoint: the one ``latest`` names, else the
    newest dir); verified either way.

    A run dir whose newest checkpoint does not verify is refused rather than exported from an older
    one: whoever asks for RUN expects its newest model, and an older one exported with exit 0 is
    easily taken for it (a resume, which can only go back in time, does fall back). The error names
    the older checkpoint and the command that exports it. A ``latest`` that is missing or garbled
    only warns: the newest dir is then what a resume would use too."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        newest_dir, pointer_problem = newest(path)
        if newest_dir is None:
            raise NorallmError(f"run dir {path} has no complete checkpoint yet (no checkpoints/latest).")
        problems = checkpoint_problems(newest_dir)
        if problems:
            older = [d for d in step_dirs(path) if d.name < newest_dir.name]
            hint = (f" The newest older checkpoint is {older[-1].name}: to export it, run `norallm export {older[-1]} "
                    "OUT` (it is verified then)." if older else " No older checkpoint is left.")
            raise CheckpointError(f"the newest checkpoint of {path}, {newest_dir.name}, does not verify: "
                                  f"{'; '.join(problems)}. Nothing was exported: a run dir exports its newest "
                                  f"checkpoint or none.{hint}")
        if pointer_problem:
            warn(f"[export] warning: {pointer_problem}; exporting {newest_dir.name}, the newest checkpoint.")
        return newest_dir
    if not (path / "config.yaml").is_file():
        raise NorallmError(f"{path} is neither a checkpoint dir (with config.yaml) nor a run dir (with checkpoints/).")
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} cannot be exported: {'; '.join(problems)}.")
    return path


def export_config(cfg, ids: SpecialIds):
    """The exported model's config.json: the flavor's published shape (a sliding window that the
    training dropped is kept), the tokenizer's special ids (pad as ``model.export_pad_token_id``
    says, when set), and a KV cache for generation."""
    config = hf_config(cfg.model.flavor, cfg.model.overrides, cfg.model_vocab_size, ids, cfg.model.attn_implementation)
    if cfg.model.export_pad_token_id is not None:
        config.pad_token_id = cfg.model.export_pad_token_id
    config.use_cache = True
    return config


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a checkpoint, read as weights only: ZeRO 1–3 consolidated from the fp32
    partitions by ``zero_to_fp32``; ZeRO-0 (no partitions, nothing for zero_to_fp32 to read) the
    ``module`` state dict that DeepSpeed saved whole."""
    from training import distributed

    distributed.use_deepspeed_accelerator(distributed.runtime())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not list(ckpt.glob("*_optim_states.pt")):
        states = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not states:
            raise CheckpointError(f"checkpoint {ckpt} has neither ZeRO optimizer partitions (*_optim_states.pt) "
                                  "nor model states (mp_rank_00_model_states.pt): it is no DeepSpeed checkpoint.")
        module = load_weights(states[0], map_location="cpu")["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    legacy = [f for f in sorted(ckpt.glob("*_optim_states.pt")) if not zipfile.is_zipfile(f)]
    if legacy:  # zero_to_fp32 memory-maps them, which torch can do for zip archives only
        raise CheckpointError(f"{legacy[0]} is in torch's legacy (non-zip) format, which DeepSpeed's zero_to_fp32 "
                              "cannot read (it memory-maps the files); norallm never writes it. Export another "
                              "checkpoint, or re-save the file as a zip archive if you trust it.")
    with weights_only(ckpt), contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every tensor
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def export(checkpoint: str | Path, out: str | Path, dtype: str = "bf16", log=print) -> Path:
    """Write the HF model dir ``out`` from a checkpoint dir or a run dir (``resolve_checkpoint``);
    ``log`` gets the line naming the checkpoint and step exported."""
    from training import distributed

    distributed.use_deepspeed_accelerator(distributed.runtime())  # before transformers looks for DeepSpeed
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    ckpt = resolve_checkpoint(checkpoint)
    refuse_non_weights(ckpt, log=lambda msg: print(msg, file=sys.stderr))
    if (warning := health_warning(ckpt)) is not None:
        print(f"[export] warning: {warning}", file=sys.stderr)
    meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
    tokens = tokens_at(ckpt) if meta else None
    log(f"[export] {ckpt} (step {meta.get('step', '?')}" + (f", {tokens:,} tokens)" if tokens else ")"))
    out = Path(out)
    cfg = parse_config(yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")), str(ckpt / "config.yaml"))
    tokenizer = Tokenizer(ckpt / "tokenizer", kind=cfg.tokenizer.kind)  # the kind it was trained with
    ids = SpecialIds(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    config = export_config(cfg, ids)
    state = fp32_state_dict(ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {family(config.model_type, str(ckpt)).head} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise NorallmError(f"checkpoint {ckpt} does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(result.unexpected_keys)[:5]}.")
    if tied:
        model.tie_weights()
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(ckpt / "tokenizer")).save_pretrained(out)
    shutil.copy2(ckpt / "config.yaml", out / "training_config.yaml")  # how it was trained (eval reads seq_len)
    GenerationConfig(
        bos_token_id=ids.bos, eos_token_id=ids.eos,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else ids.eos,
        do_sample=True, temperature=0.8, top_k=64, top_p=0.9, max_new_tokens=128,
    ).save_pretrained(out)
    _readable_as_umask_allows(out)
    return out


def _readable_as_umask_allows(out: Path) -> None:
    """safetensors writes model.safetensors 0600 (through a temporary file); give every exported file
    the mode a new file gets under the user's umask, so a shared project dir can read the model."""
    umask = os.umask(0)
    os.umask(umask)
    for f in out.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def load_for_generation(model_dir: str | Path):
    """(model, tokenizer) from an exported model dir, fp32 on CPU, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise NorallmError(f"{model_dir} is not an exported model dir (no config.json); run `norallm export` first.")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tok


def _sample(model, tok, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int,
            top_p: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_k=top_k, top_p=top_p,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, input_ids.shape[1]:]


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8,
             top_k: int = 64, top_p: float = 0.9, seed: int = 0) -> str:
    """Sample a continuation of ``prompt`` from an exported model dir; returns prompt + continuation."""
    model, tok = load_for_generation(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    new = _sample(model, tok, ids, max_new_tokens, temperature, top_k, top_p, seed)
    return prompt + tok.decode(new, skip_special_tokens=True)


def chat_reply(model, tok, messages: list[dict], max_new_tokens: int = 200, temperature: float = 0.3,
               top_k: int = 64, top_p: float = 0.9, seed: int = 0) -> str:
    """The assistant's next message, through the exported tokenizer's chat template (NorMistral-
    instruct's suggested sampling: temperature 0.3, top-k 64, top-p 0.9)."""
    if not tok.chat_template:
        raise NorallmError("this model's tokenizer has no chat template; --chat needs an SFT export.")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = _sample(model, tok, ids["input_ids"], max_new_tokens, temperature, top_k, top_p, seed)
    return tok.decode(new, skip_special_tokens=True).strip()
