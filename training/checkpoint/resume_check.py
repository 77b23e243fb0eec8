"""What may change when a run resumes (or branches with ``--from-checkpoint``): the checkpoint's
saved config (its ``config.yaml``) against the run's resolved config, before DeepSpeed loads
anything.

- The model's shape (``model.flavor``, ``model.overrides``, the vocabulary size), the ZeRO stage
  and the precision are what the checkpoint's tensors and partitions are: DeepSpeed would fail
  deep inside its load with a traceback. Refused with one line naming each difference.
- Hyperparameters (lr, schedule, global batch, max_steps, warmup, ZeRO buckets and offload, the
  model's speed levers, checkpoint and eval intervals, ...) may change, e.g. for a cooldown
  branch: accepted, with a note listing old → new.

Not compared here: the number of ranks (a resume on another one is supported: training.checkpoint.reshard),
the data (the loader's fingerprint decides: data_pipeline.loader), the model's initialisation
(unused on resume), and ``slurm``/``logging``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from norallm.errors import NorallmError
from training.config import Config

# what the checkpoint's tensors are: a difference is refused
FIXED = ("model.flavor", "model.overrides", "model.vocab_size", "zero.stage", "train.precision")
# what may change, and is noted
NOTED_SECTIONS = ("model", "train", "zero", "checkpoint", "eval")
# not used on resume (the weights come from the checkpoint) or compared elsewhere
IGNORED = ("model.init", "model.init_std", "model.base", "model.base_tokenizer", "model.transplant",
           "model.special_token_map", "train.world_size")


class ResumeMismatchError(NorallmError):
    """The checkpoint was trained with another model shape, ZeRO stage or precision."""


def _leaves(raw: dict) -> dict[str, object]:
    """Dotted path → value for the compared sections (``model.overrides`` is one value)."""
    out: dict[str, object] = {}
    for section in NOTED_SECTIONS:
        for key, value in (raw.get(section) or {}).items():
            out[f"{section}.{key}"] = value
    model, tokenizer = raw.get("model") or {}, raw.get("tokenizer") or {}
    out["model.vocab_size"] = model.get("vocab_size") or tokenizer.get("vocab_size")  # as resolved
    return out


def differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, noted) differences, each ``path: old → new``. A key the saved config lacks (it
    was written by a norallm without it) is not compared."""
    old, new = _leaves(saved), _leaves(current)
    refused, noted = [], []
    for path in sorted(set(old) & set(new)):
        if path in IGNORED or old[path] == new[path]:
            continue
        (refused if path in FIXED else noted).append(f"{path} {old[path]!r} → {new[path]!r}")
    return refused, noted


def check(cfg: Config, checkpoint: Path | None, log=print) -> None:
    """Refuse a resume of ``checkpoint`` into another model shape, ZeRO stage or precision
    (ResumeMismatchError, on every rank alike: each reads the same file); note changed
    hyperparameters through ``log``. A checkpoint without config.yaml is not compared."""
    if checkpoint is None or not (checkpoint / "config.yaml").is_file():
        return
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8")) or {}
    refused, noted = differences(saved, cfg.to_dict())
    if refused:
        raise ResumeMismatchError(
            f"{checkpoint} was trained with {'; '.join(refused)} (checkpoint → this config): a checkpoint resumes "
            "only into the model shape, ZeRO stage and precision that wrote it. Set them back as its config.yaml "
            "has them, or start a new run dir (a new --run-dir; to keep the weights, `norallm export` the "
            "checkpoint and warm-start from it with model.init: warm).")
    if noted:
        log(f"[train] {checkpoint.name} was trained with other settings; continuing with this config's: "
            f"{'; '.join(noted)}")
