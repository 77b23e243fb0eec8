"""Run under torchrun: for each (config, straight run dir, split run dir, logits file) in the JSON
list argv[1], train straight through; train again stopping after step 2, then resume to the end;
save the resumed engine's logits on a fixed batch (rank 0). One launch serves every model family
(tests/test_family_runs.py), so the process start and the DeepSpeed op build are paid once."""

import json
import sys

from logits import save_logits

from training import distributed
from training.config import load_config
from training.loop.trainer import train

for config, straight, split, out in json.loads(sys.argv[1]):
    cfg = load_config(config)
    train(cfg, straight)
    train(cfg, split, stop_at=2)
    save_logits(train(cfg, split).engine, out)
    print(f"[families] {config} done", flush=True)
distributed.shutdown()
distributed.exit_process(0)
