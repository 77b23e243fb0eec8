"""The first GPU run, in one command that fits a 10-minute lease: does norallm's real path work on
one H100/H200, and how fast is it next to a plain Hugging Face loop?

    python bench/gpu_check.py                  # on the card: ~5 minutes
    python bench/gpu_check.py --cpu --out DIR  # the same steps at tiny shapes on a CPU (make test runs it)

Steps, each recorded with ok/detail/seconds (a failing step is reported and the rest still run):

1. ``decision``  — training.distributed's device/backend decision and DeepSpeed's accelerator;
2. ``sdpa_flash`` — SDPA's flash kernel at NORA's shapes (causal, 32 query / 8 KV heads, seq 2048),
   and the model's own attention at seq 2048 under a flash-only SDPA (a mask would refuse it);
3. ``train_resume`` — the real CLI (``norallm tokenizer``/``prepare``, torchrun ``norallm train``)
   on a mistral-7b-shaped model with 4 layers (vocab 32,768, seq 2048, bf16, ZeRO-2 with 2
   accumulation steps, activation checkpointing, fused loss, liger): a straight run to step 6,
   and a run stopped at step 3 and resumed to 6; losses compared (GPU tolerance 2e-2, CPU exact);
4. ``export_reload`` — ``norallm export`` in bf16, reloaded on the device: held-out loss against
   the trainer's own final eval, and a sample;
5. ``throughput`` — each row in its own process: the plain HF loop (bench/train_throughput.py
   ``hf_eager``) at the same shapes, and norallm's row from the straight run's ``metrics.jsonl``
   (the ``train()`` loop itself: loader, copies, reductions included), with MFU of --peak-tflops.

Results: ``OUT/gpu_check_<card>.json`` and ``.txt`` (default OUT: bench/results/).

The device image has torch, transformers, triton, numpy, safetensors, tokenizers, sentencepiece
and pyyaml, but not what else norallm imports. Carry these as wheels (pip download --no-deps
--only-binary=:all: for the image's Python) and install them with --no-deps first:
deepspeed, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions,
liger-kernel, datasets (+ pyarrow, dill, xxhash, multiprocess, fsspec), zstandard, psutil,
msgpack, hjson, ninja, py-cpuinfo, einops, tqdm, wandb is not needed (logging.wandb: false).
Heavy optional packages (liger) are imported lazily, so a missing one fails its step, not the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO / "data_pipeline" / "smoke_corpus"


def recipe(work: Path, cpu: bool) -> dict:
    """The check's training config: NORA's 7B layer shapes with 4 layers on a GPU, tiny on a CPU."""
    gpu = not cpu
    return {
        "name": "gpu-check", "seed": 5,
        "model": {"flavor": "mistral-7b" if gpu else "tiny-mistral",
                  "overrides": {"num_hidden_layers": 4} if gpu else {},
                  "vocab_size": 32768 if gpu else None, "activation_checkpointing": True,
                  "fused_loss": True, "liger_kernel": gpu},
        "tokenizer": {"path": str(work / "tokenizer"), "train": True, "vocab_size": 2000 if gpu else 512},
        "data": {"sources": [{"name": "nob", "language": "nob", "paths": [str(CORPUS / "nob.jsonl")]},
                             {"name": "nno", "language": "nno", "paths": [str(CORPUS / "nno.jsonl")]}],
                 "shards_dir": str(work / "shards"), "seq_len": 2048 if gpu else 64, "valid_fraction": 0.15},
        "train": {"global_batch_size": 8 if gpu else 4, "micro_batch_size": 4 if gpu else 2, "max_steps": 6,
                  "lr": 3e-4, "warmup_steps": 2, "precision": "bf16"},
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "eval": {"every_steps": 0, "max_samples": 4},
        "logging": {"every_steps": 1},
    }


class Checks:
    def __init__(self):
        self.results: list[dict] = []

    def run(self, name: str, fn) -> dict | None:
        t0 = time.perf_counter()
        try:
            detail = fn()
            ok = detail.pop("ok", True)
        except Exception as e:  # every step is reported; one failing does not hide the others
            detail, ok = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}, False
        entry = {"name": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), **detail}
        self.results.append(entry)
        print(f"[gpu_check] {name}: {'ok' if ok else 'FAILED'} ({entry['seconds']} s) "
              f"{json.dumps(detail, ensure_ascii=False)[:600]}", flush=True)
        return detail if ok else None


def sh(*cmd: str, env: dict | None = None) -> str:
    proc = subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} … exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def norallm(*args: str) -> str:
    return sh(sys.executable, "-m", "training.cli", *args)


def torchrun_train(config: Path, run_dir: Path, *extra: str) -> None:
    sh(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
       "-m", "training.cli", "train", str(config), "--run-dir", str(run_dir), *extra)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def check_decision() -> dict:
    import torch

    from training import distributed

    rt = distributed.decide()
    distributed.use_deepspeed_accelerator(rt)
    import deepspeed
    import transformers
    from deepspeed.accelerator import get_accelerator

    card = torch.cuda.get_device_name(rt.device) if rt.is_gpu else "cpu"
    return {"kind": rt.kind, "device": str(rt.device), "backend": rt.backend, "card": card,
            "deepspeed_accelerator": get_accelerator()._name, "torch": torch.__version__,
            "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
            "ok": get_accelerator()._name == rt.ds_accelerator}


def check_sdpa_flash() -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from training.models import SpecialIds, drop_unbound_sliding_window, hf_config

    dev = torch.device("cuda")
    q = torch.randn(4, 32, 2048, 128, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(4, 8, 2048, 128, device=dev, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    cfg = hf_config("mistral-7b", {"num_hidden_layers": 1}, 32768, SpecialIds(1, 2, 2), "sdpa")
    drop_unbound_sliding_window(cfg, 2048)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    ids = torch.randint(0, 32768, (2, 2048), device=dev)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # refuses if a mask is passed
        model(input_ids=ids, use_cache=False)
    return {"flash_gqa_kernel": True, "model_attention_on_flash": True}


def check_train_resume(work: Path, cpu: bool) -> dict:
    raw = recipe(work, cpu)
    config = work / "gpu-check.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    norallm("tokenizer", str(config))
    norallm("prepare", str(config), "--no-progress")
    t0 = time.perf_counter()
    torchrun_train(config, work / "straight")
    straight_s = time.perf_counter() - t0
    torchrun_train(config, work / "resumed", "--stop-at", "3")
    torchrun_train(config, work / "resumed")
    a, b = [m["loss"] for m in metrics(work / "straight")], [m["loss"] for m in metrics(work / "resumed")]
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    tolerance = 0.0 if cpu else 2e-2  # GPU: bf16 kernels' atomics are not bit-reproducible
    return {"straight_losses": [round(x, 5) for x in a], "resumed_losses": [round(x, 5) for x in b],
            "max_abs_diff": worst, "tolerance": tolerance, "straight_run_s": round(straight_s, 1),
            "ok": len(a) == len(b) == 6 and worst <= tolerance}


def check_export_reload(work: Path, cpu: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from training import distributed
    from training.config import load_config
    from training.evaluate import evaluate, validation_sets
    from training.export import generate

    out = work / "export"
    norallm("export", str(work / "straight"), str(out), "--dtype", "bf16")
    cfg = load_config(str(work / "gpu-check.yaml"))
    device = distributed.decide().device
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).to(device).eval()
    sets = validation_sets(cfg.data, cfg.tokenizer.load(), cfg.eval.max_samples, 0, 1)
    got = {r["source"]: r["loss"] for r in evaluate(model, sets, cfg.train.micro_batch_size, 6, device)}
    rows = [json.loads(x) for x in (work / "straight" / "eval.jsonl").read_text().splitlines() if x.strip()]
    want = {r["source"]: r["loss"] for r in rows if r["step"] == 6}
    worst = max(abs(got[k] - want[k]) for k in want)
    sample = generate(out, "Det var en gang", max_new_tokens=20)
    return {"engine_eval": want, "export_eval": got, "max_abs_diff": worst, "tolerance": 2e-2,
            "sample": sample, "ok": bool(want) and worst <= 2e-2}


def check_throughput(work: Path, cpu: bool, peak_tflops: float) -> dict:
    """Each row in its own process: module-level patches (liger) cannot leak between rows."""
    shape = ["--tiny", "--seq-len", "64", "--micro-batch", "2"] if cpu else ["--layers", "4"]
    out = work / "hf.json"
    sh(sys.executable, "bench/train_throughput.py", "--arch", "mistral", "--rows", "hf_eager", "--steps",
       "2" if cpu else "8", "--warmup", "1" if cpu else "3", "--peak-tflops", str(peak_tflops), "--out", str(out),
       *shape)
    hf = next(r for r in json.loads(out.read_text())["rows"] if r["row"] == "hf_eager")
    steps = metrics(work / "straight")[3:]  # steps 4–6: after compile/warm-up
    tok_s = statistics.median(m["tokens_per_s"] for m in steps)
    mfu = statistics.median(m["mfu"] for m in steps) if steps[0].get("mfu") is not None else None
    return {"hf_eager_tokens_per_s": hf["tokens_per_s"], "hf_eager_mfu": hf.get("mfu"),
            "norallm_train_tokens_per_s": round(tok_s, 1), "norallm_train_mfu": mfu,
            "ratio_norallm_to_hf_eager": round(tok_s / hf["tokens_per_s"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on a CPU (what make test runs)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--work", type=Path, help="scratch dir (default OUT/gpu_check_work)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100/H200: 989)")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, as on a machine without a GPU
    work = args.work or args.out / "gpu_check_work"
    work.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    decision = checks.run("decision", check_decision) or {}
    on_gpu = decision.get("kind") in ("cuda", "rocm")
    if not args.cpu and not on_gpu:
        print("[gpu_check] no GPU visible; run with --cpu for the CPU variant", file=sys.stderr)
        return 2
    if on_gpu:
        checks.run("sdpa_flash", check_sdpa_flash)
    checks.run("train_resume", lambda: check_train_resume(work, args.cpu))
    checks.run("export_reload", lambda: check_export_reload(work, args.cpu))
    if not args.skip_throughput:
        checks.run("throughput", lambda: check_throughput(work, args.cpu, args.peak_tflops))
    card = decision.get("card", "unknown").replace(" ", "_")
    report = {"card": card, "cpu_mode": args.cpu, "checks": checks.results,
              "all_ok": all(c["ok"] for c in checks.results)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_check_{card}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    lines = [f"gpu_check on {card} ({'cpu mode' if args.cpu else 'gpu'}): "
             f"{sum(c['ok'] for c in checks.results)} of {len(checks.results)} checks ok"]
    lines += [f"- {c['name']}: {'ok' if c['ok'] else 'FAILED'} in {c['seconds']} s" for c in checks.results]
    (args.out / f"gpu_check_{card}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
