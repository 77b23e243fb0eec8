"""``norallm train`` with a record of what really ran: run under torchrun as

    python -m torch.distributed.run --standalone --nproc_per_node=1 bench/kernel_probe.py OUT.json \\
        train CONFIG --run-dir DIR [...]

The real CLI trains (``training.cli.main``); the probe only watches. It profiles one whole
training step (forward, backward, optimizer: from the end of the first step the run takes to the
end of the next, told apart by the loop's once-a-step stop agreement) with torch.profiler, on the
GPU with its kernels, and records on rank 0:

- ``attn_implementation``: what the built model's config dispatches attention to;
- ``liger_modules``: modules liger-kernel swapped in (0 when it was not applied);
- ``kernels``: which of flash / mem-efficient / cuDNN / math SDPA, FlexAttention, eager attention
  (``baddbmm`` + ``softmax``) and liger's Triton kernels appear among the profiled step's
  operators and device kernels; on a CPU, ``{"cpu": "none"}`` for the device kernels, with the
  CPU attention operators in ``attention_ops``;
- ``attention_ops``: those operator and kernel names, so a reader can judge the classification.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# operator or kernel name → kind of attention kernel; a name may match several
_ATTENTION = {
    "flash": re.compile(r"flash_attention(?!_for_cpu)|_flash_attention_forward|flash_fwd|flash_bwd|pytorch_flash"),
    "mem_efficient": re.compile(r"efficient_attention|fmha_cutlass|mem_eff"),
    "cudnn": re.compile(r"cudnn_attention|cudnn.*sdpa|sdpa.*cudnn"),
    "math": re.compile(r"_scaled_dot_product_attention_math"),
    "flex": re.compile(r"flex_attention|triton_tem_fused"),
    "eager": re.compile(r"^aten::baddbmm$|^aten::_softmax$"),
    "cpu_sdpa": re.compile(r"_for_cpu"),
}
RANK = int(os.environ.get("RANK", "0"))  # the group is gone by the time the record is written
# liger-kernel's Triton kernels (liger_kernel/ops/*.py), as CUDA kernel names
_LIGER = re.compile(r"^_(rms_norm|swiglu|layer_norm|geglu)_(forward|backward)_kernel|^_triton_rope")


def classify(op_names: set[str], kernel_names: set[str], on_gpu: bool) -> dict:
    """Which attention and liger kernels ran, from a profiled step's operator names (CPU side) and
    device kernel names (empty on a CPU)."""
    names = op_names | kernel_names
    seen = {kind: sorted(n for n in names if pattern.search(n)) for kind, pattern in _ATTENTION.items()}
    attention_ops = sorted({n for found in seen.values() for n in found})
    if not on_gpu:
        return {"kernels": {"cpu": "none"}, "attention_ops": attention_ops}
    kernels = {kind: bool(found) for kind, found in seen.items() if kind != "cpu_sdpa"}
    # eager attention is baddbmm/softmax with no fused attention beside it
    kernels["eager"] = kernels["eager"] and not any(kernels[k] for k in ("flash", "mem_efficient", "cudnn", "flex"))
    kernels["liger"] = any(_LIGER.search(n) for n in kernel_names)
    return {"kernels": kernels, "attention_ops": attention_ops[:40],
            "liger_kernels": sorted(n[:80] for n in kernel_names if _LIGER.search(n))[:10]}


def main() -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from training import cli, distributed
    from training.loop import setup
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    probe: dict = {"profiled": False}
    build = setup.build_training_model
    agreed = distributed.any_rank
    state = {"ticks": 0, "prof": None}

    def probed_build(*args, **kwargs):
        model = build(*args, **kwargs)
        probe["attn_implementation"] = model.config._attn_implementation
        probe["liger_modules"] = sum(type(m).__name__.startswith("Liger") for m in model.modules())
        return model

    def activities():
        return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def stop_profiler() -> None:
        prof = state["prof"]
        if prof is None:
            return
        state["prof"] = None
        prof.__exit__(None, None, None)
        events = prof.events()
        ops = {e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU}
        kernels = {e.name for e in events if e.device_type != torch.autograd.DeviceType.CPU}
        kernels |= {k.name for e in events for k in getattr(e, "kernels", [])}  # kernels an operator launched
        probe.update(classify(ops, kernels, torch.cuda.is_available()), profiled=True,
                     device_kernels_seen=len(kernels))

    def ticking_any_rank(flag):
        """Once a step, after the optimizer step: starts the profiler after the first, stops it after the second."""
        result = agreed(flag)
        state["ticks"] += 1
        if state["ticks"] == 1 and RANK == 0:
            state["prof"] = profile(activities=activities())
            state["prof"].__enter__()
        elif state["ticks"] == 2:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stop_profiler()
        return result

    setup.build_training_model = probed_build
    distributed.any_rank = ticking_any_rank
    try:
        code = cli.main(argv)
    finally:
        stop_profiler()  # a run of one step: what was profiled of it
        if RANK == 0:
            out.write_text(json.dumps(probe, indent=1) + "\n", encoding="utf-8")
    if distributed.joined():
        distributed.exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
