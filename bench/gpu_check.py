"""The first GPU run, in one command that fits a 10-minute lease: does norallm's real path work on
one H100/H200, which kernels does it really run, and how fast is it next to Hugging Face?

    timeout 560 python bench/gpu_check.py                 # on the card: one deadline, 540 s by default
    python bench/gpu_check.py --cpu --out DIR             # the same checks at tiny shapes on a CPU (make test runs it)

bench/README.md has the wheels a bare device image needs (bench/gpu_wheels.py builds them) and
the one-line device command.

Checks, in order, each recorded as ok / failed / skipped with its reason and seconds:

1. ``decision``: torch, transformers and DeepSpeed import (a failure names the package), the
   device decision and DeepSpeed's accelerator; without a GPU (and without --cpu) the run stops;
2. ``sdpa_flash``: SDPA's flash kernel at NORA's shapes and the model's attention on it (GPU);
3. ``disk``: free space and write speed; the 7B-shaped runs get the most layers (4, 2 or 1) whose
   checkpoints (~16 bytes a parameter: bf16 weights, fp32 master, two Adam moments) fit twice
   over with the export beside them, and whose writes fit the time left; none fits: skipped;
4. ``train_straight``: the real CLI (``norallm tokenizer``/``prepare``, torchrun ``norallm train``
   under bench/kernel_probe.py) on a mistral-7b-shaped model (vocab 32,768, seq 2048, bf16, ZeRO-2
   with 2 accumulation steps, activation checkpointing, fused loss, liger) to step 6, with the
   kernels one profiled step ran (GPU: SDPA's fused kernel, flash or cuDNN, and liger's are required);
5. ``throughput``: bench/train_throughput.py's ``hf_eager`` and ``hf_ds_zero2`` rows (the baseline
   the goal is stated against) at the same shapes, and norallm's row from the straight run's
   ``metrics.jsonl`` (the ``train()`` loop itself), MFU of --peak-tflops (also the trainer's);
6. ``export_reload``: ``norallm export`` in bf16, reloaded on the device: held-out loss against the
   trainer's final eval, a sample; then the straight run's checkpoint is deleted;
7. ``resume``: a run stopped at step 3 and resumed to 6, losses against the straight run's (GPU
   tolerance 2e-2, CPU exact); then its checkpoints are deleted;
8. ``documents``: intra-document attention (``data.document_boundaries``; a FlexAttention block
   mask on a GPU, required there) at a small shape;
9. ``bloom``: BLOOM at a small shape, recording whatever attention BLOOM's build dispatches to;
10. ``zero3_warm``: a ZeRO-3 warm start from the export (each rank reads its partitions): its
    step-0 held-out loss against the export's own (check 6).

Results: ``OUT/gpu_check_<card>.json``, rewritten after every check (a cut-off run keeps what it
did), and ``.txt`` at the end (default OUT: bench/results/). Exit 0 when every check is ok.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/ (the script's dir), whose data_pipeline.py is not the package

from gpu_run import CheckFailed, Deadline, Results, Skip, run  # noqa: E402

CORPUS = REPO / "data_pipeline" / "smoke_corpus"
MARKER = ".gpu_check_work"  # the scratch dir is this script's own: wiped at the start
GIB = 2**30
MAIN_STEPS = 6


def main_model(cpu: bool, layers: int) -> dict:
    """The 7B-shaped model section (tiny on a CPU)."""
    if cpu:
        return {"flavor": "tiny-mistral", "overrides": {}}
    return {"flavor": "mistral-7b", "overrides": {"num_hidden_layers": layers}, "vocab_size": 32768}


def small_model(cpu: bool, arch: str) -> dict:
    """The coverage checks' model: 7B's head size and vocabulary at a quarter of the width, 2 layers."""
    if cpu:
        return {"flavor": f"tiny-{arch}", "overrides": {}}
    if arch == "bloom":
        return {"flavor": "bloom-7b", "overrides": {"n_layer": 2, "hidden_size": 1024, "n_head": 8}, "vocab_size": 32768}
    return {"flavor": "mistral-7b", "vocab_size": 32768,
            "overrides": {"num_hidden_layers": 2, "hidden_size": 1024, "intermediate_size": 3584,
                          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128}}


def recipe(work: Path, cpu: bool, model: dict, peak_tflops: float, steps: int = MAIN_STEPS) -> dict:
    """A check's training config: bf16, ZeRO-2 with 2 accumulation steps, activation checkpointing,
    fused loss, liger on a GPU; one checkpoint kept, written at the end (and at --stop-at)."""
    return {
        "name": "gpu-check", "seed": 5,
        "model": {**model, "activation_checkpointing": True, "fused_loss": True, "liger_kernel": not cpu},
        "tokenizer": {"path": str(work / "tokenizer"), "train": True, "vocab_size": 512 if cpu else 2000},
        "data": {"sources": [{"name": "nob", "language": "nob", "paths": [str(CORPUS / "nob.jsonl")]},
                             {"name": "nno", "language": "nno", "paths": [str(CORPUS / "nno.jsonl")]}],
                 "shards_dir": str(work / "shards"), "seq_len": 64 if cpu else 2048, "valid_fraction": 0.15},
        "train": {"global_batch_size": 4 if cpu else 8, "micro_batch_size": 2 if cpu else 4, "max_steps": steps,
                  "lr": 3e-4, "warmup_steps": 2, "precision": "bf16"},
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": steps, "keep_last": 1},
        "eval": {"every_steps": 0, "max_samples": 4},
        "logging": {"every_steps": 1, "peak_tflops": peak_tflops},
    }


def write_config(work: Path, name: str, raw: dict) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []


def max_abs_diff(want: dict, got: dict) -> dict:
    """Largest |want - got| over ``want``'s keys; what is missing on either side named. An empty
    ``want`` (an empty validation split: nothing to compare) is a reason, not a crash."""
    if not want:
        return {"max_abs_diff": None, "reason": "nothing to compare: no rows (an empty validation split?)"}
    missing = sorted(set(want) - set(got))
    if missing:
        return {"max_abs_diff": None, "reason": f"missing {missing}"}
    unusable = sorted(str(k) for k in want if not all(isinstance(v, float | int) and math.isfinite(v)
                                                      for v in (want[k], got[k])))
    if unusable:
        return {"max_abs_diff": None, "reason": f"not finite (null) at {unusable}"}
    return {"max_abs_diff": max(abs(want[k] - got[k]) for k in want)}


def within(diff: dict, tolerance: float) -> bool:
    return diff["max_abs_diff"] is not None and diff["max_abs_diff"] <= tolerance


class Card:
    """Everything the checks share: paths, mode, the deadline, what earlier checks found."""

    def __init__(self, args, deadline: Deadline):
        self.cpu, self.deadline, self.peak_tflops = args.cpu, deadline, args.peak_tflops
        self.work: Path = args.work or args.out / "gpu_check_work"
        self.layers: int | None = None
        self.export_eval: dict | None = None
        self._data_ready = False

    def cli(self, *args: str) -> str:
        return run([sys.executable, "-m", "training.cli", *args], self.deadline)

    def train(self, run_name: str, raw: dict, *extra: str, launch: str | None = None) -> dict:
        """torchrun ``norallm train`` of ``raw`` into WORK/run_name under the kernel probe; its
        record (``launch`` names the launch's config and record when a run has several)."""
        launch = launch or run_name
        config = write_config(self.work, launch, raw)
        record = self.work / f"{launch}.kernels.json"
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
             str(REPO / "bench" / "kernel_probe.py"), str(record), "train", str(config),
             "--run-dir", str(self.work / run_name), *extra], self.deadline)
        return json.loads(record.read_text(encoding="utf-8"))

    def ensure_data(self) -> None:
        """The tokenizer and shards every run here trains on, made once."""
        if not self._data_ready:
            config = write_config(self.work, "data", self.main_recipe())
            self.cli("tokenizer", str(config))
            self.cli("prepare", str(config), "--no-progress")
            self._data_ready = True

    def main_recipe(self, **kw) -> dict:
        return recipe(self.work, self.cpu, main_model(self.cpu, self.layers or 4), self.peak_tflops, **kw)

    def needs_plan(self) -> None:
        if self.layers is None:
            raise Skip("no shape fits the disk or the time left (see the disk check)")


# SDPA without a mask on a Hopper card: PyTorch's flash kernel, or cuDNN's fused attention where
# PyTorch prefers it; either is the fused path (the mem-efficient and math kernels are not)
FUSED_SDPA = ("flash", "cudnn")


def kernel_verdict(probe: dict, required: tuple, cpu: bool) -> dict:
    """The probe's record, and on a GPU which ``required`` kernels did not run (an entry that is a
    tuple is satisfied by any one of its kernels)."""
    out = {k: probe.get(k) for k in ("attn_implementation", "liger_modules", "kernels", "attention_ops",
                                     "liger_kernels", "profiled")}
    if not probe.get("profiled"):
        return {**out, "missing_kernels": ["(no step was profiled)"], "ok": False}
    kernels = probe.get("kernels") or {}
    missing = [] if cpu else ["|".join(r) if isinstance(r, tuple) else r for r in required
                              if not any(kernels.get(k) for k in (r if isinstance(r, tuple) else (r,)))]
    return {**out, "missing_kernels": missing, "ok": not missing}


def check_decision(card: Card) -> dict:
    versions = {}
    for name in ("torch", "transformers"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as e:
            raise CheckFailed(f"{name} import failed: {type(e).__name__}: {e}") from None
    import torch

    from training import distributed

    rt = distributed.decide()
    try:
        distributed.use_deepspeed_accelerator(rt)  # before DeepSpeed picks its accelerator at import
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as e:
        raise CheckFailed(f"deepspeed import failed: {type(e).__name__}: {e}") from None
    versions["deepspeed"] = deepspeed.__version__
    try:
        versions["liger_kernel"] = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        versions["liger_kernel"] = None  # the straight run then fails its liger requirement on a GPU
    if not card.cpu and not rt.is_gpu:
        raise CheckFailed(f"no GPU visible: torch {torch.__version__} (CUDA {torch.version.cuda}, HIP {torch.version.hip}) "
                          f"has torch.cuda.is_available() = {torch.cuda.is_available()}, "
                          f"{torch.cuda.device_count()} devices, CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
    name = torch.cuda.get_device_name(rt.device) if rt.is_gpu else "cpu"
    return {"kind": rt.kind, "device": str(rt.device), "backend": rt.backend, "card": name, **versions,
            "deepspeed_accelerator": get_accelerator()._name, "ok": get_accelerator()._name == rt.ds_accelerator}


def check_sdpa_flash(card: Card) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from training.model.build import SpecialIds, drop_unbound_sliding_window, hf_config

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
    del model
    torch.cuda.empty_cache()
    return {"flash_gqa_kernel": True, "model_attention_on_flash": True}


def write_speed(work: Path, size: int) -> float:
    """Bytes a second written to ``work`` and flushed to disk."""
    path, block = work / "speed.tmp", os.urandom(min(size, 64 * 2**20))
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, size // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return max(1, size // len(block)) * len(block) / seconds


def check_disk(card: Card) -> dict:
    from training.model.build import SpecialIds, count_parameters, hf_config

    free = shutil.disk_usage(card.work).free
    speed = write_speed(card.work, (16 if card.cpu else 512) * 2**20)
    budget_s = 0.3 * card.deadline.left()  # the checkpoint I/O's share of the time left
    plans = []
    for layers in (4,) if card.cpu else (4, 2, 1):
        model = main_model(card.cpu, layers)
        params = count_parameters(hf_config(model["flavor"], model["overrides"], model.get("vocab_size", 512),
                                            SpecialIds(1, 2, 2)))
        ckpt, export = 16 * params, 2 * params
        # at most: the resumed run's step-3 checkpoint + its final one being written, the export beside
        peak = 2 * ckpt + export + GIB
        writes = 4 * ckpt + export  # straight, resumed at 3 and at 6, the ZeRO-3 warm start
        io_s = 2 * writes / speed  # written, then read back to hash
        plans.append({"layers": layers, "parameters": params, "checkpoint_gib": round(ckpt / GIB, 2),
                      "peak_gib": round(peak / GIB, 2), "io_s": round(io_s, 1),
                      "fits": peak <= 0.9 * free and io_s <= budget_s})
    fitting = [p for p in plans if p["fits"]]
    detail = {"free_gib": round(free / GIB, 1), "write_gib_per_s": round(speed / GIB, 2),
              "io_budget_s": round(budget_s), "plans": plans}
    if not fitting:
        smallest = plans[-1]
        raise Skip(f"disk: {detail['free_gib']} GiB free at {detail['write_gib_per_s']} GiB/s; the smallest shape "
                   f"({smallest['layers']} layer) needs {smallest['peak_gib']} GiB at once and ~{smallest['io_s']} s "
                   f"of checkpoint I/O (budget {detail['io_budget_s']} s): {json.dumps(plans)}")
    card.layers = fitting[0]["layers"]
    return {**detail, "layers": card.layers}


def check_train_straight(card: Card) -> dict:
    card.needs_plan()
    card.ensure_data()
    t0 = time.perf_counter()
    probe = card.train("straight", card.main_recipe())
    rows = jsonl(card.work / "straight" / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    verdict = kernel_verdict(probe, (FUSED_SDPA, "liger"), card.cpu)
    finite = len(losses) == MAIN_STEPS and all(x is not None and math.isfinite(x) for x in losses)
    return {"layers": card.layers, "losses": [round(x, 5) for x in losses if x is not None],
            "run_s": round(time.perf_counter() - t0, 1), **verdict, "ok": finite and verdict["ok"]}


def check_throughput(card: Card) -> dict:
    card.needs_plan()
    steps = jsonl(card.work / "straight" / "metrics.jsonl")[3:]  # steps 4–6: after compile and warm-up
    if not steps:
        raise Skip("the straight run left no metrics (see train_straight)")
    out = card.work / "hf.json"
    shape = ["--tiny", "--seq-len", "64", "--micro-batch", "2"] if card.cpu else ["--layers", str(card.layers)]
    run([sys.executable, "bench/train_throughput.py", "--arch", "mistral", "--rows", "hf_eager,hf_ds_zero2",
         "--steps", "2" if card.cpu else "8", "--warmup", "1" if card.cpu else "3",
         "--peak-tflops", str(card.peak_tflops), "--out", str(out), *shape], card.deadline)
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    if "tokens_per_s" not in rows.get("hf_ds_zero2", {}):
        raise CheckFailed(f"train_throughput's hf_ds_zero2 row failed: {rows.get('hf_ds_zero2')}")
    tok_s = statistics.median(m["tokens_per_s"] for m in steps)
    mfu = statistics.median(m["mfu"] for m in steps) if steps[0].get("mfu") is not None else None
    detail = {"norallm_train_tokens_per_s": round(tok_s, 1), "norallm_train_mfu": mfu,
              "peak_tflops": card.peak_tflops}
    for name in ("hf_eager", "hf_ds_zero2"):
        row = rows.get(name, {})
        detail[f"{name}_tokens_per_s"], detail[f"{name}_mfu"] = row.get("tokens_per_s"), row.get("mfu")
        detail[f"{name}_sdpa"] = row.get("sdpa")
        detail[f"ratio_norallm_to_{name}"] = round(tok_s / row["tokens_per_s"], 3) if row.get("tokens_per_s") else None
    return detail


def check_export_reload(card: Card) -> dict:
    card.needs_plan()
    import torch
    from transformers import AutoModelForCausalLM

    from training import distributed
    from training.config import load_config
    from training.eval.perplexity import evaluate, validation_sets
    from training.export import generate

    out = card.work / "export"
    card.cli("export", str(card.work / "straight"), str(out), "--dtype", "bf16")
    cfg = load_config(str(card.work / "straight.yaml"))
    device = distributed.decide().device
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).to(device).eval()
    sets = validation_sets(cfg.data, cfg.tokenizer.load(), cfg.eval.max_samples, 0, 1)
    got = {r["source"]: r["loss"] for r in evaluate(model, sets, cfg.train.micro_batch_size, MAIN_STEPS, device)}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the runs after this one get the card to themselves
    want = {r["source"]: r["loss"] for r in jsonl(card.work / "straight" / "eval.jsonl") if r["step"] == MAIN_STEPS}
    diff = max_abs_diff(want, got)
    sample = generate(out, "Det var en gang", max_new_tokens=20)
    shutil.rmtree(card.work / "straight" / "checkpoints", ignore_errors=True)  # room for the resumed run
    card.export_eval = got
    return {"engine_eval": want, "export_eval": got, **diff, "tolerance": 2e-2, "sample": sample,
            "ok": within(diff, 2e-2)}


def check_resume(card: Card) -> dict:
    card.needs_plan()
    raw = card.main_recipe()
    card.train("resumed", raw, "--stop-at", "3", launch="resumed-stop")
    probe = card.train("resumed", raw)
    a = [r["loss"] for r in jsonl(card.work / "straight" / "metrics.jsonl")]
    b = [r["loss"] for r in jsonl(card.work / "resumed" / "metrics.jsonl")]
    shutil.rmtree(card.work / "resumed" / "checkpoints", ignore_errors=True)
    diff = max_abs_diff(dict(enumerate(a)), dict(enumerate(b)))
    tolerance = 0.0 if card.cpu else 2e-2  # GPU: bf16 kernels' atomics are not bit-reproducible
    return {"straight_losses": [x if x is None else round(x, 5) for x in a],
            "resumed_losses": [x if x is None else round(x, 5) for x in b], **diff,
            "tolerance": tolerance, "kernels": probe.get("kernels"),
            "ok": len(a) == len(b) == MAIN_STEPS and within(diff, tolerance)}


def coverage_run(card: Card, name: str, raw: dict, required: tuple[str, ...]) -> dict:
    """A 3-step run of ``raw`` on the straight run's shards, the kernels it ran, its run dir
    deleted afterwards."""
    card.ensure_data()
    t0 = time.perf_counter()
    try:
        probe = card.train(name, raw)
        losses = [r["loss"] for r in jsonl(card.work / name / "metrics.jsonl")]
    finally:
        shutil.rmtree(card.work / name, ignore_errors=True)
    verdict = kernel_verdict(probe, required, card.cpu)
    finite = len(losses) == raw["train"]["max_steps"] and all(x is not None and math.isfinite(x) for x in losses)
    return {"losses": [round(x, 5) for x in losses if x is not None], "run_s": round(time.perf_counter() - t0, 1),
            **verdict, "ok": finite and verdict["ok"]}


def check_documents(card: Card) -> dict:
    raw = recipe(card.work, card.cpu, small_model(card.cpu, "mistral"), card.peak_tflops, steps=3)
    raw["data"]["document_boundaries"] = True  # the loader's masking; the shards are the same
    return coverage_run(card, "documents", raw, ("flex",))


def check_bloom(card: Card) -> dict:
    raw = recipe(card.work, card.cpu, small_model(card.cpu, "bloom"), card.peak_tflops, steps=3)
    result = coverage_run(card, "bloom", raw, ())
    kernels = result.get("kernels") or {}
    result["fused_attention"] = None if card.cpu else any(kernels.get(k) for k in ("flash", "mem_efficient",
                                                                                   "cudnn", "flex"))
    return result


def check_zero3_warm(card: Card) -> dict:
    card.needs_plan()
    if card.export_eval is None:
        raise Skip("no export to start from (see export_reload)")
    raw = card.main_recipe(steps=2)
    raw["model"].update(init="warm", base=str(card.work / "export"), base_tokenizer=str(card.work / "tokenizer"))
    raw["zero"] = {"stage": 3}
    try:
        probe = card.train("zero3", raw)
        evals = jsonl(card.work / "zero3" / "eval.jsonl")
        losses = [r["loss"] for r in jsonl(card.work / "zero3" / "metrics.jsonl")]
    finally:
        shutil.rmtree(card.work / "zero3", ignore_errors=True)
    at_start = {r["source"]: r["loss"] for r in evals if r["step"] == 0}
    diff = max_abs_diff(card.export_eval, at_start)
    verdict = kernel_verdict(probe, (FUSED_SDPA,), card.cpu)
    return {"step0_eval": at_start, "export_eval": card.export_eval, **diff, "tolerance": 2e-2,
            "losses": [round(x, 5) for x in losses if x is not None], **verdict,
            "ok": within(diff, 2e-2) and len(losses) == 2 and verdict["ok"]}


def prepare_work(work: Path) -> None:
    """An empty scratch dir marked as this script's; one it made before is wiped, anything else refused."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise SystemExit(f"error: {work} is not empty and not a gpu_check scratch dir; choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("scratch dir of bench/gpu_check.py: wiped by its next run\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on a CPU (what make test runs)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--work", type=Path, help="scratch dir for shards, runs, checkpoints (default OUT/gpu_check_work; "
                    "wiped at the start; keep it out of a dir whose files are copied back)")
    ap.add_argument("--deadline-s", type=float, help="for all checks together (default 540; 1500 with --cpu)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100/H200: 989)")
    args = ap.parse_args()
    deadline = Deadline(args.deadline_s or (1500.0 if args.cpu else 540.0))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, as on a machine without a GPU
    card = Card(args, deadline)
    prepare_work(card.work)
    results = Results(args.out / "gpu_check_pending.json", deadline,
                      {"cpu_mode": args.cpu, "deadline_s": round(deadline.left()), "peak_tflops": args.peak_tflops})
    decision = results.run("decision", lambda: check_decision(card))
    name = ((decision or {}).get("card") or "unknown").replace(" ", "_")
    results.rename(args.out / f"gpu_check_{name}.json", card=name)
    if decision is None:
        results.finish()
        print(f"[gpu_check] stopped: {results.report['checks'][0].get('error', '')[:300]}", file=sys.stderr)
        return 2
    slow = 0.0 if args.cpu else 1.0  # on a GPU, do not start a check that cannot finish in time
    if not args.cpu:
        results.run("sdpa_flash", lambda: check_sdpa_flash(card), 20 * slow)
    results.run("disk", lambda: check_disk(card))
    results.run("train_straight", lambda: check_train_straight(card), 60 * slow)
    results.run("throughput", lambda: check_throughput(card), 60 * slow)
    results.run("export_reload", lambda: check_export_reload(card), 30 * slow)
    results.run("resume", lambda: check_resume(card), 60 * slow)
    results.run("documents", lambda: check_documents(card), 45 * slow)
    results.run("bloom", lambda: check_bloom(card), 40 * slow)
    results.run("zero3_warm", lambda: check_zero3_warm(card), 45 * slow)
    results.finish()
    checks = results.report["checks"]
    lines = [f"gpu_check on {name} ({'cpu mode' if args.cpu else 'gpu'}): "
             f"{sum(c['status'] == 'ok' for c in checks)} of {len(checks)} checks ok"]
    lines += [f"- {c['name']}: {c['status']} in {c['seconds']} s"
              + (f" ({(c.get('reason') or c.get('error') or '').splitlines()[0][:160]})" if c["status"] != "ok" else "")
              for c in checks]
    (args.out / f"gpu_check_{name}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if results.report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
