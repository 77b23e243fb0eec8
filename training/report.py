"""`norallm report RUN_DIR`: PNG plots of a run from metrics.jsonl and eval.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.errors import NorallmError

PLOTS = {  # file → (metric, y label, log scale)
    "loss.png": ("loss", "training loss", False),
    "lr.png": ("lr", "learning rate", False),
    "throughput.png": ("tokens_per_s", "tokens / s (all ranks)", False),
    "grad_norm.png": ("grad_norm", "gradient norm", True),
}


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the plots into ``out_dir`` (default RUN_DIR/plots); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics, evals = _rows(run_dir / "metrics.jsonl"), _rows(run_dir / "eval.jsonl")
    if not metrics:
        raise NorallmError(f"{run_dir}/metrics.jsonl is missing or empty: nothing to plot (is this a run dir?).")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (key, label, log) in PLOTS.items():
        points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*points, strict=True), lw=1)
        ax.set(xlabel="step", ylabel=label, title=f"{run_dir.name}: {label}")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        curves: dict[str, list[tuple[int, float]]] = {}
        for e in evals:
            label = "all" if e["source"] == "all" else f"{e['source']} ({e.get('language', '')})"
            curves.setdefault(label, []).append((e["step"], e["loss"]))
        for label, points in sorted(curves.items()):
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, lw=2 if label == "all" else 1, label=label)
        ax.set(xlabel="step", ylabel="validation loss", title=f"{run_dir.name}: validation loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "eval_loss.png", dpi=100)
        plt.close(fig)
        written.append(out / "eval_loss.png")
    return written
