"""Run under torchrun: ``train()`` with probes on what the loop's reader cannot see — the module's
mode at every training forward, activation-checkpointed layer calls, what SDPA receives, and how
often the loop reduces across ranks. Rank 0 writes the counts as JSON to argv[3]."""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from training import distributed

from training.loop import setup, trainer
from training.config import load_config

probe = {"train_forwards": 0, "train_forwards_in_eval_mode": 0, "checkpointed_layer_calls": 0,
         "loss_reductions": 0, "stop_agreements": 0, "sdpa_masks": []}
build = setup.build_training_model


def probed_build(*args, **kwargs):
    model = build(*args, **kwargs)

    def pre_hook(module, _args, _kwargs):
        if torch.is_grad_enabled():  # a training forward (eval runs under no_grad)
            probe["train_forwards"] += 1
            probe["train_forwards_in_eval_mode"] += not module.training

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and hasattr(layer, "_gradient_checkpointing_func"):
            def counted(*a, _f=layer._gradient_checkpointing_func, **k):
                probe["checkpointed_layer_calls"] += 1
                return _f(*a, **k)

            layer._gradient_checkpointing_func = counted
    return model


def counting(name, fn):
    def wrapped(*a, **k):
        probe[name] += 1
        return fn(*a, **k)
    return wrapped


sdpa = F.scaled_dot_product_attention


def spy_sdpa(*a, **k):
    mask = k.get("attn_mask")
    entry = None if mask is None else list(mask.shape)
    if entry not in probe["sdpa_masks"]:
        probe["sdpa_masks"].append(entry)
    return sdpa(*a, **k)


setup.build_training_model = probed_build
distributed.mean = counting("loss_reductions", distributed.mean)
distributed.any_rank = counting("stop_agreements", distributed.any_rank)
F.scaled_dot_product_attention = spy_sdpa
result = trainer.train(load_config(sys.argv[1]), Path(sys.argv[2]))
probe["final_step"] = result.step
if distributed.rank() == 0:
    Path(sys.argv[3]).write_text(json.dumps(probe), encoding="utf-8")
distributed.shutdown()
distributed.exit_process(0)
