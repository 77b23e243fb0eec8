"""metrics.jsonl / eval.jsonl on rank 0, optionally mirrored to wandb (offline by default).

MFU estimate: FLOPs per token = 6 × (parameters excluding the input embedding, which is a
lookup; tied to the LM head, as in BLOOM, it is the head's matmul and counts)
+ 12 × layers × hidden × seq_len (the attention score and value matmuls, forward + backward).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import time
from pathlib import Path

import torch

from norallm.files import write_text_atomic
from training import distributed
from training.config import LoggingConfig
from training.loop.guard import finite_or_none

# Dense bf16 peak per device (TFLOP/s), for the MFU estimate when logging.peak_tflops is unset.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "MI250X": 191.5, "MI300X": 1307.0}


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of ``model`` at ``seq_len``: 6 × N + the
    attention term, N the parameters that take part in a matmul. The input embedding is a
    lookup and is left out, unless it is tied to the LM head (BLOOM): then it is the head's
    (vocab × hidden) matmul and counts."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if tied or p is not emb)  # ZeRO-3: whole sizes
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = cfg.num_attention_heads  # the attention's width is heads × head_dim (Mistral-Nemo: not hidden)
    return 6.0 * n + 12.0 * layers * heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads) * seq_len


def peak_flops(cfg: LoggingConfig) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if distributed.runtime().is_gpu:
        name = torch.cuda.get_device_name()
        for key, tflops in sorted(_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
            if key in name:
                return tflops * 1e12
    return None


def memory_gib() -> float:
    if distributed.runtime().is_gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a line torn by a kill mid-write


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows past ``max_step`` (written by a run that died after its last checkpoint), and a
    last line torn by a kill."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if (step := _step_of(line)) is not None and step <= max_step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


class MetricsLog:
    """Appends JSON lines on rank 0; other ranks do nothing."""

    def __init__(self, run_dir: Path, rank: int, cfg: LoggingConfig, run_name: str, config: dict):
        self.enabled = rank == 0
        self.run_dir = run_dir
        self._wandb = None
        if self.enabled and cfg.wandb and cfg.wandb_mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=cfg.wandb_project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                mode=os.environ.get("WANDB_MODE", cfg.wandb_mode), config=config,
            )

    def _append(self, file: str, row: dict) -> None:
        with open(self.run_dir / file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def step(self, row: dict) -> None:
        if self.enabled:
            self._append("metrics.jsonl", row)
            if self._wandb:
                self._wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def eval(self, row: dict) -> None:
        if self.enabled:
            self._append("eval.jsonl", row)
            if self._wandb:
                self._wandb.log({f"eval/{row['source']}/loss": row["loss"]}, step=row["step"])

    def close(self) -> None:
        if self._wandb:
            self._wandb.finish()


class Console:
    """Rank 0's progress on the console. On a terminal, a tqdm bar over the steps, the latest
    progress line as its postfix; elsewhere (a Slurm .out, a pipe) the progress line itself at
    every logging step, which a log keeps and a bar would smear."""

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        import sys

        stream = stream or sys.stdout
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=stream, dynamic_ncols=True,
                            leave=True)

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text.split(": ", 1)[-1], refresh=True)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_line(step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None,
                  step_time_s: float) -> str:
    """What rank 0 prints every logging step, so that a job's .out shows the run moving."""
    eta = int(step_time_s * (max_steps - step))
    eta_text = f"{eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
    mfu_text = f", MFU {100 * mfu:.1f} %" if mfu is not None else ""
    return (f"[train] step {step}/{max_steps}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s"
            f"{mfu_text}, {step_time_s:.2f} s/step, ETA {eta_text}")


class Progress:
    """A metrics.jsonl row and a progress line every ``logging.every_steps`` (and at the last step),
    with the mean step time since the last row; evaluation and save time are not step time
    (``restart`` after them)."""

    def __init__(self, log: MetricsLog, console: Console, max_steps: int, every_steps: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops_per_s: float | None, world_size: int):
        self.log, self.console, self.max_steps, self.every = log, console, max_steps, every_steps
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops_per_s
        self.world_size = world_size
        self.restart()

    def restart(self) -> None:
        self._since, self._steps = time.perf_counter(), 0

    def stepped(self, step: int) -> bool:
        """Count a step; whether it is a logging step."""
        self._steps += 1
        self.console.step(step)
        return step % self.every == 0 or step == self.max_steps

    def report(self, step: int, loss: float, lr: float, grad_norm, tokens: int, epoch: float, extra: dict) -> None:
        dt = (time.perf_counter() - self._since) / self._steps  # mean step time since the last row
        tok_s = self.tokens_per_step / dt
        mfu = tok_s * self.flops_per_token / (self.world_size * self.peak) if self.peak else None
        self.log.step(finite_or_none({
            "step": step, "loss": loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": tokens, "tokens_per_s": tok_s, "epoch": epoch, "mfu": mfu,
            "memory_gib": memory_gib(), "step_time_s": dt, **extra,
        }))
        if self.log.enabled:
            self.console.line(progress_line(step, self.max_steps, loss, lr, tok_s, mfu, dt))
        self.restart()

    def close(self) -> None:
        self.console.close()
        self.log.close()
