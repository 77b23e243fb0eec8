"""The budget plan (`norallm plan`): how many tokens of each source the training budget reads,
how often that repeats each source, steps, disk and GPU-hours — from the shard manifests, or
from declared sizes before the sources are prepared.

Shares: a source with ``share`` gets that fixed fraction of the budget; the others split the
rest by ``weight``, or, without weights, in proportion to their unique tokens (so each of them
repeats equally often, as NORA's Norwegian sources did). Shares become integer weights of the
global order (data_pipeline.mixture), and the per-source counts below are what that order
actually yields, not a rounding of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.mixture import Interleave, integer_weights, window_count


@dataclass(frozen=True)
class SourceBudget:
    """A source (its share, weight, max_epochs) and what was measured of it for the plan."""

    source: SourceConfig
    unique_tokens: int  # train tokens available
    basis: str  # "manifest" (prepared) or "declared" (data.sources[].unique_tokens)
    disk_bytes: int = 0  # shards on disk (measured, or estimated from the declared size)
    removed: dict = field(default_factory=dict)  # manifest "removed": what `norallm dedup` took out


@dataclass
class SourceLine:
    name: str
    language: str
    basis: str
    unique_tokens: int
    share: float  # fraction of the training tokens (as planned, from the configured shares)
    weight: int  # integer weight of the global order (over mixture.WEIGHT_DENOMINATOR)
    windows: int  # distinct samples of seq_len + 1 tokens
    samples: int  # samples read over the whole budget
    tokens: int  # samples × seq_len
    epochs: float  # samples / windows: passes over the source
    max_epochs: float | None
    disk_bytes: int
    removed: dict = field(default_factory=dict)  # reason → documents, tokens (and kept_in: source → documents)


@dataclass
class Plan:
    seq_len: int
    global_batch_size: int
    steps: int
    sources: list[SourceLine]
    gpu_throughput_tokens_per_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.steps * self.global_batch_tokens

    @property
    def disk_bytes(self) -> int:
        return sum(s.disk_bytes for s in self.sources)

    @property
    def gpu_hours(self) -> float | None:
        if not self.gpu_throughput_tokens_per_s:
            return None
        return self.total_tokens / self.gpu_throughput_tokens_per_s / 3600

    def weights(self) -> dict[str, int]:
        return {s.name: s.weight for s in self.sources}

    def to_json(self) -> dict:
        return {
            "total_tokens": self.total_tokens,
            "global_batch_tokens": self.global_batch_tokens,
            "steps": self.steps,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "samples": self.steps * self.global_batch_size,
            "disk_bytes": self.disk_bytes,
            "gpu_throughput_tokens_per_s": self.gpu_throughput_tokens_per_s,
            "gpu_hours": self.gpu_hours,
            "problems": list(self.problems),
            "sources": [asdict(s) for s in self.sources],
        }

    def check(self) -> None:
        """Raise a DataError listing every problem (a source repeated beyond its max_epochs, ...)."""
        if self.problems:
            raise DataError("the data plan does not fit:\n" + "\n".join(f"  - {p}" for p in self.problems))


def shares_of(budgets: list[SourceBudget]) -> list[float]:
    """Each source's fraction of the training tokens (see the module doc)."""
    sources = [b.source for b in budgets]
    fixed = sum(s.share for s in sources if s.share is not None)
    rest = [b for b in budgets if b.source.share is None]
    if any(b.source.weight is not None for b in rest):
        basis = {b.source.name: float(b.source.weight or 0.0) for b in rest}
    else:
        basis = {b.source.name: float(b.unique_tokens) for b in rest}
    total = sum(basis.values())
    return [s.share if s.share is not None else (1 - fixed) * basis[s.name] / total if total else 0.0
            for s in sources]


def make_plan(budgets: list[SourceBudget], seq_len: int, global_batch_size: int, steps: int,
              gpu_throughput_tokens_per_s: float | None = None) -> Plan:
    """The plan for ``steps`` optimizer steps of ``global_batch_size`` sequences of ``seq_len``."""
    if not budgets:
        raise DataError("data.sources is empty: name at least one source.")
    empty = [b for b in budgets if b.unique_tokens <= 0]
    if empty:
        named = ", ".join(f"'{b.source.name}' ({b.basis}: {b.unique_tokens} train tokens)" for b in empty)
        raise DataError(f"source{'s' if len(empty) > 1 else ''} {named} {'have' if len(empty) > 1 else 'has'} no "
                        "training documents: every record was skipped or its files are empty. Rerun `norallm "
                        "prepare` to see what was skipped and fix the files, or remove the source from data.sources "
                        "(a validation-only source takes valid_fraction: 1).")
    shares = shares_of(budgets)
    weights = integer_weights(shares)
    n_samples = steps * global_batch_size
    samples = Interleave(weights).counts(n_samples)
    lines, problems = [], []
    for b, share, w, n in zip(budgets, shares, weights, samples, strict=True):
        s = b.source
        windows = window_count(b.unique_tokens, seq_len)
        epochs = n / windows if windows else float("inf") if n else 0.0
        lines.append(SourceLine(s.name, s.language, b.basis, b.unique_tokens, share, w, windows, n, n * seq_len,
                                epochs, s.max_epochs, b.disk_bytes, b.removed))
        if n and not windows:
            problems.append(f"source '{s.name}' has {b.unique_tokens:,} train tokens, fewer than one sample of "
                            f"{seq_len + 1}; add data or drop its share.")
        elif s.max_epochs is not None and epochs > s.max_epochs:
            most = int(s.max_epochs * windows) * seq_len
            problems.append(
                f"source '{s.name}' would be read {epochs:.2f} times, more than its max_epochs {s.max_epochs:g}: "
                f"{n * seq_len:,} tokens from {b.unique_tokens:,} unique ({b.basis}). Lower train.max_steps, its "
                f"share or weight (at most {most:,} tokens), add data, or raise max_epochs."
            )
    return Plan(seq_len, global_batch_size, steps, lines, gpu_throughput_tokens_per_s, problems)


def _si(x: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(x) < 1000:
            return f"{x:.3g}{unit}"
        x /= 1000
    return f"{x:.3g}P"


def _removed_table(plan: Plan) -> list[str]:
    """Per source, what deduplication and decontamination removed before tokenizing (the unique
    tokens above are what remained), with the sources that hold the kept copies."""
    reasons = ("exact", "near", "contaminated", "contaminated_kept")
    if not any(s.removed for s in plan.sources):
        return []
    rows = [("removed before tokenizing", *reasons, "kept copies in")]
    for s in plan.sources:
        cells = [f"{_si(s.removed[r]['documents'])} docs / {_si(s.removed[r]['tokens'])} tok" if r in s.removed
                 else "-" for r in reasons]
        kept_in: dict[str, int] = {}
        for r in ("exact", "near"):
            for name, n in s.removed.get(r, {}).get("kept_in", {}).items():
                kept_in[name] = kept_in.get(name, 0) + n
        rows.append((s.name, *cells, ", ".join(f"{k} {_si(v)}" for k, v in kept_in.items()) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["", *("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 .rstrip() for r in rows)]
    out.insert(2, "  ".join("-" * w for w in widths))
    return out


def format_plan(plan: Plan) -> str:
    """The plan as a table for people."""
    rows = [("source", "language", "basis", "unique tokens", "share", "tokens", "epochs", "max")]
    for s in plan.sources:
        rows.append((s.name, s.language or "-", s.basis, _si(s.unique_tokens), f"{s.share:.2%}", _si(s.tokens),
                     f"{s.epochs:.2f}", "-" if s.max_epochs is None else f"{s.max_epochs:g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += _removed_table(plan)
    lines += [
        "",
        f"total tokens        {plan.total_tokens:,} ({_si(plan.total_tokens)})",
        f"tokens per step     {plan.global_batch_tokens:,} ({plan.global_batch_size} × {plan.seq_len})",
        f"steps               {plan.steps:,}",
        f"samples             {plan.steps * plan.global_batch_size:,}",
        f"disk (shards)       {plan.disk_bytes / 2**30:,.1f} GiB",
    ]
    if plan.gpu_hours is not None:
        lines.append(f"GPU-hours           {plan.gpu_hours:,.0f} (at {plan.gpu_throughput_tokens_per_s:,.0f} "
                     "tokens/s per GPU, data.gpu_throughput_tokens_per_s)")
    else:
        lines.append("GPU-hours           - (set data.gpu_throughput_tokens_per_s for an estimate)")
    lines += [f"problem: {p}" for p in plan.problems]
    return "\n".join(lines)
