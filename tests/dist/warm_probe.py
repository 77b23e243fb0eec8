"""Run under torchrun: ``train()`` with a look at the model as ``build_training_model`` returns it,
before the engine exists — what each rank holds of every parameter (ZeRO-3: its partition, or the
whole tensor), the embedding and LM-head rows (gathered), and the RoPE ``inv_freq`` buffers. Each
rank saves what it saw to argv[3]/rank<r>.pt."""

import sys
from pathlib import Path

import torch

from training import distributed

from training.loop import setup, trainer
from training.config import load_config

config, run_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
build = setup.build_training_model


def probed_build(*args, **kwargs):
    model = build(*args, **kwargs)
    held = {}
    for name, p in model.named_parameters():
        partitioned = hasattr(p, "ds_id")
        held[name] = {"partitioned": partitioned, "numel": p.ds_numel if partitioned else p.numel(),
                      "whole_now": p.numel(), "local": p.ds_tensor.numel() if partitioned else p.numel()}
    rows = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    if any(hasattr(p, "ds_id") for p in rows):
        import deepspeed

        with deepspeed.zero.GatheredParameters(rows):
            rows = [w.detach().clone() for w in rows]
    else:
        rows = [w.detach().clone() for w in rows]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"held": held, "embed": rows[0], "lm_head": rows[1], "inv_freq": buffers},
               out / f"rank{distributed.rank()}.pt")
    return model


setup.build_training_model = probed_build
trainer.train(load_config(config), run_dir)
distributed.shutdown()
distributed.exit_process(0)
