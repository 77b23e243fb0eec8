"""`norallm preflight`: before step 1, every rank checks what would otherwise fail hours into a job.

Run with the same launcher as training (the sbatch scripts run it as the first step). Each rank
checks, on its own node:

- the run directory is writable (a file is written, synced and removed);
- the tokenizer loads and matches the fingerprint in every source's shard manifest, and the
  shard files the manifests list are there with the sizes they record;
- with ``--require-gpu``, a GPU is visible for its local rank;
- the number of ranks agrees with the config (``train.world_size``, batch divisibility);

then all ranks all-reduce a known tensor and gather each other's findings. Any problem ends the
job with one message naming rank and host; a rank that cannot reach the others within
``timeout_s`` says so itself instead of hanging until the collective's 30-minute timeout.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import DataConfig, TokenizerConfig
from norallm.errors import NorallmError
from norallm.exits import EXIT_USER_ERROR
from training.config import Config


class PreflightError(NorallmError):
    """At least one rank cannot train; the message lists each problem with rank and host."""


@dataclass(frozen=True)
class Finding:
    rank: int
    host: str
    problems: tuple[str, ...]


def check_run_dir(run_dir: Path, rank: int, host: str) -> list[str]:
    probe = run_dir / f".preflight-rank{rank:05d}-{host}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        return [f"run dir {run_dir} is not writable ({e.strerror or e}); fix its permissions or quota, or "
                "choose another --run-dir / slurm.run_dir."]
    return []


def check_data(tok: TokenizerConfig, data: DataConfig) -> tuple[list[str], str]:
    """Tokenizer ↔ shard manifests ↔ shard files. Returns (problems, one-line summary)."""
    from data_pipeline.shards import open_split

    try:
        tokenizer = tok.load()
        names = [s.name for s in data.sources]
        train = open_split(data.shards_dir, names, "train", tokenizer.fingerprint)
        open_split(data.shards_dir, names, "valid", tokenizer.fingerprint)
    except NorallmError as e:
        return [str(e)], ""
    return [], f"tokenizer {tokenizer.fingerprint} matches the shards of {len(names)} source(s), " \
               f"{train.total_tokens:,} train tokens"


def check_conversations(data: DataConfig) -> tuple[list[str], str]:
    """An SFT config's conversation files exist (they are read and packed at train time)."""
    from data_pipeline.sources import resolve_files

    try:
        files = [f for s in data.sources for f in resolve_files(s)]
    except NorallmError as e:
        return [str(e)], ""
    return [], f"{len(files)} conversation file(s) of {len(data.sources)} source(s), packed at train time"


def check_training_data(cfg: Config) -> tuple[list[str], str]:
    """What the training job will read is there: the prepared shards, or an SFT config's conversations."""
    from training.data.modes import mode_of

    return check_data(cfg.tokenizer, cfg.data) if mode_of(cfg).reads_shards else check_conversations(cfg.data)


def check_gpu(local_rank: int) -> list[str]:
    import torch

    from training import distributed

    if not distributed.runtime().is_gpu:
        return ["no GPU is visible to torch; check --gpus-per-node and that the "
                "container runs with GPU support (--nv / ROCm)."]
    if local_rank >= torch.cuda.device_count():
        return [f"local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) visible on this node; "
                "start at most one rank per GPU."]
    return []


def _give_up(rank: int, host: str, timeout_s: float) -> None:
    """Called by the watchdog when joining the others or the all-reduce takes too long."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "?"
    print(f"error: preflight: rank {rank} on {host} could not all-reduce with the other ranks (world size "
          f"{world}, rendezvous {where}) within {timeout_s:.0f} s. Check that every node can reach the "
          "rendezvous host and port, the network interface variables (NCCL_SOCKET_IFNAME) and that all "
          "ranks were started.", file=sys.stderr, flush=True)
    os._exit(EXIT_USER_ERROR)


def _env_rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def preflight(cfg: Config, run_dir: str | Path, require_gpu: bool = False, timeout_s: float = 300) -> str:
    """Run every check on this rank and agree with the others. Returns rank 0's summary; raises
    PreflightError (on the ranks that found a problem, and on rank 0 listing all of them)."""
    import torch  # imported here so that `norallm submit` can use check_data without torch

    from training import distributed
    from training.loop.setup import check_world

    host = socket.gethostname()
    rank = _env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
    problems = check_run_dir(Path(run_dir), rank, host)
    data_problems, summary = check_training_data(cfg)
    problems += data_problems
    if require_gpu:
        problems += check_gpu(local_rank)

    watchdog = threading.Timer(timeout_s, _give_up, (rank, host, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        # the run's own timeouts: a node lost during the preflight ends the job for requeue, as in training
        rank, world_size = distributed.init((), cfg.train.collective_timeout_s, cfg.train.heartbeat_timeout_s)
        try:
            check_world(cfg, world_size)
        except NorallmError as e:
            problems.append(str(e).replace("\n", " "))
        # on the accelerator: this is the collective training relies on (NCCL/RCCL on a GPU node)
        probe = distributed.sum_(torch.tensor([1.0, float(rank)], device=distributed.runtime().device))
        if probe.tolist() != [float(world_size), float(world_size * (world_size - 1) // 2)]:
            problems.append(f"all-reduce of a known tensor gave {probe.tolist()}; the collective backend is broken.")
        findings: list[Finding | None] = distributed.gather_objects(Finding(rank, host, tuple(problems)))
    except (RuntimeError, OSError, ValueError) as e:  # torch.distributed's errors derive from these
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PreflightError(f"preflight: rank {rank} on {host} could not all-reduce with the other ranks "
                             f"(rendezvous {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                             f"{first_line}. Check that all ranks were started and can reach that address.") from None
    finally:
        watchdog.cancel()
    distributed.shutdown()

    failed = [f for f in findings if f is not None and f.problems]
    hosts = sorted({f.host for f in findings if f is not None})
    if not failed:
        return f"{world_size} rank(s) on {len(hosts)} host(s): all-reduce ok, run dir writable, {summary}"
    if rank == 0:
        raise PreflightError(_report(failed, world_size))
    if problems:
        raise PreflightError(f"preflight: rank {rank} on {host}: " + " ".join(problems))
    raise SystemExit(2)  # this rank is fine; rank 0 reports the others


def _report(failed: list[Finding], world_size: int) -> str:
    """One message; ranks with the same problem are listed together."""
    by_problem: dict[str, list[Finding]] = {}
    for f in failed:
        for p in f.problems:
            by_problem.setdefault(p, []).append(f)
    lines = [f"preflight failed on {len(failed)} of {world_size} rank(s):"]
    for problem, where in by_problem.items():
        ranks = ", ".join(f"rank {f.rank} on {f.host}" for f in where[:8])
        more = f" and {len(where) - 8} more" if len(where) > 8 else ""
        lines.append(f"  - {ranks}{more}: {problem}")
    return "\n".join(lines)
