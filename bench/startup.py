"""Model start-up: build time and peak host memory of a mistral-7b-shaped model with 4 layers
(vocab 32,768; 1.1 B parameters) on the CPU, the way the trainer used to build it and the way it
builds it now, each in its own process so that peak RSS is that build's alone.

    python bench/startup.py            # prints a table, writes bench/results/startup.json

Rows:
- ``before``: fp32, transformers' own init and then norallm's scratch init over it (two inits);
  on a GPU the whole fp32 model was then moved to the device before DeepSpeed cast it;
- ``after_fp32``: one init (transformers' switched off), fp32 (what an fp32 run builds);
- ``after_bf16``: one init in the training dtype, as a bf16 run builds it — on a GPU directly on
  the device, so no fp32 copy exists anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ROWS = ("before", "after_fp32", "after_bf16")


def build(row: str, layers: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from training.models import SpecialIds, build_model, hf_config, init_scratch

    config = hf_config("mistral-7b", {"num_hidden_layers": layers}, 32768, SpecialIds(1, 2, 2))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if row == "before":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        init_scratch(model, "mistral", 0.02, 0)
    else:
        model = build_model(config, 0, 0.02, dtype=torch.bfloat16 if row == "after_bf16" else torch.float32)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 2**20  # KiB → GiB
    return {"row": row, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2), "parameters": params,
            "dtype": str(next(model.parameters()).dtype)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # the child process's part
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    args = ap.parse_args()
    if args.row:
        print(json.dumps(build(args.row, args.layers)))
        return 0
    rows = []
    for row in ROWS:
        proc = subprocess.run([sys.executable, __file__, "--row", row, "--layers", str(args.layers)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    before = rows[0]
    print(f"mistral-7b shape, {args.layers} layers, {before['parameters']:,} parameters, CPU")
    for r in rows:
        print(f"{r['row']:11s} {r['dtype']:15s} {r['seconds']:7.2f} s  ×{r['seconds'] / before['seconds']:.2f}   "
              f"peak RSS +{r['peak_rss_gib']:.2f} GiB  ×{r['peak_rss_gib'] / before['peak_rss_gib']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"layers": args.layers, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
