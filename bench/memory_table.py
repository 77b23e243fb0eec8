"""Per-GPU memory for the 7B recipes, computed (not measured): model states under ZeRO-1/2/3 at
8, 64 and 512 GPUs, activations per sequence, and the largest micro-batch that fits on one 80 GB
GPU with ZeRO-3 + CPU offload of parameters and optimizer.

    python bench/memory_table.py            # prints the Markdown tables quoted in the README

Assumptions (stated so they can be checked against a measurement):
- bf16 mixed precision with fp32 master weights and AdamW: per parameter 2 B (bf16 weight) +
  2 B (bf16 gradient) + 12 B (fp32 master, m, v) = 16 B (the ZeRO paper's K = 12);
  ZeRO-1 shards the 12 B, ZeRO-2 the 12 B and the gradients, ZeRO-3 all 16 B.
- activations per layer and sequence (bf16, SDPA/flash attention: no seq² scores kept):
  ~16·s·h bytes for the attention block and norms + 4·s·f·2 bytes for SwiGLU (gate, up,
  activation, product); with activation checkpointing only each layer's input (2·s·h bytes) is
  kept, plus one layer recomputed at a time;
- the fused (chunked) loss keeps one 4,096-token chunk of fp32 logits; the plain loss keeps the
  bf16 logits, their fp32 copy and its gradient (10 bytes per token per vocabulary entry);
- ZeRO-3 + offload keeps ~2 GB of gathered bf16 parameters live on the GPU (DeepSpeed's
  stage3_max_live_parameters = 1e9) and reserves 6 GB for the allocator, NCCL and workspace.
"""

from __future__ import annotations

import argparse

GIB = 2**30


def model_states_gib(params: float, stage: int, gpus: int) -> float:
    weights, grads, optim = 2 * params, 2 * params, 12 * params
    if stage == 1:
        return (weights + grads + optim / gpus) / GIB
    if stage == 2:
        return (weights + (grads + optim) / gpus) / GIB
    return (weights + grads + optim) / gpus / GIB


def activations_gib(seq: int, hidden: int, ffn: int, layers: int, vocab: int, checkpointing: bool,
                    fused_loss: bool) -> float:
    """Per sequence of ``seq`` tokens."""
    per_layer = 16 * seq * hidden + 8 * seq * ffn
    body = layers * 2 * seq * hidden + per_layer if checkpointing else layers * per_layer
    logits = 4096 * vocab * 4 if fused_loss else seq * vocab * 10
    return (body + logits) / GIB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=7_248_023_552)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--gpu-gib", type=float, default=80 * 1e9 / GIB)
    args = ap.parse_args()

    print(f"Model states per GPU, GiB (NorMistral-7B, {args.params / 1e9:.3f}B parameters, bf16 + fp32 AdamW):\n")
    print("| GPUs | ZeRO-1 | ZeRO-2 | ZeRO-3 |")
    print("|---:|---:|---:|---:|")
    for gpus in (8, 64, 512):
        row = " | ".join(f"{model_states_gib(args.params, s, gpus):.1f}" for s in (1, 2, 3))
        print(f"| {gpus} | {row} |")
    print(f"\nActivations per {args.seq_len}-token sequence, GiB:\n")
    print("| | plain loss | fused (chunked) loss |")
    print("|---|---:|---:|")
    for ckpt in (False, True):
        vals = [activations_gib(args.seq_len, args.hidden, args.ffn, args.layers, args.vocab, ckpt, f)
                for f in (False, True)]
        print(f"| activation checkpointing {'on' if ckpt else 'off'} | {vals[0]:.2f} | {vals[1]:.2f} |")
    live_params = 2 * 1e9 / GIB
    reserve = 6.0
    print(f"\nLargest micro-batch on one {args.gpu_gib:.1f} GiB GPU, full {args.layers}-layer model, ZeRO-3 + "
          f"CPU offload of parameters and optimizer ({live_params:.1f} GiB live parameters, {reserve:.0f} GiB "
          f"reserve; the host needs ~{16 * args.params / GIB:.0f} GiB for the offloaded states):\n")
    print("| activation checkpointing | plain loss | fused (chunked) loss |")
    print("|---|---:|---:|")
    for ckpt in (False, True):
        fits = []
        for fused in (False, True):
            per_seq = activations_gib(args.seq_len, args.hidden, args.ffn, args.layers, args.vocab, ckpt, fused)
            logits_once = (4096 * args.vocab * 4) / GIB if fused else 0.0  # the chunk is shared, not per sequence
            fits.append(int((args.gpu_gib - live_params - reserve - logits_once) // (per_seq - logits_once)))
        print(f"| {'on' if ckpt else 'off'} | {fits[0]} | {fits[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
