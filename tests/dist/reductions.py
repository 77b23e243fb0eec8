"""Run under torchrun with 2 ranks: the loop's reductions (training.distributed) on a process group
shaped like a GPU node's, ``cpu:<b>,cuda:<b>`` (gloo stands in for NCCL on a CPU machine), and the
defect it avoids: with an accelerator-only group (``cuda:gloo``, like ``nccl``), a host tensor
cannot be reduced at all. Prints one JSON line on rank 0."""

import json
import sys

import torch
import torch.distributed as dist

from training import distributed

dist.init_process_group(backend=sys.argv[1])
rank = dist.get_rank()
out: dict = {"backend": sys.argv[1]}
try:
    out["sum"] = distributed.sum_(torch.tensor([1.0, float(rank)])).tolist()
    out["mean"] = distributed.mean(torch.tensor(float(rank)))
    out["any_rank"] = [distributed.any_rank(rank == 1), distributed.any_rank(False)]
    out["gather"] = distributed.gather_objects({"rank": rank})
except RuntimeError as e:
    out["error"] = str(e).splitlines()[0]
if rank == 0:
    print(json.dumps(out), flush=True)
dist.destroy_process_group()
