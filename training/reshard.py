"""Resume on another number of ranks: between two jobs of a long run the allocation changes (fewer
free nodes, a drained node, a smaller quota). The data order continues exactly on any number of
ranks (the loader's state is the global sample count); the ZeRO-partitioned optimizer and model
states are re-partitioned through DeepSpeed's universal checkpoint format:

- ZeRO-1 and ZeRO-2 only: for ZeRO-3 the conversion restores the weights but not the optimizer's
  continuation exactly (measured; see ``prepare``), so that case is refused with what to do instead;
- the checkpoint is converted once, on rank 0, with ``deepspeed.checkpoint.ds_to_universal`` into
  ``checkpoints/stepNNNNNNNN.universal`` (written under a temporary name, then renamed: a killed
  conversion leaves nothing half-done; a later resume at another size reuses it);
- only the resuming run's engine is built with ``checkpoint.load_universal`` (set during a ZeRO-3
  save, DeepSpeed writes rank 0's model states alone: #7546), and it is switched off after the load.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from training import distributed
from training.checkpoint import CheckpointError, written_by

DONE = "norallm-universal-complete"


def universal_dir(path: Path) -> Path:
    return path.with_name(path.name + ".universal")


def prepare(path: Path | None, world_size: int, zero_stage: int, log=print) -> Path | None:
    """The universal copy of ``path`` when this launch has another number of ranks than the one
    that wrote it (ZeRO 1–3), converting it first if needed; else None. Collective."""
    if path is None or zero_stage == 0:
        return None
    saved = written_by(path)
    if saved is None or saved == world_size:
        return None
    if zero_stage == 3:
        # Measured on CPU (tiny Mistral, fp32): the weights come back exactly, but the first update
        # after a 2 → 1 or 1 → 2 universal load differs from the straight run (loss 0.008 off one
        # step later, 0.013 two steps later) — the optimizer state does not carry over exactly.
        raise CheckpointError(
            f"checkpoint {path} was written by {saved} ranks and this launch has {world_size}: resuming ZeRO-3 "
            "at another number of ranks does not continue the optimizer exactly with DeepSpeed's universal "
            f"checkpoints yet, so it is refused. Relaunch with {saved} ranks, or branch a new run from "
            "`norallm export` of it (model.init: warm). ZeRO-1 and ZeRO-2 checkpoints resume on any number.")
    out = universal_dir(path)
    if distributed.rank() == 0 and not (out / DONE).is_file():
        log(f"[checkpoint] {path.name} was written by {saved} ranks, this launch has {world_size}: converting it "
            f"to DeepSpeed's universal format once → {out.name}")
        _convert(path, out)
    distributed.barrier()
    if not (out / DONE).is_file():
        raise CheckpointError(f"the universal copy of {path} is missing after the conversion on rank 0 "
                              f"({out}); is the checkpoint dir on a file system that every node sees?")
    log(f"[checkpoint] resuming {path.name} ({saved} ranks) on {world_size} ranks from {out.name}")
    return out


def _convert(path: Path, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        # training.safe_load runs it with every torch.load weights-only (DeepSpeed's are weights_only=False)
        [sys.executable, "-m", "training.safe_load", "deepspeed.checkpoint.ds_to_universal",
         "--input_folder", str(path), "--output_folder", str(tmp), "--num_extract_workers", "1",
         "--num_merge_workers", "1"],
        capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise CheckpointError(f"converting {path} for another number of ranks failed (DeepSpeed's "
                              f"ds_to_universal, exit {proc.returncode}):\n{tail}\nRelaunch with {written_by(path)} "
                              "ranks to resume it as it is.")
    for f in ("meta.json", "config.yaml"):  # what a reader of the copy needs to know what it is
        if (path / f).is_file():
            shutil.copy2(path / f, tmp / f)
    (tmp / DONE).write_text(f"converted from {path.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
