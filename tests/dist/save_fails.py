"""Run under torchrun with 2 ranks: store.save on a fake engine (tests/test_checkpoint_safety.py)
with one write failing on one rank per save — rank 0's meta.json, rank 1's shard, rank 0's
`latest` — between saves that work. Each rank prints one JSON line per save: the step, the error
it raised (None: saved) and what `latest` names afterwards."""

import contextlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_checkpoint_safety import FakeEngine, disk_full_at, save_files  # noqa: E402

from training import distributed  # noqa: E402

from training.checkpoint import store

dist.init_process_group("gloo")
rank = dist.get_rank()
run = Path(sys.argv[1])
extra = save_files(run) if rank == 0 else {"config.yaml": run / "config.yaml", "tokenizer": run / "tok"}
distributed.barrier()
failing = {4: (0, "meta.json"), 6: (1, "zero_pp_rank_1_*"), 8: (0, "latest*")}
for step in (2, 4, 6, 8, 10):
    who, pattern = failing.get(step, (None, None))
    error = None
    with disk_full_at(pattern) if who == rank else contextlib.nullcontext():
        try:
            store.save(FakeEngine(), run, step, {"step": step, "tokens_consumed": step}, 3, extra)
        except store.CheckpointError as e:
            error = str(e)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    print(json.dumps({"step": step, "error": error, "latest": latest}), flush=True)
dist.destroy_process_group()
