"""The trained engine's logits on a fixed batch, saved by rank 0 for an export-parity check."""

import torch

from training import distributed


def save_logits(engine, out: str) -> None:
    engine.eval()
    torch.manual_seed(0)
    inputs = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        logits = engine(input_ids=inputs).logits.float()
    if distributed.rank() == 0:
        torch.save({"inputs": inputs, "logits": logits}, out)
