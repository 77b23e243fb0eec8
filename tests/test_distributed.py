"""training.distributed: one decision for the device, one module for the reductions, and the GPU
defect it removes (CPU tensors into an accelerator-only process group) reproduced on CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from training import distributed

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather\w*|broadcast\w*|barrier|"
                         r"reduce_scatter\w*|init_process_group|destroy_process_group|new_group|send|recv)\(")


def test_no_other_module_calls_collectives_or_decides_the_device():
    offenders = []
    for path in sorted([*(REPO / "training").rglob("*.py"), *(REPO / "data_pipeline").rglob("*.py")]):
        if path.name == "distributed.py":
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in COLLECTIVES.finditer(text)]
        offenders += [f"{path.relative_to(REPO)}: cuda.is_available" for _ in re.finditer(r"cuda\.is_available", text)]
        offenders += [f"{path.relative_to(REPO)}: smi on PATH" for _ in re.finditer(r"(nvidia|rocm)-smi", text)]
    assert not offenders, offenders


def test_decision_cpu_cuda_and_rocm(monkeypatch):
    assert distributed.decide(0) == distributed.Runtime("cpu", torch.device("cpu"), "gloo", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.version, "hip", None)
    rt = distributed.decide(5)  # local rank 5 on a 4-GPU node wraps, it does not index past the end
    assert rt == distributed.Runtime("cuda", torch.device("cuda", 1), "cpu:gloo,cuda:nccl", "cuda")
    monkeypatch.setattr(torch.version, "hip", "6.2.4")  # ROCm torch: same device API, RCCL behind "nccl"
    assert distributed.decide(2).kind == "rocm" and distributed.decide(2).ds_accelerator == "cuda"


def test_deepspeed_gets_the_decided_accelerator(monkeypatch):
    from deepspeed.accelerator import get_accelerator, real_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # a stale setting is overruled by what torch sees
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
    distributed.use_deepspeed_accelerator(distributed.decide(0))
    assert get_accelerator()._name == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu:gloo,cuda:gloo", "cuda:gloo"])
def test_reductions_on_a_gpu_shaped_group(backend):
    from test_training import torchrun

    out = json.loads(torchrun(str(REPO / "tests" / "dist" / "reductions.py"), backend).stdout.strip().splitlines()[-1])
    if backend == "cuda:gloo":  # the defect: an accelerator-only group cannot take host tensors
        assert "No backend type associated with device type cpu" in out["error"], out
        return
    assert out == {"backend": backend, "sum": [2.0, 1.0], "mean": 0.5, "any_rank": [True, False],
                   "gather": [{"rank": 0}, {"rank": 1}]}
