"""Run under torchrun: train from a config, then save the trained engine's logits on a fixed
batch (rank 0) so a test can compare them with the exported model's."""

import sys
from pathlib import Path

from logits import save_logits

from training import distributed
from training.config import load_config
from training.loop.trainer import train

config, run_dir, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cfg = load_config(config)
result = train(cfg, run_dir)
save_logits(result.engine, out)
distributed.shutdown()
distributed.exit_process(0)  # as `norallm train` ends (training.distributed.exit_process)
