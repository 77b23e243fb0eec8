"""`norallm report RUN_DIR`: PNG plots of a run from metrics.jsonl, eval.jsonl, resumes.jsonl and
harness.jsonl (downstream scores per checkpoint, training.eval.harness).

Each plot has tokens on the x axis (steps on a secondary axis), the raw series faint with an
exponential moving average over it, and a dashed line at every resume. ``summary.png`` puts loss,
validation loss, learning rate and throughput on one page: the file to open first.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from norallm.errors import NorallmError

PLOTS = {  # file → (metric, y label, log scale, smoothed)
    "loss.png": ("loss", "training loss", False, True),
    "lr.png": ("lr", "learning rate", False, False),
    "throughput.png": ("tokens_per_s", "tokens / s (all ranks)", False, True),
    "grad_norm.png": ("grad_norm", "gradient norm", True, True),
}
RESUMES = "resumes.jsonl"  # written by the trainer: one {"step", "world_size"} per resume


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return rows


def _parent(resumes: list[dict]) -> tuple[str, list[dict], int] | None:
    """(name, metrics rows up to the branch step, branch step) of the run a branch continues: the
    trainer records the checkpoint it started from (``from`` in resumes.jsonl)."""
    branch = next((r for r in resumes if r.get("from")), None)
    if branch is None:
        return None
    parent_run = Path(branch["from"]).parent.parent  # RUN/checkpoints/stepNNNNNNNN
    rows = [m for m in _rows(parent_run / "metrics.jsonl") if m.get("step", 0) <= branch["step"]]
    return parent_run.name, rows, branch["step"]


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, started at the first value."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the plots into ``out_dir`` (default RUN_DIR/plots); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics, evals = _rows(run_dir / "metrics.jsonl"), _rows(run_dir / "eval.jsonl")
    if not metrics:
        raise NorallmError(f"{run_dir}/metrics.jsonl is missing or empty: nothing to plot (is this a run dir?).")
    tokens_per_step = metrics[0]["tokens"] / metrics[0]["step"] if metrics[0].get("tokens") else 1.0
    resume_rows = [r for r in _rows(run_dir / RESUMES) if isinstance(r.get("step"), int)]
    resumes = [r["step"] for r in resume_rows if not r.get("from")]
    parent = _parent(resume_rows)  # a branch (--from-checkpoint): the run it continues, up to the branch
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)

    def decorate(ax, ylabel: str, log: bool) -> None:
        ax.set(xlabel="tokens", ylabel=ylabel)
        top = ax.secondary_xaxis("top", functions=(lambda t: t / tokens_per_step, lambda s: s * tokens_per_step))
        top.set_xlabel("step")
        for i, step in enumerate(resumes):
            ax.axvline(step * tokens_per_step, ls="--", lw=0.8, color="grey", label="resumed" if i == 0 else None)
        if parent is not None:
            ax.axvline(parent[2] * tokens_per_step, ls=":", lw=1.0, color="black", label=f"branched from {parent[0]}")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)

    def series(ax, key: str, ylabel: str, log: bool, smooth: bool) -> bool:
        points = [(m["tokens"], m[key]) for m in metrics if m.get(key) is not None and m.get("tokens") is not None]
        if not points:
            return False
        if parent is not None:
            before = [(m["tokens"], m[key]) for m in parent[1] if m.get(key) is not None and m.get("tokens") is not None]
            if before:
                ax.plot(*zip(*before, strict=True), lw=0.9, color="grey", alpha=0.7, label=f"parent: {parent[0]}")
        xs, ys = zip(*points, strict=True)
        if smooth and len(ys) > 2:
            ax.plot(xs, ys, lw=0.8, alpha=0.35, label="raw")
            ax.plot(xs, ema(list(ys)), lw=1.6, label="moving average")
        else:
            ax.plot(xs, ys, lw=1.2)
        decorate(ax, ylabel, log)
        return True

    def eval_curves(ax) -> bool:
        curves: dict[str, list[tuple[float, float]]] = {}
        for e in evals:
            label = "all" if e["source"] == "all" else f"{e['source']} ({e.get('language', '')})"
            curves.setdefault(label, []).append((e["step"] * tokens_per_step, e["loss"]))
        if len(curves) == 2 and "all" in curves:  # one source: "all" repeats it
            curves = {k: v for k, v in curves.items() if k != "all"}
        for label, points in sorted(curves.items()):
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, lw=2 if label == "all" else 1, label=label)
        decorate(ax, "validation loss", False)
        return bool(curves)

    written = []
    for name, (key, label, log, smooth) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        if series(ax, key, label, log, smooth):
            ax.set_title(f"{run_dir.name}: {label}", fontsize=10)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            written.append(out / name)
        plt.close(fig)
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        eval_curves(ax)
        ax.set_title(f"{run_dir.name}: validation loss", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "eval_loss.png", dpi=100)
        plt.close(fig)
        written.append(out / "eval_loss.png")
    harness = _rows(run_dir / "harness.jsonl")
    if harness:
        written.append(_harness_plot(plt, harness, out / "harness.png", run_dir.name))
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    series(axes[0, 0], "loss", "training loss", False, True)
    if not (evals and eval_curves(axes[0, 1])):
        axes[0, 1].set_axis_off()
    series(axes[1, 0], "lr", "learning rate", False, False)
    series(axes[1, 1], "tokens_per_s", "tokens / s (all ranks)", False, True)
    last = metrics[-1]
    fig.suptitle(f"{run_dir.name}: step {last['step']}, {last.get('tokens', 0):,} tokens, "
                 f"loss {last['loss']:.4f}" if last.get("loss") is not None else run_dir.name)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)
    written.insert(0, out / "summary.png")
    return written


def harness_curves(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float, float | None]]]]:
    """task → metric → [(tokens, value, stderr)] by tokens. A task run with several prompts is
    drawn once, by its best prompt (NorEval's aggregation), not once per prompt."""
    best = {r["task"] for r in rows if "aggregate" in r}
    curves: dict[str, dict[str, list]] = {}
    for r in rows:
        if r.get("tokens") is None or ("aggregate" not in r and re.sub(r"_p\d+$", "", r["task"]) in best):
            continue
        label = r["task"] if r.get("num_fewshot") is None else f"{r['task']} ({r['num_fewshot']}-shot)"
        curves.setdefault(label, {}).setdefault(r["metric"], []).append((r["tokens"], r["value"], r.get("stderr")))
    return {t: {m: sorted(p) for m, p in ms.items()} for t, ms in sorted(curves.items())}


def _harness_plot(plt, rows: list[dict], path: Path, title: str) -> Path:
    curves = harness_curves(rows)
    cols = min(3, max(1, len(curves)))
    nrows = max(1, math.ceil(len(curves) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (task, metrics) in zip(axes.flat, curves.items(), strict=False):
        for metric, points in metrics.items():
            xs, ys, errs = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=[e or 0.0 for e in errs], marker="o", ms=3, capsize=2, label=metric)
        ax.set(title=task, xlabel="tokens")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_axis_off()
    fig.suptitle(f"{title}: downstream scores per checkpoint (harness.jsonl)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
