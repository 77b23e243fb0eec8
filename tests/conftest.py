"""Shared test set-up: offline, CPU DeepSpeed, helpers to launch multi-rank runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# The CPU path, by hiding devices as a machine without a GPU would (training.distributed decides;
# DeepSpeed's accelerator follows). A GPU test sets its own visibility.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "norwegian"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train.jsonl").is_file():
        pytest.skip(f"shared Norwegian corpus not found at {SHARED_DATA}")
    return SHARED_DATA
