"""The NORA warm-start claim in miniature: does a model trained on another language, moved onto a
new Norwegian tokenizer by the vocabulary transplant, learn Norwegian faster than the same
architecture from scratch? Everything goes through the command line (`norallm tokenizer`,
`prepare`, `train`, `export`, `eval`, each a subprocess), on the CPU.

    python bench/warm_vs_scratch.py          # ~20 min on 2 cores: bench/results/warm_vs_scratch_cpu.{json,md,png}
    python bench/warm_vs_scratch.py --tiny   # the same steps at toy sizes (a minute), results in a temp dir

1. **Base**: a small Mistral (SHAPE below) trained by norallm on text that is not Norwegian and
   is on any machine with the venv: the METADATA files of the installed packages (English prose:
   package descriptions and READMEs) and the standard library's top-level modules (Python), with
   its own byte-level BPE; exported with `norallm export --dtype bf16`, an HF dir as
   Mistral-7B-v0.1 is published.
2. **Norwegian BPE** of the same size, trained on ``../shared/data/norwegian/train.jsonl``.
3. **Four runs** on that file, identical (data order, steps, tokens, schedule, seed) but for:
   ``scratch``; ``warm`` (``model.init: warm`` + the vocabulary transplant); ``warm_mean`` (every
   embedding and LM-head row the mean base row: ``model.transplant: mean``, the ablation);
   ``warm_frozen`` (the transplant, then ``train.frozen_body_steps`` with only embeddings and LM
   head training, as NORA-11B did).
4. **Held-out loss** on ``../shared/data/norwegian/dev.jsonl``, which no run trains on: each run
   checkpoints at EVAL_STEPS; each checkpoint is exported and scored whole by `norallm eval`
   (the same Norwegian tokenizer for all four, so the losses compare). The trainer's own eval
   (every few steps, from step 0, on the 2 % of train.jsonl its hash hold-out keeps out of
   training) gives the dense curve in the plot's second panel.

The work dirs live in a temp dir (``--work`` to choose one, ``--keep`` to keep it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
NORWEGIAN = REPO.parent / "shared" / "data" / "norwegian"

# ~5M parameters at 4,096 rows: 2.9M in the body, 2.1M in the (untied) embedding and LM head.
SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}


class Sizes:
    """Steps and token counts of one invocation (``--tiny``: the same steps at toy sizes)."""

    def __init__(self, tiny: bool):
        self.shape = TINY_SHAPE if tiny else SHAPE
        self.vocab_size = 1024 if tiny else 4096
        self.seq_len = 64 if tiny else 256
        self.global_batch_size = 4 if tiny else 16  # 4,096 tokens a step at full size
        self.base_steps = 6 if tiny else 500
        self.steps = 8 if tiny else 200  # per Norwegian run: 819,200 tokens, ~1 epoch of train.jsonl
        self.eval_steps = (4, 8) if tiny else (25, 50, 100, 200)
        self.warmup_steps = 2 if tiny else 20
        self.frozen_body_steps = 2 if tiny else 20
        self.heldout_every = 2 if tiny else 10

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


RUNS = {
    "scratch": "scratch init",
    "warm": "warm + vocabulary transplant",
    "warm_mean": "warm, every row the mean (transplant off)",
    "warm_frozen": "warm + transplant + frozen body first",
}


def run_overrides(name: str, sizes: Sizes, base_dir: Path) -> dict:
    """What sets a run apart from the other three: its init, and for one the frozen-body stage."""
    if name == "scratch":
        return {"model": {"init": "scratch"}}
    extra = {"model": {"init": "warm", "base": str(base_dir)}}
    if name == "warm_mean":
        extra["model"]["transplant"] = "mean"
    if name == "warm_frozen":
        extra["train"] = {"frozen_body_steps": sizes.frozen_body_steps}
    return extra


def english_sources() -> list[dict]:
    """Prose and code that ship with the venv: package METADATA (descriptions, READMEs) and the
    standard library's top-level modules, half the tokens each. norallm's own METADATA is left
    out: it embeds this project's README, which quotes Norwegian and changes with the project.
    Which packages are installed varies by machine; the results list them."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    metadata = sorted(str(p) for p in purelib.glob("*.dist-info/METADATA")
                      if not p.parent.name.startswith("norallm-"))
    return [
        # 138 files at 2 % would hold out none; 5 % gives the base a held-out prose loss too
        {"name": "prose", "language": "en", "format": "files", "paths": metadata, "valid_fraction": 0.05},
        {"name": "code", "language": "code", "format": "files", "paths": [str(stdlib / "*.py")], "share": 0.5},
    ]


def config(name: str, sizes: Sizes, tokenizer: Path, shards: Path, sources: list[dict], max_steps: int,
           lr: float) -> dict:
    """One run's config: every run of the comparison is this, plus its RUNS entry."""
    return {
        "name": name, "seed": 1234,
        "model": {"flavor": "tiny-mistral", "overrides": dict(sizes.shape)},
        "tokenizer": {"path": str(tokenizer), "train": True, "vocab_size": sizes.vocab_size},
        "data": {"sources": sources, "shards_dir": str(shards), "seq_len": sizes.seq_len, "valid_fraction": 0.02},
        "train": {"global_batch_size": sizes.global_batch_size, "micro_batch_size": sizes.global_batch_size,
                  "max_steps": max_steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": sizes.warmup_steps,
                  "schedule": "cosine", "weight_decay": 0.1, "grad_clip": 1.0, "precision": "fp32"},
        # ZeRO-2 on one rank, as the recipes use it; `norallm export` reads ZeRO-1/2/3 checkpoints
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": min(sizes.eval_steps), "keep_last": max_steps // min(sizes.eval_steps)},
        "eval": {"every_steps": sizes.heldout_every, "max_samples": 64},
        "logging": {"every_steps": 10},
    }


def merged(raw: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(raw))
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


class Cli:
    """`norallm` subcommands as subprocesses of this interpreter; each one's output goes to a log
    file as it runs (stdout, which the caller gets back, and stderr apart), whose tail is printed
    if the command fails."""

    def __init__(self, work: Path):
        self.work = work
        self.env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "WANDB_MODE": "disabled"}
        self.seconds: dict[str, float] = {}

    def __call__(self, label: str, *args: str) -> str:
        log, err = self.work / "logs" / f"{label}.log", self.work / "logs" / f"{label}.err"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log, "w", encoding="utf-8") as out, open(err, "w", encoding="utf-8") as errors:
            proc = subprocess.run([sys.executable, "-m", "training.cli", *args], cwd=REPO, env=self.env,
                                  stdout=out, stderr=errors)
        self.seconds[label] = round(time.monotonic() - t0, 1)
        if proc.returncode != 0:
            tail = "\n".join((log.read_text(encoding="utf-8") + err.read_text(encoding="utf-8")).splitlines()[-30:])
            sys.exit(f"`norallm {' '.join(args)}` failed (exit {proc.returncode}); {log}, {err}:\n{tail}")
        return log.read_text(encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def train_base(cli: Cli, sizes: Sizes, work: Path) -> dict:
    """Tokenizer, shards, training and bf16 export of the English/code base model."""
    raw = config("base", sizes, work / "base_tokenizer", work / "base_shards", english_sources(),
                 sizes.base_steps, lr=2e-3)
    raw["checkpoint"] = {"every_steps": sizes.base_steps, "keep_last": 1}
    raw["eval"] = {"every_steps": 0, "max_samples": 64}
    cfg = write_config(work / "base.yaml", raw)
    cli("base_tokenizer", "tokenizer", str(cfg))
    prepared = cli("base_prepare", "prepare", str(cfg), "--no-progress")
    cli("base_train", "train", str(cfg), "--run-dir", str(work / "base_run"))
    cli("base_export", "export", str(work / "base_run"), str(work / "base_hf"), "--dtype", "bf16")
    heldout = [r for r in read_jsonl(work / "base_run" / "eval.jsonl") if r["source"] == "all"]
    return {"config": raw, "prepare": prepared.strip().splitlines(), "heldout_loss_start": heldout[0]["loss"],
            "heldout_loss_end": heldout[-1]["loss"], "export": str(work / "base_hf")}


def dev_row(cli: Cli, work: Path, run: Path, name: str, step: int, *eval_args: str) -> dict:
    """``run``'s checkpoint at ``step`` exported (fp32, deleted after) and dev.jsonl scored by
    `norallm eval` with ``eval_args``: its row."""
    out = work / f"{name}_hf_{step}"
    cli(f"{name}_export_{step}", "export", str(run / "checkpoints" / f"step{step:08d}"), str(out), "--dtype", "fp32")
    printed = cli(f"{name}_eval_{step}", "eval", str(out), "--data", f"dev={NORWEGIAN / 'dev.jsonl'}", *eval_args)
    shutil.rmtree(out)
    return next(r for r in (json.loads(line) for line in printed.splitlines() if line.startswith("{"))
                if r["source"] == "dev")


def norwegian_runs(cli: Cli, sizes: Sizes, work: Path, base_dir: Path, lr: float, only: list[str]) -> dict:
    base = config("nor", sizes, work / "nor_tokenizer", work / "nor_shards",
                  [{"name": "nor", "language": "nor", "paths": [str(NORWEGIAN / "train.jsonl")]}], sizes.steps, lr)
    tok_cfg = write_config(work / "nor.yaml", base)
    cli("nor_tokenizer", "tokenizer", str(tok_cfg))
    prepared = cli("nor_prepare", "prepare", str(tok_cfg), "--no-progress")
    results = {"prepare": prepared.strip().splitlines()}
    for name in only:
        raw = merged(base, run_overrides(name, sizes, base_dir))
        raw["name"] = name
        cfg = write_config(work / f"{name}.yaml", raw)
        run = work / name
        print(f"  {name}: training {sizes.steps} steps ...", flush=True)
        cli(f"{name}_train", "train", str(cfg), "--run-dir", str(run))
        dev = []
        for step in sizes.eval_steps:
            row = dev_row(cli, work, run, name, step, "--batch-size", "16")
            dev.append({"step": step, "tokens": step * sizes.tokens_per_step, "loss": row["loss"],
                        "ppl": row["ppl"], "scored_tokens": row["tokens"], "coverage": row["coverage"]})
            print(f"    step {step} ({step * sizes.tokens_per_step:,} tokens): dev loss {row['loss']:.4f}", flush=True)
        heldout = [{"step": r["step"], "tokens": r["step"] * sizes.tokens_per_step, "loss": r["loss"]}
                   for r in read_jsonl(run / "eval.jsonl") if r["source"] == "all"]
        transplant = run / "transplant.json"
        results[name] = {
            "label": RUNS[name], "config": {k: raw[k] for k in ("model", "train")}, "dev": dev, "heldout": heldout,
            "transplant": json.loads(transplant.read_text()) if transplant.is_file() else None,
            "train_loss_end": read_jsonl(run / "metrics.jsonl")[-1]["loss"],
            "train_s": cli.seconds[f"{name}_train"],
        }
        shutil.rmtree(run / "checkpoints")  # ~80 MB each; the run dir keeps its logs
    return results


def tokens_to_reach(dev: list[dict], target: float) -> float | None:
    """Training tokens at which the dev loss first reaches ``target``, interpolated linearly in
    log(tokens) between the evaluated points; 0 when the first point is already below it (the
    table says so), None when no point reaches it."""
    import math

    if dev[0]["loss"] <= target:
        return 0.0
    for a, b in itertools.pairwise(dev):
        if b["loss"] <= target:
            frac = (a["loss"] - target) / (a["loss"] - b["loss"])
            return math.exp(math.log(a["tokens"]) + frac * (math.log(b["tokens"]) - math.log(a["tokens"])))
    return None


def table(results: dict, sizes: Sizes) -> str:
    names = [n for n in RUNS if n in results]
    target = results["scratch"]["dev"][-1]["loss"] if "scratch" in results else None
    head = "| run | held-out loss at step 0 | " + " | ".join(
        f"dev loss @ {s * sizes.tokens_per_step / 1e3:,.0f}k tokens" for s in sizes.eval_steps) + " |"
    if target is not None:
        head += " tokens to scratch's final dev loss |"
    lines = [head, "|---|" + "---:|" * (len(sizes.eval_steps) + 1 + (target is not None))]
    for name in names:
        r = results[name]
        cells = [f"{d['loss']:.3f}" for d in r["dev"]]
        if target is not None:
            reach = tokens_to_reach(r["dev"], target)
            first = r["dev"][0]["tokens"]
            cells.append("not reached" if reach is None else f"< {first / 1e3:,.0f}k" if reach == 0
                         else f"{reach / 1e3:,.0f}k")
        lines.append(f"| {name}: {r['label']} | {r['heldout'][0]['loss']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def two_panels():
    """(figure, left axes, right axes), drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    return fig, left, right


def plot(results: dict, sizes: Sizes, path: Path, title: str) -> None:
    fig, left, right = two_panels()
    for name in (n for n in RUNS if n in results):
        r = results[name]
        left.plot([d["tokens"] for d in r["dev"]], [d["loss"] for d in r["dev"]], marker="o", label=name)
        right.plot([h["tokens"] for h in r["heldout"]], [h["loss"] for h in r["heldout"]], label=name)
    if sizes.frozen_body_steps and "warm_frozen" in results:
        right.axvline(sizes.frozen_body_steps * sizes.tokens_per_step, color="grey", lw=0.8, ls=":",
                      label="warm_frozen: body unfrozen")
    left.set_title("dev.jsonl (norallm eval of exports)")
    left.set_xscale("log")
    right.set_title("trainer eval: 2 % hash hold-out of train.jsonl")
    for ax in (left, right):
        ax.set_xlabel("training tokens")
    save_figure(fig, (left, right), "loss (nats / token)", title, path)


def save_figure(fig, axes, ylabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def common_args(doc: str, runs: str) -> argparse.ArgumentParser:
    """The options this benchmark shares with its siblings (bench/tokenizer_strategies.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check the script end to end")
    ap.add_argument("--work", type=Path, help="work dir (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--out", type=Path, help="results dir (default bench/results; --tiny: the work dir)")
    ap.add_argument("--lr", type=float, default=2e-3, help=f"peak learning rate of {runs}")
    ap.add_argument("--base", type=Path, help="an exported base model from an earlier run (its work dir's "
                    "base_hf) instead of training one")
    return ap


def work_dirs(args: argparse.Namespace, name: str) -> tuple[Path, Path, str]:
    """(work dir, results dir, results stem) of a benchmark called ``name``."""
    work = args.work or Path(tempfile.mkdtemp(prefix=f"{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (work if args.tiny else REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    return work, out, f"{name}_" + ("tiny" if args.tiny else "cpu")


def base_model(cli: Cli, sizes: Sizes, work: Path, reuse: Path | None) -> dict:
    """The English/code base: ``reuse`` (an exported one) or one trained now (train_base)."""
    if reuse:
        print(f"== base model: {reuse} (reused), work dir {work}", flush=True)
        return {"export": str(reuse), "reused": True}
    print(f"== base model ({sizes.base_steps} steps on English prose + Python), work dir {work}", flush=True)
    base = train_base(cli, sizes, work)
    print(f"   base held-out loss {base['heldout_loss_start']:.3f} → {base['heldout_loss_end']:.3f} "
          f"({cli.seconds['base_train']:.0f} s)", flush=True)
    return base


def main() -> int:
    ap = common_args(__doc__, "all four Norwegian runs")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    args = ap.parse_args()
    if not (NORWEGIAN / "train.jsonl").is_file():
        sys.exit(f"the shared Norwegian corpus is not at {NORWEGIAN}; this benchmark needs it.")
    only = args.runs.split(",")
    if unknown := [n for n in only if n not in RUNS]:
        sys.exit(f"--runs: unknown {unknown}; choose from {list(RUNS)}.")
    sizes = Sizes(args.tiny)
    work, out, stem = work_dirs(args, "warm_vs_scratch")
    cli = Cli(work)
    t0 = time.monotonic()
    base = base_model(cli, sizes, work, args.base)
    print(f"== Norwegian runs ({sizes.steps} steps, {sizes.steps * sizes.tokens_per_step:,} tokens each)", flush=True)
    results = norwegian_runs(cli, sizes, work, Path(base["export"]), args.lr, only)
    wall_s = round(time.monotonic() - t0)

    md = table(results, sizes)
    title = (f"Norwegian, warm vs scratch: Mistral {sizes.shape['num_hidden_layers']} × {sizes.shape['hidden_size']}, "
             f"vocab {sizes.vocab_size}, seq {sizes.seq_len}, lr {args.lr:g}")
    plot(results, sizes, out / f"{stem}.png", title)
    import torch
    import transformers

    report = {
        "what": __doc__.split("\n")[0],
        "command": " ".join(["python", "bench/warm_vs_scratch.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "wall_s": wall_s,
        "sizes": vars(sizes) | {"tokens_per_step": sizes.tokens_per_step},
        "lr": args.lr,
        "base": base,
        "norwegian_prepare": results.pop("prepare"),
        "runs": results,
        "table_md": md,
        "seconds": cli.seconds,
    }
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(md + "\n", encoding="utf-8")
    print("\n" + md)
    for name, r in results.items():
        if r["transplant"]:
            t = r["transplant"]
            print(f"transplant ({name}): mode {t['mode']}, {t['copied']} copied, {t['averaged']} averaged, "
                  f"{t['special']} special, {t['no_source']} without source")
    print(f"\nwall time {wall_s} s; results: {out / stem}.{{json,md,png}}")
    if not args.keep and args.work is None and not args.tiny:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
