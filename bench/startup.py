"""Model start-up: build time and peak host memory (whole process, imports included) of a mistral-7b-shaped model with 4 layers
(vocab 32,768; 1.1 B parameters) on the CPU, the way the trainer used to build it and the way it
builds it now, each in its own process so that peak RSS is that build's alone.

    python bench/startup.py            # prints a table, writes bench/results/startup.json
    python bench/startup.py --warm     # also a warm start of such a base on 2 ranks, before/after

Rows:
- ``before``: fp32, transformers' own init and then norallm's scratch init over it (two inits);
  on a GPU the whole fp32 model was then moved to the device before DeepSpeed cast it;
- ``after_fp32``: one init (transformers' switched off), fp32 (what an fp32 run builds);
- ``after_bf16``: one init in the training dtype, as a bf16 run builds it — on a GPU directly on
  the device, so no fp32 copy exists anywhere.

With ``--warm`` (a base of that shape saved to a temporary dir first), per rank of a 2-rank job,
summed: ``warm_before`` — every rank loads the base in fp32; ``warm_after`` — rank 0 loads it in
bf16, rank 1 builds it empty (DeepSpeed broadcasts rank 0's parameters at initialisation). ZeRO-3,
the 2 ranks in one gloo group as the trainer runs them: ``zero3_before`` — every rank loads the
whole base in bf16, then partitions it as ``deepspeed.initialize`` did (what ZeRO-3 did until zero.Init);
``zero3_after`` — every rank builds its partitions under ``deepspeed.zero.Init`` and reads its own
part of the base into them (training.model.partitioned). On the CPU the partitions are host memory; on a
GPU they are device memory, and the host holds little more than the imports.
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
WARM_ROWS = ("warm_before", "warm_after", "zero3_before", "zero3_after")


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM: anonymous memory and mapped file pages alike —
    safetensors maps the file, so a loaded bf16 model is file-backed)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def warm(row: str, rank: int, base: str, layers: int) -> dict:
    import hashlib
    from types import SimpleNamespace

    import torch

    from training.model.build import SpecialIds, hf_config, warm_start

    config = hf_config("mistral-7b", {"num_hidden_layers": layers}, 32768, SpecialIds(1, 2, 2))
    # the base's own tokenizer: no transplant, so the rows measure the load alone
    tok = SimpleNamespace(fingerprint=hashlib.sha256((Path(base) / "tokenizer.json").read_bytes()).hexdigest()[:16])
    zero3 = None
    if row.startswith("zero3"):  # a 2-rank group, as the trainer forms it (before the clock starts)
        from training import distributed
        from training.config import TrainConfig, ZeroConfig
        from training.loop.engine import deepspeed_config

        distributed.init()
        train = TrainConfig(global_batch_size=2, micro_batch_size=1, max_steps=1, lr=1e-4)
        zero3 = deepspeed_config(train, ZeroConfig(stage=3), 2)
    t0 = time.perf_counter()
    if row == "warm_before":
        model, _ = warm_start(base, None, tok, 32768, {}, config, torch.float32)
    elif row == "zero3_before":  # then partitioned as deepspeed.initialize partitions a whole model
        import deepspeed

        model, _ = warm_start(base, None, tok, 32768, {}, config, torch.bfloat16)
        deepspeed.zero.Init(module=model, config_dict_or_path=zero3)
    elif row == "zero3_after":
        model, _ = warm_start(base, None, tok, 32768, {}, config, torch.bfloat16, zero3_config=zero3)
    else:
        model, _ = warm_start(base, None, tok, 32768, {}, config, torch.bfloat16, load_weights=rank == 0)
    held = 0
    with torch.no_grad():  # read every weight, as the broadcast or the move to the GPU will:
        for p in model.parameters():  # safetensors maps the file, and untouched pages are not resident
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3: this rank's partition
            local.sum()
            held += local.numel()
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    return {"row": row, "rank": rank, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2),
            "dtype": str(next(model.parameters()).dtype), "parameters_held": held}


def save_base(path: Path, layers: int) -> None:
    import torch

    from training.model.build import SpecialIds, build_model, hf_config

    model = build_model(hf_config("mistral-7b", {"num_hidden_layers": layers}, 32768, SpecialIds(1, 2, 2)), 0,
                        dtype=torch.bfloat16)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")  # only its fingerprint is read: the base's own tokenizer


def build(row: str, layers: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from training.model.build import SpecialIds, build_model, hf_config, init_scratch

    config = hf_config("mistral-7b", {"num_hidden_layers": layers}, 32768, SpecialIds(1, 2, 2))
    t0 = time.perf_counter()
    if row == "before":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        init_scratch(model, "mistral", 0.02, 0)
    else:
        model = build_model(config, 0, 0.02, dtype=torch.bfloat16 if row == "after_bf16" else torch.float32)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    peak = peak_rss_gib()
    return {"row": row, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2), "parameters": params,
            "dtype": str(next(model.parameters()).dtype)}


def run_ranks(row: str, base: str, layers: int) -> list[dict]:
    """Both ranks' results for a warm-start row: one after the other, or (ZeRO-3) together as a
    2-rank group, each in its own process so that its peak RSS is its own."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmds = [[sys.executable, __file__, "--row", row, "--rank", str(r), "--base", base, "--layers", str(layers)]
            for r in (0, 1)]
    if not row.startswith("zero3"):
        return [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                           .stdout.strip().splitlines()[-1]) for cmd in cmds]
    import socket

    with socket.socket() as sock:  # a free port for the group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    group = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, **group, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r, cmd in enumerate(cmds)]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"{row} failed (exit {p.returncode}):\n{err[-3000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--row", choices=(*ROWS, *WARM_ROWS), help=argparse.SUPPRESS)  # a child's part
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help="also time a warm start on 2 ranks (saves a 2.3 GB base)")
    ap.add_argument("--skip-build", action="store_true", help="only the warm-start rows")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    args = ap.parse_args()
    if args.row:
        print(json.dumps(warm(args.row, args.rank, args.base, args.layers) if args.row in WARM_ROWS else
                         build(args.row, args.layers)))
        return 0
    rows = []
    for row in () if args.skip_build else ROWS:
        proc = subprocess.run([sys.executable, __file__, "--row", row, "--layers", str(args.layers)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if rows:
        before = rows[0]
        print(f"mistral-7b shape, {args.layers} layers, {before['parameters']:,} parameters, CPU")
    for r in rows:
        print(f"{r['row']:11s} {r['dtype']:15s} {r['seconds']:7.2f} s  ×{r['seconds'] / before['seconds']:.2f}   "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB  ×{r['peak_rss_gib'] / before['peak_rss_gib']:.2f}")
    report = {"layers": args.layers, "rows": rows}
    if args.warm:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            save_base(Path(tmp), args.layers)
            warm_rows = {}
            for row in WARM_ROWS:
                ranks = run_ranks(row, tmp, args.layers)
                warm_rows[row] = {"ranks": ranks, "peak_rss_gib_sum": round(sum(r["peak_rss_gib"] for r in ranks), 2),
                                  "slowest_rank_s": max(r["seconds"] for r in ranks)}
        b = warm_rows["warm_before"]
        for label, before, after in (("ZeRO-0/1/2", "warm_before", "warm_after"),
                                     ("ZeRO-3", "zero3_before", "zero3_after")):
            x, y = warm_rows[before], warm_rows[after]
            print(f"warm start, {label}, 2 ranks: before {x['slowest_rank_s']:.1f} s, {x['peak_rss_gib_sum']:.2f} GiB "
                  f"host RSS summed; after {y['slowest_rank_s']:.1f} s, {y['peak_rss_gib_sum']:.2f} GiB "
                  f"(×{y['peak_rss_gib_sum'] / x['peak_rss_gib_sum']:.2f}; ×{y['peak_rss_gib_sum'] / b['peak_rss_gib_sum']:.2f}"
                  " of every rank in fp32)")
        report["warm_start_2_ranks"] = warm_rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
