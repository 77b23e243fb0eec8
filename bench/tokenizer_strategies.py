"""Which tokenizer for a warm start, keep, replace or extend? The three `model.tokenizer_strategy`
choices on one base model and one Norwegian corpus, compared in a unit that does not depend on
the tokenizer: bits per byte of held-out text. Everything goes through the command line
(`norallm tokenizer`, `prepare`, `train`, `export`, `eval --per-document`), on the CPU.

    python bench/tokenizer_strategies.py          # ~8 min on 2 cores: bench/results/tokenizer_strategies_cpu.{json,md,png}
    python bench/tokenizer_strategies.py --tiny   # the same steps at toy sizes (a minute), results in the work dir

1. **Base**: a small Mistral trained on English prose and Python with its own byte-level BPE,
   exported (the base of bench/warm_vs_scratch.py, at SHAPE below; ``--base`` reuses one).
2. **Three runs** on ``../shared/data/norwegian/train.jsonl``, identical (steps, sequences per
   step, seq_len, schedule, seed) but for the tokenizer: ``keep`` (the base's own BPE, no row
   touched), ``replace`` (a Norwegian BPE of the base's size, the rows transplanted: copied or
   averaged over the base pieces), ``extend`` (the base's BPE plus EXTEND new merges learned on
   the corpus: old rows bit for bit, new ones averaged).
3. **Held-out**: each checkpoint in EVAL_STEPS is exported and ``dev.jsonl`` scored document by
   document (`norallm eval --per-document`): loss per token (not comparable across tokenizers,
   shown for completeness) and **bits per byte** (comparable). Equal steps are equal tokens, but
   not equal text: a tokenizer that needs more tokens per byte has read fewer bytes of the corpus
   by then, so the table also gives each run's training bytes (tokens × the corpus's bytes per
   token under its tokenizer) and the bits per byte at the training bytes the least-read run
   reached (interpolated in log bytes).

One seed and a 1M-parameter model: which strategy wins at 7B is not shown by this; how the
comparison is made is.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml


def _sibling(name: str):
    """A benchmark beside this one, loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wvs = _sibling("warm_vs_scratch")  # the base model and the CLI runner are that benchmark's

REPO = wvs.REPO
sys.path.insert(0, str(REPO))  # before bench/, which holds a data_pipeline.py of its own
NORWEGIAN = wvs.NORWEGIAN
STRATEGIES = {
    "keep": "the base's own tokenizer",
    "replace": "a Norwegian BPE, rows transplanted",
    "extend": "the base's BPE + new Norwegian merges",
}
SHAPE = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}


class Sizes(wvs.Sizes):
    """bench/warm_vs_scratch.py's sizes with a smaller model (a base and three runs in ~8 min)."""

    def __init__(self, tiny: bool):
        super().__init__(tiny)
        if not tiny:
            self.shape, self.vocab_size = SHAPE, 2048
            self.base_steps, self.steps, self.eval_steps = 400, 200, (50, 100, 200)
        self.extend_tokens = 128 if tiny else 1024


def run_config(strategy: str, sizes: Sizes, work: Path, base_dir: Path, lr: float) -> dict:
    """One strategy's config: the shared settings of bench/warm_vs_scratch.py, its own tokenizer."""
    tokenizer = work / f"{strategy}_tokenizer"
    source = [{"name": "nor", "language": "nor", "paths": [str(NORWEGIAN / "train.jsonl")]}]
    raw = wvs.config(strategy, sizes, tokenizer, work / f"{strategy}_shards", source, sizes.steps, lr)
    raw["model"].update(init="warm", base=str(base_dir), tokenizer_strategy=strategy)
    raw["eval"] = {"every_steps": 0, "max_samples": 64}
    if strategy == "keep":
        raw["tokenizer"] = {}  # the base's: path and size come from model.base
    elif strategy == "extend":
        raw["model"]["extend_tokens"] = sizes.extend_tokens
        raw["tokenizer"] = {"path": str(tokenizer), "train": True}
    return raw


def bytes_per_token(tokenizer_dir: Path, path: Path) -> tuple[float, float]:
    """(UTF-8 bytes per token as `prepare` tokenizes ``path``'s documents, with one EOS after
    each, and tokens per word as `norallm plan` measures fertility)."""
    from data_pipeline.extend import fertility
    from data_pipeline.tokenizer import Tokenizer

    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    per_word = fertility(Tokenizer(tokenizer_dir), texts)
    tokens = per_word * sum(len(t.split()) for t in texts) + len(texts)
    return sum(len(t.encode("utf-8")) for t in texts) / tokens, per_word


def strategy_run(cli: wvs.Cli, strategy: str, sizes: Sizes, work: Path, base_dir: Path, lr: float) -> dict:
    raw = run_config(strategy, sizes, work, base_dir, lr)
    cfg = wvs.write_config(work / f"{strategy}.yaml", raw)
    if strategy != "keep":
        cli(f"{strategy}_tokenizer", "tokenizer", str(cfg))
    prepared = cli(f"{strategy}_prepare", "prepare", str(cfg), "--no-progress")
    run = work / strategy
    print(f"  {strategy}: training {sizes.steps} steps ...", flush=True)
    cli(f"{strategy}_train", "train", str(cfg), "--run-dir", str(run))
    resolved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    tok_dir = Path(resolved["tokenizer"]["path"])
    train_bpt, fertility = bytes_per_token(tok_dir, NORWEGIAN / "train.jsonl")
    dev = []
    for step in sizes.eval_steps:
        row = wvs.dev_row(cli, work, run, strategy, step, "--per-document")
        tokens = step * sizes.tokens_per_step
        dev.append({"step": step, "tokens": tokens, "train_bytes": round(tokens * train_bpt),
                    "loss": row["loss"], "bits_per_byte": row["bits_per_byte"], "dev_tokens": row["tokens"],
                    "dev_bytes": row["bytes"]})
        print(f"    step {step} ({tokens:,} tokens, {tokens * train_bpt / 1e3:,.0f} kB of text): dev loss "
              f"{row['loss']:.4f}/token, {row['bits_per_byte']:.4f} bits/byte", flush=True)
    transplant = run / "transplant.json"
    result = {
        "label": STRATEGIES[strategy], "config": {k: raw[k] for k in ("model", "tokenizer", "train")},
        "vocab_size": resolved["tokenizer"]["vocab_size"], "train_bytes_per_token": train_bpt,
        "tokens_per_word": fertility, "dev": dev, "prepare": prepared.strip().splitlines(),
        "transplant": json.loads(transplant.read_text()) if transplant.is_file() else None,
        "train_loss_end": wvs.read_jsonl(run / "metrics.jsonl")[-1]["loss"], "train_s": cli.seconds[f"{strategy}_train"],
    }
    shutil.rmtree(run / "checkpoints")
    return result


def bpb_at_bytes(dev: list[dict], target: float) -> float | None:
    """Bits per byte at ``target`` training bytes, linear in log(bytes) between evaluated points;
    None outside them."""
    x = np.log([d["train_bytes"] for d in dev])
    y = float(np.interp(math.log(target), x, [d["bits_per_byte"] for d in dev], left=np.nan, right=np.nan))
    return None if math.isnan(y) else y


def table(results: dict, sizes: Sizes) -> tuple[str, float]:
    """The markdown table and the training bytes at which the strategies are compared."""
    equal = min(r["dev"][-1]["train_bytes"] for r in results.values())
    steps = sizes.eval_steps
    head = ("| strategy | vocab | bytes/token | tokens/word | " +
            " | ".join(f"bits/byte @ {s * sizes.tokens_per_step / 1e3:,.0f}k tokens" for s in steps) +
            f" | loss/token @ {steps[-1] * sizes.tokens_per_step / 1e3:,.0f}k tokens | training bytes then | "
            f"bits/byte @ {equal / 1e3:,.0f} kB of text |")
    lines = [head, "|---|" + "---:|" * (len(steps) + 6)]
    for name, r in results.items():
        at = bpb_at_bytes(r["dev"], equal)
        lines.append(f"| {name}: {r['label']} | {r['vocab_size']:,} | {r['train_bytes_per_token']:.2f} | "
                     f"{r['tokens_per_word']:.2f} | " + " | ".join(f"{d['bits_per_byte']:.4f}" for d in r["dev"]) +
                     f" | {r['dev'][-1]['loss']:.3f} | {r['dev'][-1]['train_bytes'] / 1e3:,.0f} kB | "
                     f"{'—' if at is None else f'{at:.4f}'} |")
    return "\n".join(lines), equal


def plot(results: dict, path: Path, title: str) -> None:
    fig, left, right = wvs.two_panels()
    for name, r in results.items():
        left.plot([d["tokens"] for d in r["dev"]], [d["bits_per_byte"] for d in r["dev"]], marker="o", label=name)
        right.plot([d["train_bytes"] for d in r["dev"]], [d["bits_per_byte"] for d in r["dev"]], marker="o", label=name)
    left.set_xlabel("training tokens")
    right.set_xlabel("training bytes (text read)")
    left.set_xscale("log")
    right.set_xscale("log")
    wvs.save_figure(fig, (left, right), "dev.jsonl bits per byte (per document)", title, path)


def main() -> int:
    ap = wvs.common_args(__doc__, "the three runs")
    args = ap.parse_args()
    if not (NORWEGIAN / "train.jsonl").is_file():
        sys.exit(f"the shared Norwegian corpus is not at {NORWEGIAN}; this benchmark needs it.")
    sizes = Sizes(args.tiny)
    work, out, stem = wvs.work_dirs(args, "tokenizer_strategies")
    cli = wvs.Cli(work)
    t0 = time.monotonic()
    base = wvs.base_model(cli, sizes, work, args.base)
    print(f"== three strategies ({sizes.steps} steps, {sizes.steps * sizes.tokens_per_step:,} tokens each)", flush=True)
    results = {s: strategy_run(cli, s, sizes, work, Path(base["export"]), args.lr) for s in STRATEGIES}
    md, equal = table(results, sizes)
    title = (f"keep / replace / extend: Mistral {sizes.shape['num_hidden_layers']} × {sizes.shape['hidden_size']}, "
             f"base vocab {sizes.vocab_size}, seq {sizes.seq_len}, lr {args.lr:g}")
    plot(results, out / f"{stem}.png", title)
    import torch
    import transformers

    report = {
        "what": __doc__.split("\n")[0],
        "command": " ".join(["python", "bench/tokenizer_strategies.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "wall_s": round(time.monotonic() - t0),
        "sizes": vars(sizes) | {"tokens_per_step": sizes.tokens_per_step},
        "lr": args.lr, "base": base, "equal_train_bytes": equal, "runs": results, "table_md": md,
        "seconds": cli.seconds,
    }
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(md + "\n", encoding="utf-8")
    print("\n" + md + f"\n\nwall time {report['wall_s']} s; results: {out / stem}.{{json,md,png}}")
    if not args.keep and args.work is None and not args.tiny:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
