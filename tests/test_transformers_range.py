"""norallm against every transformers release pyproject.toml allows (the device image has 5.17,
the venv the newest): what the code imports from transformers exists in the oldest allowed
release and in the device image's, and ZeRO-3 builds keep RoPE's frequencies in fp32 whichever
release builds them.

The import check is static, against tests/transformers_api.json: for each checked release, the
names norallm imports that it has and lacks, recorded by ``python bench/transformers_range.py``
from the real wheels (it needs the network; CI does not). A name the code starts importing that
the record does not list fails here until the script has checked it against those releases.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# loaded by path: bench/ on sys.path would shadow the data_pipeline package with bench/data_pipeline.py
_spec = importlib.util.spec_from_file_location("transformers_range", REPO / "bench" / "transformers_range.py")
transformers_range = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(transformers_range)


def test_every_transformers_name_norallm_imports_exists_in_each_checked_release():
    record = json.loads((REPO / "tests" / "transformers_api.json").read_text(encoding="utf-8"))
    floor = transformers_range.allowed_floor()
    assert floor in record["releases"], (
        f"pyproject.toml allows transformers from {floor}, which tests/transformers_api.json has not checked; "
        f"run python bench/transformers_range.py --versions {floor},{','.join(record['releases'])}")
    used = transformers_range.imported_names(REPO)
    assert {"transformers.modeling_outputs:CausalLMOutput", "transformers.initialization:no_init_weights"} <= used
    for release, names in record["releases"].items():
        unchecked = sorted(used - set(names["present"]) - set(names["absent"]))
        assert not unchecked, (f"{unchecked} not yet checked against transformers {release}: run "
                               "python bench/transformers_range.py")
        missing = sorted(used & set(names["absent"]))
        assert not missing, f"transformers {release} lacks {missing}, which norallm imports"


_ARANGE_PROBE = r"""
import json, torch, deepspeed
from training import distributed
distributed.init()
from training.model.build import SpecialIds, hf_config
from training.model.partitioned import arange_keeps_its_dtype, build
ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
      "bf16": {"enabled": True}}
with deepspeed.zero.Init(config_dict_or_path=ds):
    plain = torch.arange(0, 8, 2, dtype=torch.float)
with arange_keeps_its_dtype(), deepspeed.zero.Init(config_dict_or_path=ds):
    kept = torch.arange(0, 8, 2, dtype=torch.float)
    ones = torch.ones(2)
after = torch.arange(0, 8, 2, dtype=torch.float)
model = build(hf_config("tiny-mistral", {}, 300, SpecialIds(1, 2, 0)), torch.bfloat16, ds)
print(json.dumps({"plain": str(plain.dtype), "kept": str(kept.dtype), "ones": str(ones.dtype),
                  "after": str(after.dtype),
                  "inv_freq": sorted({str(b.dtype) for n, b in model.named_buffers() if n.endswith("inv_freq")}),
                  "weights": sorted({str(p.dtype) for p in model.parameters()})}))
distributed.shutdown()
"""


def test_zero3_build_keeps_a_float_arange_and_rope_frequencies_in_fp32():
    """zero.Init casts a float torch.arange to bf16 (transformers 5.17 builds Mistral's inv_freq
    from one); inside arange_keeps_its_dtype it stays fp32 while other constructors still cast,
    and a ZeRO-3 build's inv_freq is fp32 with bf16 weights."""
    proc = subprocess.run([sys.executable, "-c", _ARANGE_PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["plain"] == "torch.bfloat16", got  # what the context is there to undo
    assert got == {"plain": "torch.bfloat16", "kept": "torch.float32", "ones": "torch.bfloat16",
                   "after": "torch.float32", "inv_freq": ["torch.float32"], "weights": ["torch.bfloat16"]}
