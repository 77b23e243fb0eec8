"""Resume on another number of ranks: between two jobs of a long run the allocation changes (fewer
free nodes, a drained node, a smaller quota). The data order continues exactly on any number of
ranks (the loader's state is the global sample count); the ZeRO-partitioned optimizer and model
states are re-partitioned through DeepSpeed's universal checkpoint format, for ZeRO-1, 2 and 3:

- the checkpoint is converted once, on rank 0, with ``deepspeed.checkpoint.ds_to_universal`` into
  ``checkpoints/stepNNNNNNNN.universal`` (written under a temporary name, checksummed in its own
  ``manifest.json``, then renamed: a killed conversion leaves nothing half-done; a later resume at
  another size reuses it once it verifies, and rebuilds it when it does not);
- only the resuming run's engine is built with ``checkpoint.load_universal`` (set during a ZeRO-3
  save, DeepSpeed writes rank 0's model states alone: #7546), and it is switched off after the load;
- after a ZeRO-3 load, ``after_load`` gives each optimizer sub-group its own step counter and each
  param group its own hyperparameters, which DeepSpeed 0.19's loader shares and overwrites with the
  first group's (weights, Adam moments and step come back exactly; see there).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from training import distributed
from training.checkpoint.store import CheckpointError, manifest, safe_load, written_by

DONE = "norallm-universal-complete"


def universal_dir(path: Path) -> Path:
    return path.with_name(path.name + ".universal")


def prepare(path: Path | None, world_size: int, zero_stage: int, log=print) -> Path | None:
    """The universal copy of ``path`` when this launch has another number of ranks than the one
    that wrote it (ZeRO 1–3), converting it first if needed; else None. Collective. The engine
    that loads it is built with ``load_universal``; ZeRO-3 then needs ``after_load``.

    The copy has a manifest like any checkpoint and is verified before every use; one that does
    not verify (a file truncated, changed or missing) is rebuilt from ``path``, which ``choose``
    has verified, with a warning naming what was wrong."""
    if path is None or zero_stage == 0:
        return None
    saved = written_by(path)
    if saved is None or saved == world_size:
        return None
    out = universal_dir(path)
    problems = universal_problems(out)
    if problems:
        if out.exists():
            log(f"[checkpoint] warning: the universal copy {out.name} does not verify: {'; '.join(problems)}. "
                f"Rebuilding it from {path.name}.")
        else:
            log(f"[checkpoint] {path.name} was written by {saved} ranks, this launch has {world_size}: converting "
                f"it to DeepSpeed's universal format once → {out.name}")
        _convert_collectively(path, out)
        if universal_problems(out):
            raise CheckpointError(f"the universal copy of {path} does not verify after the conversion on rank 0 "
                                  f"({out}); is the checkpoint dir on a file system that every node sees?")
    safe_load.refuse_non_weights(out, log)  # its pickles are read, not run, like the checkpoint's
    log(f"[checkpoint] resuming {path.name} ({saved} ranks) on {world_size} ranks from {out.name}")
    return out


def universal_problems(out: Path) -> list[str]:
    """What keeps the universal copy ``out`` from being used, checked collectively as
    checkpoint.checkpoint_problems checks a checkpoint (every rank verifies its share of the files,
    all get the same answer). Empty: usable. A copy without a manifest (converted by a norallm
    before copies had one) cannot be verified: it is a problem, and so rebuilt."""
    return sorted({p for share in distributed.gather_objects(_my_problems(out)) for p in share})


def _my_problems(out: Path) -> list[str]:
    if not (out / DONE).is_file():
        return [f"{out} is missing or incomplete"]
    try:
        files = manifest.read(out)
    except ValueError as e:
        return [str(e)]
    if files is None:
        return [f"{out} has no {manifest.MANIFEST} (converted by an older norallm)"]
    return manifest.verify_share(out, files, distributed.rank(), distributed.world_size())


def _convert_collectively(path: Path, out: Path) -> None:
    """Rank 0 converts ``path`` into a temporary dir; every rank hashes its share of it for the
    manifest; rank 0 writes it and renames the dir into place. A failed conversion raises the same
    CheckpointError on every rank."""
    rank, world = distributed.rank(), distributed.world_size()
    tmp = _tmp_dir(out)
    error = None
    if rank == 0:
        try:
            _convert_into(path, tmp)
        except CheckpointError as e:
            error = str(e)
    error = next((e for e in distributed.gather_objects(error) if e is not None), None)
    if error is not None:
        raise CheckpointError(error)
    shares = distributed.gather_objects(manifest.hash_share(tmp, rank, world) if (tmp / DONE).is_file() else None)
    if any(share is None for share in shares):
        raise CheckpointError(f"the universal copy of {path} that rank 0 converted ({tmp}) is not there on every "
                              "rank; is the checkpoint dir on a file system that every node sees?")
    if rank == 0:
        _commit(tmp, out, shares)
    distributed.barrier()


def after_load(engine, universal: Path | None) -> None:
    """Put right what DeepSpeed 0.19's ZeRO-3 universal load (``stage3.py``,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) leaves wrong; a no-op otherwise.

    It restores the fp32 weights, both Adam moments and the step count exactly (compared tensor by
    tensor with a same-size resume), but

    - it stores one and the same ``step`` tensor in the optimizer state of every ZeRO-3 sub-group.
      torch's AdamW increments its step in place, once per sub-group, so after the load each
      optimizer step advanced the count by the number of sub-groups: the tiny Mistral (3 groups)
      took its first step after a load at step 3 with counts 4, 5 and 6 and had reached 12 at
      step 6 (the straight run: 6). Wrong bias corrections made the loss of the steps after
      2 → 1 ranks 0.0077 (step 5) and 0.0128 (step 6) off the straight run;
    - it copies the *first* saved param group's hyperparameters into every group (ZeRO-1/2's
      loader pairs them group by group): each of norallm's groups came back with the norms'
      weight decay 0 and ``part: body`` (the frozen-body stage's lr 0 is keyed on it).

    Here each sub-group gets its own step tensor and each group the checkpoint's own values, as an
    ordinary resume's ``optimizer.load_state_dict`` gives them; lr is set by the schedule before
    every step anyway."""
    if universal is None or engine.zero_optimization_stage() != 3:
        return
    base = engine.optimizer.optimizer  # the torch optimizer under DeepSpeed's ZeRO-3 wrapper
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    # mmap: the file holds rank 0's whole optimizer partition; only the small group dicts are read
    saved = safe_load.load(universal / "zero" / "optimizer_state.pt", map_location="cpu",
                           mmap=True)["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(base.param_groups):
        raise CheckpointError(f"the universal copy {universal} has {len(saved)} optimizer param groups, this "
                              f"run's optimizer {len(base.param_groups)}: it was written by a norallm that grouped "
                              "parameters otherwise. Resume it with the number of ranks that wrote it.")
    for group, saved_group in zip(base.param_groups, saved, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _convert(path: Path, out: Path) -> None:
    """Convert ``path`` into the universal copy ``out``, manifest included, in this one process."""
    tmp = _tmp_dir(out)
    _convert_into(path, tmp)
    _commit(tmp, out, [manifest.hash_share(tmp, 0, 1)])


def _tmp_dir(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def _convert_into(path: Path, tmp: Path) -> None:
    """DeepSpeed's ds_to_universal of ``path`` into ``tmp``, with what a reader of the copy needs."""
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        # training.checkpoint.safe_load runs it with every torch.load weights-only (DeepSpeed's are weights_only=False)
        [sys.executable, "-m", "training.checkpoint.safe_load", "deepspeed.checkpoint.ds_to_universal",
         "--input_folder", str(path), "--output_folder", str(tmp), "--num_extract_workers", "1",
         "--num_merge_workers", "1"],
        capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise CheckpointError(f"converting {path} for another number of ranks failed (DeepSpeed's "
                              f"ds_to_universal, exit {proc.returncode}):\n{tail}\nRelaunch with {written_by(path)} "
                              "ranks to resume it as it is.")
    # ds_to_universal also points checkpoints/latest_universal at the folder under its temporary
    # name; norallm finds the copy by its checkpoint's name, so the stale pointer goes
    (tmp.parent / "latest_universal").unlink(missing_ok=True)
    for f in ("meta.json", "config.yaml"):  # what a reader of the copy needs to know what it is
        if (path / f).is_file():
            shutil.copy2(path / f, tmp / f)
    (tmp / DONE).write_text(f"converted from {path.name}\n")


def _commit(tmp: Path, out: Path, shares: list[dict[str, list]]) -> None:
    """The manifest of the converted ``tmp``, then ``tmp`` renamed to ``out`` (replacing a copy
    that did not verify): a copy under its final name is complete and checksummed."""
    manifest.write(tmp, shares)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
