"""Training throughput, side by side in one process on one device: a plain Hugging Face loop,
HF + DeepSpeed, and norallm's own training step (the real engine, levers and loss of training/,
not a copy), at Mistral-7B and BLOOM-7B layer shapes with 8 layers.

    python bench/train_throughput.py                    # GPU: seq 2048, micro-batch 4, bf16
    python bench/train_throughput.py --tiny --steps 3   # CPU smoke at tiny shapes (kept working by a test)
    python bench/train_throughput.py --bloom-attention  # BLOOM: eager vs fused ALiBi attention only

Rows:

- ``hf_eager`` / ``hf_compile``: transformers out of the box — AdamW under autocast, the model's
  own loss, NorMistral's 2048/2048 sliding window kept (so SDPA gets a dense mask), no activation
  checkpointing;
- ``hf_ds_zero1``: the same model and loss under DeepSpeed ZeRO-1;
- ``hf_ds_zero2``: **the baseline the speed goal is stated against**: transformers' model and loss
  under DeepSpeed ZeRO-2 in bf16 (the engine config norallm generates), with the window that
  cannot bind dropped (SDPA gets no mask: its flash kernel) and activation checkpointing on — a
  careful HF + DeepSpeed user's setup, what NORA's recipes train with minus norallm's own levers;
- ``norallm*``: norallm's step as the recipes run it (ZeRO-2, window dropped, checkpointing on,
  fused loss) with each lever on and off.

Prints tokens/s, TFLOP/s, MFU (of --peak-tflops, 989 = H100/H200 dense bf16), peak memory, the
ratio to the plain HF loop and to ``hf_ds_zero2`` per row, and what SDPA received in one untimed
step of each row (calls with a mask, calls causal without one; not for compiled rows, whose
graphs would bake the recording in); checks that norallm's loss and gradients on the first batch
match the plain loop's within bf16 tolerance, and writes JSON (default
bench/results/train_throughput_<device>.json).

FLOPs per token: training.loop.metrics.flops_per_token (6 × the matmul weights, a tied LM head included,
+ 12 × layers × hidden × seq_len).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.batch import Batch  # noqa: E402
from training import distributed  # noqa: E402
from training.config import TrainConfig, ZeroConfig  # noqa: E402
from training.loop.engine import build_engine  # noqa: E402
from training.loop.metrics import flops_per_token  # noqa: E402
from training.model.build import (  # noqa: E402
    SpecialIds,
    build_model,
    drop_unbound_sliding_window,
    enable_activation_checkpointing,
    hf_config,
)
from training.model.kernels import apply_liger, install_chunked_loss  # noqa: E402
from training.model.loss import causal_lm_loss  # noqa: E402

SHAPES = {  # flavor, overrides (8 of the 7B layers), vocab
    "mistral": ("mistral-7b", {"num_hidden_layers": 8}, 32768),
    "bloom": ("bloom-7b", {"n_layer": 8}, 51200),
}
TINY = {  # the tiny Mistral gets a window as long as the sequence, as NorMistral's 2048/2048 (make_model)
    "mistral": ("tiny-mistral", {"hidden_size": 128, "intermediate_size": 352}, 1024),
    "bloom": ("tiny-bloom", {"hidden_size": 128}, 1024),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


LAYERS: int | None = None  # --layers: how many of the 7B layers (default 8)


def make_model(arch: str, tiny: bool, attn: str, seq_len: int, recipe: bool = False):
    """The row's model. ``recipe``: as norallm's trainer builds it for training — the window that
    cannot bind dropped, activation checkpointing on; otherwise as transformers gives it."""
    flavor, overrides, vocab = (TINY if tiny else SHAPES)[arch]
    if LAYERS and not tiny:
        overrides = {"num_hidden_layers" if arch == "mistral" else "n_layer": LAYERS}
    if tiny and arch == "mistral":
        overrides = {**overrides, "sliding_window": seq_len, "max_position_embeddings": max(1024, seq_len)}
    cfg = hf_config(flavor, overrides, vocab, SpecialIds(1, 2, 0), attn)
    model = build_model(cfg, seed=0)
    if recipe:
        drop_unbound_sliding_window(model.config, seq_len)
        enable_activation_checkpointing(model)
        model.train()
    return model, vocab


def hf_loss(model, batch):
    """What a plain HF loop does: labels=input_ids, transformers' own shift and loss."""
    return model(input_ids=batch, labels=batch).loss


def time_loop(step_fn, batches, warmup: int, device) -> tuple[float, float]:
    for b in batches[:warmup]:
        step_fn(b)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step_fn(b)
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return elapsed, peak


def plain_loop(model, device, dtype, compile_model: bool):
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_model else model

    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = hf_loss(fwd, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def deepspeed_loop(model, device, precision, micro, stage: int, hf: bool, levers: dict):
    """HF + DeepSpeed (hf=True: transformers' loss) or norallm's step (hf=False: our loss), with
    the DeepSpeed config norallm's trainer generates for ``stage``."""
    if not hf:
        # as the trainer does (training.model.alibi): never eager ALiBi, unless the row chose its attention itself
        if model.config.model_type == "bloom" and not levers.get("own_attention"):
            from training.model.alibi import install_alibi_attention

            install_alibi_attention(model, "flex_attention" if device.type == "cuda" else "sdpa")
        if levers.get("liger"):
            apply_liger(model)
        if levers.get("fused_loss", True):
            install_chunked_loss(model, 4096)
    train = TrainConfig(global_batch_size=micro, micro_batch_size=micro, max_steps=10**6, lr=1e-5,
                        precision=precision, optimizer="torch")
    engine = build_engine(model, train, ZeroConfig(stage=stage), 1)
    if levers.get("compile"):
        engine.compile()

    def step(batch):
        loss = hf_loss(engine, batch) if hf else causal_lm_loss(engine, Batch(batch, batch.roll(-1, dims=1)))
        engine.backward(loss)
        engine.step()
        return loss

    return step, engine


class SdpaRecord:
    """What torch's SDPA receives while installed: calls with an ``attn_mask`` (a dense mask: not
    the flash kernel) and calls with none and ``is_causal`` (the flash path)."""

    def __init__(self):
        self.counts = {"calls": 0, "with_mask": 0, "causal_without_mask": 0}
        self._sdpa = torch.nn.functional.scaled_dot_product_attention

    def _spy(self, *args, attn_mask=None, is_causal=False, **kwargs):
        self.counts["calls"] += 1
        self.counts["with_mask"] += attn_mask is not None
        self.counts["causal_without_mask"] += attn_mask is None and bool(is_causal)
        return self._sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    def __enter__(self):
        torch.nn.functional.scaled_dot_product_attention = self._spy
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._sdpa


def first_batch_check(arch, tiny, attn, device, dtype, batch) -> dict:
    """norallm's loss/gradients (fused loss, our causal loss) vs the plain HF loss on one batch."""
    model, _ = make_model(arch, tiny, attn, batch.size(1))
    model = model.to(device)
    fused = copy.deepcopy(model)
    install_chunked_loss(fused, 4096)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        a = hf_loss(model, batch)
        b = fused(input_ids=batch[:, :-1], targets=batch[:, 1:]).loss
    a.backward()
    b.backward()
    worst = max((pa.grad.float() - pb.grad.float()).abs().max().item() / (pa.grad.float().abs().max().item() + 1e-12)
                for pa, pb in zip(model.parameters(), fused.parameters(), strict=True))
    result = {"loss_plain": a.item(), "loss_norallm": b.item(), "max_rel_grad_diff": worst}
    result["ok"] = abs(a.item() - b.item()) <= 2e-2 * abs(a.item()) and worst <= 5e-2
    del model, fused
    return result


def bloom_attention_rows(args, device) -> dict:
    """BLOOM's attention paths side by side (training/model/alibi.py): transformers' eager ALiBi attention
    against the fused ones, each in norallm's own step (ZeRO-1, fused loss, bf16), at BLOOM-7B
    layer shapes on a GPU (tiny on CPU). FlexAttention trains on a GPU only (no CPU backward).
    First, in fp32 at a short sequence, each fused path's logits and gradients against eager's."""
    from training.model.alibi import install_alibi_attention

    kinds = ["eager", "sdpa"] + (["flex_attention"] if device.type == "cuda" else [])
    seq = args.seq_len or (128 if args.tiny else 2048)
    micro = args.micro_batch or (2 if args.tiny else 4)

    def bloom(kind: str):
        model, vocab = make_model("bloom", args.tiny, "eager", seq)
        if kind != "eager":
            install_alibi_attention(model, kind)
        return model, vocab

    gen = torch.Generator().manual_seed(0)
    ref, vocab = bloom("eager")
    ref = ref.to(device)
    x = torch.randint(0, vocab, (1, min(seq, 256)), generator=gen).to(device)
    want = ref(input_ids=x, use_cache=False).logits.float()
    want.square().mean().backward()
    out = {"seq_len": seq, "micro_batch": micro, "parity_fp32": {}, "rows": []}
    for kind in kinds[1:]:
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        install_alibi_attention(model, kind)
        logits = model(input_ids=x, use_cache=False).logits.float()
        logits.square().mean().backward()
        grad = max((a.grad - b.grad).abs().max().item() / (a.grad.abs().max().item() + 1e-12)
                   for a, b in zip(ref.parameters(), model.parameters(), strict=True))
        out["parity_fp32"][kind] = {"max_abs_logit_diff": (logits - want).detach().abs().max().item(),
                                   "max_rel_grad_diff": grad}
        print(f"## bloom {kind} vs eager, fp32, seq {x.size(1)}: max |Δlogit| "
              f"{out['parity_fp32'][kind]['max_abs_logit_diff']:.2e}, max rel Δgrad {grad:.2e}", flush=True)
        del model
    del ref
    batches = [torch.randint(0, vocab, (micro, seq), generator=gen).to(device) for _ in range(args.warmup + args.steps)]
    eager_tok_s = None
    for kind in kinds:
        model, _ = bloom(kind)
        fpt = flops_per_token(model, seq)
        step = engine = None
        try:
            step, engine = deepspeed_loop(model.to(device), device, "bf16", micro, 1, False,
                                          {"fused_loss": True, "own_attention": True})
            elapsed, peak = time_loop(step, batches, args.warmup, device)
        except Exception as e:  # e.g. out of memory at these shapes: reported, not fatal
            print(f"bloom {kind:16s} failed: {type(e).__name__}: {str(e)[:200]}")
            out["rows"].append({"attention": kind, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        finally:
            del model, step, engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tok_s = micro * seq * args.steps / elapsed
        eager_tok_s = eager_tok_s or (tok_s if kind == "eager" else None)
        row = {"attention": kind, "tokens_per_s": round(tok_s, 1), "tflops": round(tok_s * fpt / 1e12, 2),
               "mfu": round(tok_s * fpt / 1e12 / args.peak_tflops, 4) if device.type == "cuda" else None,
               "peak_memory_gib": None if peak != peak else round(peak, 2),
               "ratio_to_eager": round(tok_s / eager_tok_s, 3) if eager_tok_s else None}
        out["rows"].append(row)
        mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a"
        mem = f"{row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else "n/a"
        ratio = f"{row['ratio_to_eager']:.2f}×" if row["ratio_to_eager"] else "-"
        print(f"bloom {kind:16s} {tok_s:10.0f} tok/s {row['tflops']:8.1f} TFLOP/s  MFU {mfu:>7s}  peak {mem:>9s}  "
              f"vs eager {ratio}", flush=True)
    out["ok"] = all(p["max_abs_logit_diff"] <= 1e-4 and p["max_rel_grad_diff"] <= 1e-4
                    for p in out["parity_fp32"].values()) and all("error" not in r for r in out["rows"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke)")
    ap.add_argument("--arch", default="mistral,bloom")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--rows", default="hf_eager,hf_compile,hf_ds_zero1,hf_ds_zero2,norallm,norallm_no_fused_loss,"
                    "norallm_liger,norallm_compile,norallm_liger_compile")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--layers", type=int, help="layers of the 7B shapes (default 8)")
    ap.add_argument("--bloom-attention", action="store_true",
                    help="only BLOOM's attention paths: eager vs fused (training/model/alibi.py), side by side")
    args = ap.parse_args()
    global LAYERS
    LAYERS = args.layers
    if args.bloom_attention:
        return bloom_attention_main(args)

    distributed.init()
    device = distributed.runtime().device
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    seq = args.seq_len or (128 if args.tiny else 2048)
    micro = args.micro_batch or (2 if args.tiny else 4)
    precision = "bf16"
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    report = {"card": card, "seq_len": seq, "micro_batch": micro, "precision": precision, "rows": [], "checks": {}}
    print(f"# {card}: seq {seq}, micro-batch {micro}, {precision}, {args.steps} timed steps after {args.warmup}")
    for arch in args.arch.split(","):
        model, vocab = make_model(arch, args.tiny, "sdpa", seq)
        fpt = flops_per_token(model, seq)
        del model
        batches = [torch.randint(0, vocab, (micro, seq), generator=gen).to(device)
                   for _ in range(args.warmup + args.steps)]
        check = first_batch_check(arch, args.tiny, "sdpa", device, dtype, batches[0][:, : seq])
        report["checks"][arch] = check
        print(f"## {arch}: {fpt / 1e9:.2f} GFLOP/token; first-batch check norallm vs plain: loss "
              f"{check['loss_norallm']:.4f} vs {check['loss_plain']:.4f}, max rel grad diff "
              f"{check['max_rel_grad_diff']:.2e} → {'ok' if check['ok'] else 'MISMATCH'}")
        base_tok_s = fair_tok_s = None
        for row in args.rows.split(","):
            model, _ = make_model(arch, args.tiny, "sdpa", seq, recipe=row == "hf_ds_zero2" or row.startswith("norallm"))
            checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
            step = engine = None
            sdpa = None
            try:
                if row in ("hf_eager", "hf_compile"):
                    step = plain_loop(model, device, dtype, compile_model=row == "hf_compile")
                elif row in ("hf_ds_zero1", "hf_ds_zero2"):
                    step, engine = deepspeed_loop(model.to(device), device, precision, micro, int(row[-1]), True, {})
                else:
                    levers = {"fused_loss": "no_fused_loss" not in row, "liger": "liger" in row,
                              "compile": "compile" in row}
                    step, engine = deepspeed_loop(model.to(device), device, precision, micro, 2, False, levers)
                if "compile" not in row:  # one untimed step, recording what SDPA is given
                    with SdpaRecord() as record:
                        step(batches[0])
                    sdpa = record.counts
                elapsed, peak = time_loop(step, batches, args.warmup, device)
            except Exception as e:  # a lever missing on this machine (e.g. liger on CPU) is reported, not fatal
                print(f"{row:24s} failed: {type(e).__name__}: {str(e)[:200]}")
                report["rows"].append({"arch": arch, "row": row, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            finally:
                del model, step, engine  # free the device memory before the next row
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            tok_s = micro * seq * args.steps / elapsed
            tflops = tok_s * fpt / 1e12
            base_tok_s = base_tok_s or (tok_s if row == "hf_eager" else None)
            fair_tok_s = fair_tok_s or (tok_s if row == "hf_ds_zero2" else None)
            entry = {"arch": arch, "row": row, "tokens_per_s": round(tok_s, 1), "tflops": round(tflops, 2),
                     "mfu": round(tflops / args.peak_tflops, 4) if device.type == "cuda" else None,
                     "peak_memory_gib": None if peak != peak else round(peak, 2),
                     "ratio_to_hf_eager": round(tok_s / base_tok_s, 3) if base_tok_s else None,
                     "ratio_to_hf_ds_zero2": round(tok_s / fair_tok_s, 3) if fair_tok_s else None,
                     "sdpa": sdpa, "activation_checkpointing": checkpointing}
            report["rows"].append(entry)
            mfu = f"{100 * entry['mfu']:.1f} %" if entry["mfu"] is not None else "n/a"
            ratio = f"{entry['ratio_to_hf_eager']:.2f}×" if entry["ratio_to_hf_eager"] else "-"
            fair = f"{entry['ratio_to_hf_ds_zero2']:.2f}×" if entry["ratio_to_hf_ds_zero2"] else "-"
            mem = f"{entry['peak_memory_gib']:.1f} GiB" if entry["peak_memory_gib"] is not None else "n/a"
            masks = "" if sdpa is None else f"  SDPA masked {sdpa['with_mask']}/{sdpa['calls']}"
            print(f"{row:24s} {tok_s:10.0f} tok/s {tflops:8.1f} TFLOP/s  MFU {mfu:>7s}  peak {mem:>9s}  "
                  f"vs HF eager {ratio}  vs HF+DS ZeRO-2 {fair}{masks}", flush=True)
    out = args.out or REPO / "bench" / "results" / f"train_throughput_{card.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"# wrote {out}")
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


def bloom_attention_main(args) -> int:
    """``--bloom-attention``: the rows of ``bloom_attention_rows`` and their JSON."""
    distributed.init()
    device = distributed.runtime().device
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {card}: BLOOM attention, {args.steps} timed steps after {args.warmup}")
    report = {"card": card, "precision": "bf16", **bloom_attention_rows(args, device)}
    out = args.out or REPO / "bench" / "results" / f"bloom_attention_{card.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"# wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
