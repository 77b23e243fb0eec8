"""Divergence guard: optimizer steps whose loss or gradient norm is not finite.

DeepSpeed's ZeRO optimizers already skip such an update (their overflow check, on for fp32 and
bf16 alike), but said nothing to the trainer, which went on logging ``Infinity`` (not JSON) and
rotated good checkpoints out for diverged ones. Here the count stays on the device (no sync per
step) and is read on logging steps and before saves: a save is withheld while steps since the last
one were non-finite (the last good checkpoint stays ``latest``), and after
``train.max_nonfinite_steps`` such steps the run stops with the step and data position.
"""

from __future__ import annotations

import math

import torch

from norallm.errors import NorallmError
from training import distributed


class DivergenceError(NorallmError):
    """Too many optimizer steps with a non-finite loss or gradient norm."""


class NonFiniteGuard:
    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self._pending = torch.zeros((), dtype=torch.int32, device=device)  # since the last check
        self.total = 0  # in this launch
        self.since_save = 0

    def observe(self, loss_sum: torch.Tensor, grad_norm) -> None:
        """After each optimizer step; ``loss_sum`` on the device, ``grad_norm`` as DeepSpeed gives it."""
        bad = ~torch.isfinite(loss_sum)
        if isinstance(grad_norm, torch.Tensor):
            bad = bad | ~torch.isfinite(grad_norm.to(bad.device))
        elif grad_norm is not None and not math.isfinite(grad_norm):
            bad = torch.ones_like(bad)
        self._pending += bad.to(torch.int32)

    def check(self, step: int, position: str, log) -> int:
        """Read the device count (one sync; the maximum over ranks, so that every rank decides
        alike); warn about new non-finite steps, raise past the limit. Returns the non-finite steps
        since the last save. Collective."""
        new = int(distributed.max_(self._pending))
        self._pending.zero_()
        self.total += new
        self.since_save += new
        if new:
            log(f"[train] warning: {new} step(s) up to step {step} had a non-finite loss or gradient norm; "
                f"DeepSpeed skipped their updates ({self.total} so far, limit train.max_nonfinite_steps = {self.limit})")
        if self.total >= self.limit:
            raise DivergenceError(
                f"training diverged: {self.total} steps with a non-finite loss or gradient norm, the last up to "
                f"step {step} (data position: {position}). No checkpoint was written from the diverged state; "
                "checkpoints/latest names the last good one. Resume from it with a lower train.lr, a longer "
                "train.warmup_steps or tighter train.grad_clip, or inspect the data at that position.")
        return self.since_save

    def saved(self) -> None:
        self.since_save = 0


def finite_or_none(row: dict) -> dict:
    """A metrics row that is valid JSON: non-finite numbers become null, listed under ``nonfinite``."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}
