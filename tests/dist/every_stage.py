"""Run as a plain process (a world of one): for each ZeRO stage and precision named on the command
line (``2:bf16``), train the config's tiny model one step into ``OUT/<stage><precision>``, then
resume it for a second step — the resume loads every DeepSpeed file weights-only
(training.checkpoint.safe_load). One process for all of them: a process start costs more than a step."""

import sys
from pathlib import Path

import yaml

from training import distributed
from training.config import parse_config
from training.loop.trainer import train

config, out, combos = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
base = yaml.safe_load(config.read_text(encoding="utf-8"))
for combo in combos:
    stage, precision = combo.split(":")
    raw = {**base, "zero": {"stage": int(stage)}, "train": {**base["train"], "precision": precision, "max_steps": 1}}
    raw["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    run_dir = out / f"{stage}{precision}"
    train(parse_config(raw), run_dir)
    raw["train"]["max_steps"] = 2
    train(parse_config(raw), run_dir)
distributed.shutdown()
distributed.exit_process(0)
