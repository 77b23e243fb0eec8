"""Divergence guard: optimizer steps whose loss or gradient norm is not finite, and finite
blow-ups (a loss spike, a gradient norm that is exactly 0 or explodes).

Non-finite steps: DeepSpeed's ZeRO optimizers already skip such an update (their overflow check,
on for fp32 and bf16 alike), but said nothing to the trainer, which went on logging ``Infinity``
(not JSON) and rotated good checkpoints out for diverged ones. Here the count stays on the device
(no sync per step) and is read on logging steps and before saves: a save is withheld while steps
since the last one were non-finite (the last good checkpoint stays ``latest``), and after
``train.max_nonfinite_steps`` such steps the run stops with the step and data position.

Finite blow-ups pass that check. With lr 1000 a tiny model's loss went 6.25 → 5.2e6 (gradient
norm 4e10) → ln V = 6.238 with a gradient norm of exactly 0 (the model collapsed to uniform
predictions), all finite; the collapsed model was saved and rotated the good checkpoints out. So
each rank also keeps running means of its loss and of the gradient norm on the device (an EMA
over about ``train.anomaly_window_steps`` normal steps; anomalous steps never enter them, so a
blow-up does not become the new normal), and a step is *anomalous* when

- its loss is above ``train.loss_spike_factor`` (4) × the running mean, and by more than 1 nat
  (a small loss, SFT's or a memorised set's, is noisy in relative terms);
- its gradient norm is exactly 0: nothing flows back, the model has collapsed;
- its gradient norm is above ``train.grad_norm_spike_factor`` (100) × its running mean.

The first step has no statistics to compare with and is never anomalous. Normal training, warm-up
and its spikes included, stays far inside these factors: the tiny runs of the tests move by well
under 1.5× from step to step, and warm_vs_scratch's scratch run at lr 2e-3, whose loss spiked to
9.9 at the end of warm-up, rose about 1.4× over its level; the lr 1000 blow-up was 8e5×.

*Trouble* lasts from the first anomalous or non-finite step until ``train.anomaly_window_steps``
normal steps in a row. A step's loss measures the weights the step before left, so trouble first
seen at step t condemns the checkpoint saved at step t − 1 as well (its meta.json is rewritten).
Checkpoints saved in trouble carry ``"healthy": false`` and the reason in meta.json, and
training.checkpoint.store's rotation always keeps the newest healthy checkpoint older than the one it
has just written, so the last checkpoint before the trouble survives any ``keep_last``. After
``train.max_anomalous_steps`` anomalous steps in one stretch of trouble the run stops with a
DivergenceError naming the last healthy checkpoint and the ``--from-checkpoint`` command that
branches from it. A resume does not go back by itself: ``latest`` stays the newest save (a spike
that training recovers from is common, and continuing through it a legitimate choice); a resume
from an unhealthy checkpoint warns and names the last healthy one (training.checkpoint.store.choose).

The detector's running means and the trouble travel in the checkpoint's client state, so a
resume judges its first steps against the run's own history. Decisions are taken on the values
reduced over ranks (the maximum), so every rank decides alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from norallm.errors import NorallmError
from training import distributed
from training.checkpoint import store

MIN_SPIKE_NATS = 1.0  # a spike is also this far above the running mean (see the module docstring)


class DivergenceError(NorallmError):
    """Too many optimizer steps with a non-finite loss or gradient norm, or too many anomalous ones."""


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

    def check(self, step: int, position: str, log, advice: str | None = None) -> int:
        """Read the device count (one sync; the maximum over ranks, so that every rank decides
        alike); warn about new non-finite steps, raise past the limit. Returns the non-finite steps
        since the last save. Collective. ``advice``: where to go back to (DivergenceGuard)."""
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
                f"step {step} (data position: {position}). No checkpoint was written from a non-finite state. "
                + (advice or "checkpoints/latest names the last good one. Resume from it with a lower train.lr, a "
                   "longer train.warmup_steps or tighter train.grad_clip, or inspect the data at that position."))
        return self.since_save

    def saved(self) -> None:
        self.since_save = 0


@dataclass
class Reading:
    """What the detector saw since it was last read (reduced over ranks)."""

    anomalous: int = 0
    spikes: int = 0
    zero_grad: int = 0
    grad_spikes: int = 0
    first: int | None = None  # first step in trouble (anomalous or non-finite)
    last: int | None = None
    worst_loss: float = 0.0
    worst_loss_ratio: float = 0.0
    worst_grad_ratio: float = 0.0

    def kinds(self) -> list[str]:
        return [k for k, n in (("loss_spike", self.spikes), ("grad_norm_zero", self.zero_grad),
                               ("grad_norm_spike", self.grad_spikes)) if n]


_MAXIMA_START = (-math.inf, -1.0, 0.0, 0.0, 0.0)  # -first, last, worst loss, its ratio, worst grad ratio


class AnomalyDetector:
    """Running means of a rank's loss and of the gradient norm, and the anomaly counts, all on the
    device: ``observe`` launches a few scalar kernels and never waits for the device."""

    def __init__(self, loss_factor: float, grad_factor: float, window_steps: int, device: torch.device):
        self.loss_factor, self.grad_factor = loss_factor, grad_factor
        self.alpha = 2.0 / (window_steps + 1)  # an EMA whose weights span about window_steps steps
        zero = dict(dtype=torch.float32, device=device)
        self.loss_mean, self.loss_seen = torch.zeros((), **zero), torch.zeros((), **zero)
        self.grad_mean, self.grad_seen = torch.zeros((), **zero), torch.zeros((), **zero)
        self._host_grad = torch.zeros((), **zero)
        self._false = torch.zeros((), dtype=torch.bool, device=device)
        self._counts = torch.zeros(4, **zero)  # anomalous, spikes, zero grad, grad spikes
        self._maxima = torch.tensor(_MAXIMA_START, **zero)

    def observe(self, step: int, loss: torch.Tensor, grad_norm) -> None:
        """After each optimizer step: ``loss`` this rank's mean loss (on the device), ``grad_norm``
        as DeepSpeed gives it (a device tensor, a float, or None when it computes none)."""
        loss = loss.detach().float()
        if grad_norm is None:
            grad = None
        elif isinstance(grad_norm, torch.Tensor) and grad_norm.device == loss.device:
            grad = grad_norm.detach().float()
        else:  # a host value (a float; a CPU tensor under offload) goes in as a kernel argument: no copy, no sync
            grad = self._host_grad.fill_(float(grad_norm))
        finite = torch.isfinite(loss) if grad is None else torch.isfinite(loss) & torch.isfinite(grad)
        spike = zero_grad = grad_spike = self._false
        if self.loss_factor:
            spike = finite & (self.loss_seen > 0) & (loss > self.loss_factor * self.loss_mean) \
                & (loss > self.loss_mean + MIN_SPIKE_NATS)
        if grad is not None:
            zero_grad = finite & (grad == 0)
            if self.grad_factor:
                grad_spike = finite & (self.grad_seen > 0) & (grad > self.grad_factor * self.grad_mean)
        anomalous = spike | zero_grad | grad_spike
        troubled = anomalous | ~finite
        self._counts += torch.stack([anomalous, spike, zero_grad, grad_spike]).float()
        grad_ratio = torch.where(grad_spike, grad / self.grad_mean, 0.0) if grad is not None else torch.zeros_like(loss)
        seen = torch.stack([torch.where(troubled, -float(step), -math.inf), torch.where(troubled, float(step), -1.0),
                            torch.where(spike, loss, 0.0), torch.where(spike, loss / self.loss_mean, 0.0), grad_ratio])
        torch.maximum(self._maxima, seen, out=self._maxima)
        normal = ~troubled
        self._follow(self.loss_mean, self.loss_seen, loss, normal)
        if grad is not None:
            self._follow(self.grad_mean, self.grad_seen, grad, normal)

    def _follow(self, mean: torch.Tensor, seen: torch.Tensor, x: torch.Tensor, normal: torch.Tensor) -> None:
        moved = torch.where(seen > 0, mean + self.alpha * (x - mean), x)
        mean.copy_(torch.where(normal, moved, mean))
        seen.add_(normal.float())

    def read(self) -> Reading:
        """Counts and extremes since the last read, the maximum over ranks (collective; one sync)."""
        values = distributed.max_(torch.cat([self._counts, self._maxima])).tolist()
        self._counts.zero_()
        self._maxima.copy_(torch.tensor(_MAXIMA_START))
        anomalous, spikes, zero_grad, grad_spikes, neg_first, last, worst, ratio, grad_ratio = values
        troubled = last >= 0
        return Reading(int(anomalous), int(spikes), int(zero_grad), int(grad_spikes),
                       int(-neg_first) if troubled else None, int(last) if troubled else None, worst, ratio, grad_ratio)

    def state_dict(self) -> dict:
        return {"loss_mean": self.loss_mean.item(), "loss_seen": self.loss_seen.item(),
                "grad_mean": self.grad_mean.item(), "grad_seen": self.grad_seen.item()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("loss_mean", "loss_seen", "grad_mean", "grad_seen"):
            getattr(self, name).fill_(float(state[name]))


@dataclass
class Trouble:
    """One stretch of trouble: from its first bad step until enough normal steps in a row."""

    since: int
    last: int
    anomalous: int = 0
    seen: Reading = field(default_factory=Reading)  # accumulated: counts summed, extremes kept

    def add(self, r: Reading) -> None:
        self.last = max(self.last, r.last)
        self.anomalous += r.anomalous
        s = self.seen
        s.spikes, s.zero_grad, s.grad_spikes = s.spikes + r.spikes, s.zero_grad + r.zero_grad, s.grad_spikes + r.grad_spikes
        s.worst_loss, s.worst_loss_ratio = max(s.worst_loss, r.worst_loss), max(s.worst_loss_ratio, r.worst_loss_ratio)
        s.worst_grad_ratio = max(s.worst_grad_ratio, r.worst_grad_ratio)

    def summary(self) -> str:
        s, parts = self.seen, []
        if s.spikes:
            parts.append(f"loss spiked {s.spikes} time(s), up to {s.worst_loss:.4g} ({s.worst_loss_ratio:.3g}× its "
                         "running mean)")
        if s.zero_grad:
            parts.append(f"gradient norm exactly 0 at {s.zero_grad} step(s) (a collapsed model)")
        if s.grad_spikes:
            parts.append(f"gradient norm exploded {s.grad_spikes} time(s), up to {s.worst_grad_ratio:.3g}× its running "
                         "mean")
        return "; ".join(parts) or "non-finite loss or gradient norm"

    def to_dict(self) -> dict:
        return {"since": self.since, "last": self.last, "anomalous": self.anomalous, "seen": vars(self.seen)}

    @classmethod
    def from_dict(cls, raw: dict) -> Trouble:
        return cls(raw["since"], raw["last"], raw["anomalous"], Reading(**raw["seen"]))


class DivergenceGuard:
    """The trainer's one guard: non-finite steps (NonFiniteGuard), finite blow-ups
    (AnomalyDetector), and the health of the checkpoints saved around them."""

    def __init__(self, train_cfg, device: torch.device, run_dir: Path, resumed: Path | None,
                 client_state: dict | None):
        self.lr = train_cfg.lr
        self.limit, self.window = train_cfg.max_anomalous_steps, train_cfg.anomaly_window_steps
        self.nonfinite = NonFiniteGuard(train_cfg.max_nonfinite_steps, device)
        self.detector = AnomalyDetector(train_cfg.loss_spike_factor, train_cfg.grad_norm_spike_factor,
                                        train_cfg.anomaly_window_steps, device)
        self.run_dir = Path(run_dir)
        self.trouble: Trouble | None = None
        saved = (client_state or {}).get("anomaly") or {}
        if "detector" in saved:
            self.detector.load_state_dict(saved["detector"])
        if saved.get("trouble"):
            self.trouble = Trouble.from_dict(saved["trouble"])
        # healthy checkpoints of this trajectory, step → dir: this run's up to the resumed step, and
        # the checkpoint a branch started from (every rank reads the same files, before any save)
        step = int(client_state["step"]) if client_state else -1
        self.healthy = {s: p for s, p in ((store.step_of(p), p) for p in store.step_dirs(self.run_dir))
                        if s <= step and store.is_healthy(p)}
        if resumed is not None and store.is_healthy(resumed):
            self.healthy.setdefault(step, resumed)
        self.last_saved: tuple[int, Path] | None = (step, resumed) if resumed is not None else None
        self._row = Reading()  # for the next metrics row

    @property
    def since_save(self) -> int:
        """Non-finite steps since the last save, as of the last check."""
        return self.nonfinite.since_save

    def observe(self, step: int, loss: torch.Tensor, grad_norm) -> None:
        """After each optimizer step (``loss``: this rank's mean over its micro-batches); no sync."""
        self.nonfinite.observe(loss, grad_norm)
        self.detector.observe(step, loss, grad_norm)

    def check(self, step: int, position: str, log) -> int:
        """Read both guards (collective): warn, mark the checkpoint the trouble condemns, raise past
        either limit. Returns the non-finite steps since the last save (a save is withheld then)."""
        r = self.detector.read()
        if r.first is not None:
            self._absorb(r, log)
        self._row.anomalous += r.anomalous
        self._row.spikes, self._row.zero_grad = self._row.spikes + r.spikes, self._row.zero_grad + r.zero_grad
        self._row.grad_spikes += r.grad_spikes
        since_save = self.nonfinite.check(step, position, log, self.advice())
        if self.trouble is not None and self.trouble.anomalous >= self.limit:
            raise DivergenceError(
                f"training diverged: {self.trouble.anomalous} anomalous steps since step {self.trouble.since} "
                f"({self.trouble.summary()}), the last at step {self.trouble.last} (data position: {position}). "
                + self.advice())
        if self.trouble is not None and step - self.trouble.last >= self.window:
            log(f"[train] training recovered: {step - self.trouble.last} normal steps since step {self.trouble.last}; "
                "checkpoints from here on are healthy")
            self.trouble = None
        return since_save

    def _absorb(self, r: Reading, log) -> None:
        if self.trouble is None:
            self.trouble = Trouble(r.first, r.last)
            # the loss at step t measures the weights of step t - 1: a checkpoint saved there is condemned
            if self.last_saved is not None and self.last_saved[0] == r.first - 1 and r.first - 1 in self.healthy:
                step, path = self.last_saved
                del self.healthy[step]
                if path.parent.parent.resolve() == self.run_dir.resolve():  # never another run's (a branch's origin)
                    if distributed.rank() == 0:
                        store.mark_unhealthy(path, f"step {r.first}, which measured its weights, was in trouble")
                    log(f"[train] {path.name} holds the weights that step {r.first} measured: marked unhealthy")
        self.trouble.add(r)
        if r.anomalous:
            last = self.last_healthy()
            log(f"[train] warning: {r.anomalous} anomalous step(s) up to step {r.last} ({', '.join(r.kinds())}): "
                f"{self.trouble.summary()}; in trouble since step {self.trouble.since} ({self.trouble.anomalous} "
                f"anomalous, limit train.max_anomalous_steps = {self.limit}). Checkpoints saved until "
                f"{self.window} normal steps in a row are marked unhealthy; the last healthy one is "
                f"{last if last else 'none'}.")

    def last_healthy(self) -> Path | None:
        return self.healthy[max(self.healthy)] if self.healthy else None

    def advice(self) -> str:
        """Where to go back to and what to change, for both DivergenceErrors."""
        change = (f"a lower train.lr (now {self.lr:g}), a longer train.warmup_steps or a tighter train.grad_clip, or "
                  "inspect the data at that position")
        last = self.last_healthy()
        if last is None:
            return f"No healthy checkpoint of this run is left to go back to: start over with {change}."
        note = ""
        if self.last_saved is not None and self.healthy.get(self.last_saved[0]) == last:
            note = " (checkpoints/latest names it: a plain resume starts there too)"
        elif self.last_saved is not None and self.last_saved[0] not in self.healthy:
            note = (f" (checkpoints/latest names {self.last_saved[1].name}, saved in the trouble: a plain resume "
                    "would continue from it)")
        return (f"The last healthy checkpoint is {last.resolve()}{note}. Go back to it with `norallm train CONFIG "
                f"--run-dir NEW_RUN_DIR --from-checkpoint {last.resolve()}` and {change}.")

    def health(self) -> dict:
        """For the meta.json of a checkpoint saved now."""
        if self.trouble is None:
            return {"healthy": True}
        return {"healthy": False, "unhealthy": f"saved in trouble since step {self.trouble.since}: "
                                               f"{self.trouble.summary()}"}

    def saved(self, step: int, path: Path) -> None:
        self.nonfinite.saved()
        self.last_saved = (step, path)
        if self.trouble is None:
            self.healthy[step] = path

    def state_dict(self) -> dict:
        """For the checkpoint's client state (reads the device: call at saves only)."""
        return {"detector": self.detector.state_dict(), "trouble": self.trouble.to_dict() if self.trouble else None}

    def row_flags(self) -> dict:
        """``anomalous_steps`` and ``anomaly`` for the next metrics.jsonl row, when there were any."""
        r, self._row = self._row, Reading()
        return {"anomalous_steps": r.anomalous, "anomaly": ",".join(r.kinds())} if r.anomalous else {}


def finite_or_none(row: dict) -> dict:
    """A metrics row that is valid JSON: non-finite numbers become null, listed under ``nonfinite``."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}
