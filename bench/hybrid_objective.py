"""What NORA 11B's hybrid objective costs and what it does to the causal model, side by side:
two runs of one config on the same data, seed and steps, ``train.objective: causal`` and
``hybrid`` (10 % masked samples), each through `norallm train` in one process on this machine.

    python bench/hybrid_objective.py                       # shared Norwegian corpus, ~5 min on 2 cores
    python bench/hybrid_objective.py --steps 40 --tiny     # a quick look (the test runs this)

It prints, per run, the median training tokens/s and the causal validation loss at equal tokens
(eval every --eval-every steps), then the ratios hybrid / causal, and writes them as JSON to --out
(default runs/bench/hybrid_objective.json; pass bench/results/... to record a result). The masked
half's validation loss and accuracy are printed for the hybrid run. On CPU the tokens/s ratio
includes the dense (T × T) hybrid mask that sdpa takes; on a GPU the mask is a FlexAttention
BlockMask and the figure has to be measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "norwegian"
sys.path.insert(0, str(REPO))

from training.config import parse_config  # noqa: E402
from training.data.pretraining import run_prepare  # noqa: E402


def config(root: Path, steps: int, eval_every: int, tiny: bool, objective: str) -> dict:
    corpus = SHARED / "train.jsonl" if SHARED.is_dir() and not tiny else REPO / "data_pipeline" / "smoke_corpus" / "nob.jsonl"
    size = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2} if tiny else \
        {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4}
    return {
        "name": f"hybrid-bench-{objective}", "seed": 3,
        "model": {"flavor": "tiny-mistral", "overrides": size},
        "tokenizer": {"path": str(root / "tokenizer"), "train": True, "vocab_size": 512 if tiny else 2048,
                      "extra_special_tokens": ["<mask>"], "train_documents": 2000},
        "data": {"sources": [{"name": "nob", "language": "nob", "paths": [str(corpus)]}],
                 "shards_dir": str(root / "shards"), "seq_len": 64 if tiny else 256, "valid_fraction": 0.05,
                 "document_boundaries": True},
        "train": {"global_batch_size": 16, "micro_batch_size": 8, "max_steps": steps, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": max(1, steps // 10), "precision": "fp32", "objective": objective},
        "zero": {"stage": 1},
        "checkpoint": {"every_steps": steps, "keep_last": 1},
        "eval": {"every_steps": eval_every, "max_samples": 32 if tiny else 128},
        "logging": {"every_steps": 1},
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(root: Path, raw: dict) -> dict:
    cfg = root / f"{raw['train']['objective']}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run_dir = root / raw["train"]["objective"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "training.cli", "train", str(cfg), "--run-dir", str(run_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{raw['train']['objective']} run failed:\n{proc.stderr[-3000:]}")
    steps = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in read_jsonl(run_dir / "eval.jsonl") if r["source"] == "nob"]
    skip = max(1, len(steps) // 10)  # the first steps include warm-up of the allocator and threads
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[skip:]),
            "causal_dev_loss": {r["step"]: r["loss"] for r in evals},
            "masked_dev": {r["step"]: (r.get("masked_loss"), r.get("masked_accuracy")) for r in evals},
            "final_train_loss": steps[-1]["loss"], "tokens": steps[-1]["tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on the embedded smoke corpus")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "hybrid_objective.json",
                    help="results JSON (default runs/bench/hybrid_objective.json)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="norallm-hybrid-"))
    first = config(root, args.steps, args.eval_every, args.tiny, "causal")
    prepared = parse_config(first)
    run_prepare(prepared.tokenizer, prepared.data, progress=False)
    results = {objective: run(root, config(root, args.steps, args.eval_every, args.tiny, objective))
               for objective in ("causal", "hybrid")}
    causal, hybrid = results["causal"], results["hybrid"]
    print(f"{'objective':9}  {'tokens/s':>9}  causal dev loss by step")
    for name, r in results.items():
        losses = ", ".join(f"{s}: {v:.4f}" for s, v in sorted(r["causal_dev_loss"].items()))
        print(f"{name:9}  {r['tokens_per_s']:9,.0f}  {losses}")
    last = max(causal["causal_dev_loss"])
    ratios = {"tokens_per_s": hybrid["tokens_per_s"] / causal["tokens_per_s"],
              "causal_dev_loss_at_end": hybrid["causal_dev_loss"][last] / causal["causal_dev_loss"][last]}
    masked = hybrid["masked_dev"][last]
    print(f"hybrid / causal: tokens/s {ratios['tokens_per_s']:.3f}, causal dev loss at step {last} "
          f"({causal['tokens']:,} tokens) {ratios['causal_dev_loss_at_end']:.4f}; hybrid's masked dev loss "
          f"{masked[0]:.4f}, accuracy {masked[1]:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "tiny": args.tiny, "ratios": ratios, "runs": results},
                                   indent=2) + "\n")
    print(f"results → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
