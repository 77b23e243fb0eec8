"""Atomic, verified checkpoints: written under ``checkpoints/.tmp-stepNNNNNNNN``, checksummed
(``manifest.json``, training.checkpoint.manifest), renamed into place when every rank has finished, then
``checkpoints/latest`` is rewritten (itself atomically). A checkpoint dir under its final name is
therefore complete, and ``latest`` never names a partial one.

Resolution can only go back in time: a ``latest`` that is missing, garbled or names a missing,
incomplete or corrupt checkpoint falls back to the newest checkpoint that verifies, with a
warning naming what was wrong; a run dir with checkpoints of which none is usable is refused.
A run is never silently started over from step 0.

Each checkpoint holds DeepSpeed's model/optimizer shards, the client state (step, tokens, data
loader state, config), each rank's RNG state, the resolved config and a copy of the tokenizer,
so that it can be exported on its own. It loads as weights only (training.checkpoint.safe_load): a pickled
object other than tensors and DeepSpeed's few plain classes is refused, not run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from norallm.errors import NorallmError
from norallm.files import human_bytes, write_text_atomic
from training import distributed
from training.checkpoint import manifest, safe_load

CHECKPOINTS = "checkpoints"
LATEST = "latest"
# A model's weights, as a base model dir holds them (left out of the tokenizer copy).
MODEL_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                      "*.gguf", "*.h5", "*.msgpack")
_STEP_DIR = re.compile(r"^step(\d{8})$")
# Test hook: when set to a step number, every rank dies (exit 137) after writing that step's
# shards and before the rename, as a kill -9 during a save would. Used by tests and bench/.
KILL_DURING_SAVE = "NORALLM_TEST_KILL_DURING_SAVE"


def step_name(step: int) -> str:
    return f"step{step:08d}"


class CheckpointError(NorallmError):
    """The run dir holds checkpoints, but none can be resumed from."""


def _read_latest(root: Path) -> tuple[str | None, str | None]:
    """(checkpoint name ``latest`` holds, or None; what is wrong with it, or None)."""
    pointer = root / LATEST
    if not pointer.exists():
        return None, f"{pointer} is missing"
    try:
        text = pointer.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{pointer} is unreadable ({type(e).__name__})"
    if not _STEP_DIR.match(text):
        return None, f"{pointer} holds {text[:40]!r}, not a checkpoint name like step00000100"
    return text, None


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint dirs under their final names, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), reverse=True)


def checkpoint_problems(path: Path) -> list[str]:
    """What keeps ``path`` from being resumed, checked collectively (every rank verifies its share
    of the files; all ranks get the same answer). Empty: usable."""
    if not (path / "meta.json").is_file():
        return [f"{path} is incomplete (no meta.json)"]
    try:
        files = manifest.read(path)
    except ValueError as e:
        return [str(e)]
    if files is None:  # written before checksums existed: complete, but not verifiable
        return []
    mine = manifest.verify_share(path, files, distributed.rank(), distributed.world_size())
    return sorted({p for share in distributed.gather_objects(mine) for p in share})


def resolve(run_dir: str | Path, log=print) -> Path | None:
    """The checkpoint a resume starts from: the one ``latest`` names when it verifies, else the
    newest one that does (with a warning through ``log``). None: the run has no checkpoints.
    Raises CheckpointError when checkpoints exist but none is usable. Collective."""
    root = Path(run_dir) / CHECKPOINTS
    named, pointer_problem = _read_latest(root)
    dirs = _step_dirs(root)
    if named is None and not dirs:
        return None
    candidates = ([root / named] if named else []) + [d for d in dirs if d.name != named]
    problems = [pointer_problem] if pointer_problem and dirs else []
    for path in candidates:
        if not path.is_dir():
            problems.append(f"{root / LATEST} names {path.name}, which does not exist")
            continue
        found = checkpoint_problems(path)
        if not found:
            if problems:
                log(f"[checkpoint] warning: {'; '.join(problems)}. Resuming from {path.name}, the newest "
                    "checkpoint that verifies.")
            if (path / "meta.json").is_file() and not (path / manifest.MANIFEST).is_file():
                log(f"[checkpoint] note: {path.name} has no {manifest.MANIFEST} (an older norallm): not verified.")
            return path
        problems += found
    raise CheckpointError(
        f"{root} holds checkpoints, but none can be resumed from: {'; '.join(problems)}. Nothing was "
        "changed. Restore a good checkpoint (e.g. from a backup) and point checkpoints/latest at it, or "
        "start over in a new --run-dir.")


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int, extra_files: dict[str, Path],
         health: dict | None = None) -> Path:
    """Save collectively (every rank calls this); returns the final checkpoint dir. ``health``
    (training.loop.guard): ``{"healthy": bool, "unhealthy": reason}`` for meta.json.

    Every write of the save (the shards, the RNG states, meta.json, config.yaml, the tokenizer,
    the manifest, the rename and ``latest``) goes through one error path: the ranks agree after
    each phase whether any of them failed, and then all raise the same CheckpointError (the
    partial checkpoint removed, ``latest`` unchanged), so that no rank is left at a barrier."""
    root = Path(run_dir) / CHECKPOINTS
    rank = distributed.rank()
    name = step_name(step)
    final, tmp = root / name, root / f".tmp-{name}"
    failure = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            failure = e
        for stale in root.glob(".tmp-*") if failure is None else ():  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    _all_written(root, tmp, step, failure)
    _all_written(root, tmp, step, _write_shards(engine, root, tmp, client_state, rank))
    if os.environ.get(KILL_DURING_SAVE) == str(step):  # fault drill: die with the shards half-committed
        os._exit(137)
    failure = None
    if rank == 0:
        try:
            meta = {"step": step, "world_size": distributed.world_size(),
                    "tokens_consumed": client_state.get("tokens_consumed"), **(health or {})}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            for rel, src in extra_files.items():
                dst = tmp / rel
                if Path(src).is_dir():
                    # the tokenizer dir of model.tokenizer_strategy keep is the base model's own dir:
                    # its weights are no part of the tokenizer, and would be copied at every save
                    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*MODEL_WEIGHT_FILES))
                else:
                    shutil.copy2(src, dst)
        except OSError as e:
            failure = e
    _all_written(root, tmp, step, failure)
    shares = distributed.gather_objects(manifest.hash_share(tmp, rank, distributed.world_size()))
    failure = None
    if rank == 0:
        try:
            manifest.write(tmp, shares)
            if final.exists():  # an orphan from a run killed between rename and `latest`
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(root / LATEST, name + "\n")
        except OSError as e:
            failure = e
            if final.is_dir() and not tmp.exists():  # renamed, but `latest` could not name it: undone
                os.replace(final, tmp)
    _all_written(root, tmp, step, failure)
    if rank == 0:
        _prune(root, keep_last, final)
    distributed.barrier()
    return final


def _write_shards(engine, root: Path, tmp: Path, client_state: dict, rank: int) -> Exception | None:
    """DeepSpeed's shards and this rank's RNG state; returns what failed (None: all written).

    A write that fails does not end DeepSpeed's save: this rank skips its remaining writes and
    keeps taking part in the save's collectives, so that every rank reaches the agreement after
    it (a rank raising out of the middle would leave the others waiting at DeepSpeed's barrier)."""
    failures: list[Exception] = []
    writer = engine.checkpoint_engine
    own = "save" in vars(writer)
    write = writer.save

    def write_unless_failed(state_dict, path):
        if not failures:
            try:
                write(state_dict, path)
            except (OSError, RuntimeError) as e:  # torch reports a full disk as "basic_ios::clear" / "enforce fail"
                failures.append(e)

    writer.save = write_unless_failed
    try:
        # universal_checkpoint_info: what DeepSpeed's ds_to_universal needs to re-partition ZeRO-1/2
        # states for another number of ranks (training.checkpoint.reshard); a plain HF model carries none
        engine.save_checkpoint(str(root), tag=tmp.name, client_state={**client_state, "universal_checkpoint_info": {}},
                               save_latest=False)
        if not failures:
            rng = {"torch": torch.get_rng_state()}
            if distributed.runtime().is_gpu:
                rng["cuda"] = torch.cuda.get_rng_state()
            torch.save(rng, tmp / f"rng_rank{rank:05d}.pt")
    except (OSError, RuntimeError) as e:
        failures.append(e)
    finally:
        if own:
            writer.save = write
        else:
            del writer.save
    return failures[0] if failures else None


def _all_written(root: Path, tmp: Path, step: int, failure: Exception | None) -> None:
    """Collective: return when no rank failed; else every rank raises the same CheckpointError,
    after rank 0 has removed the partial checkpoint (so the free space it reports is real)."""
    reasons = distributed.gather_objects(None if failure is None else _reason(failure))
    first = next((r for r in reasons if r is not None), None)
    if first is None:
        return
    message = str(_write_failed(root, tmp, step, first)) if distributed.rank() == 0 else None
    raise CheckpointError(distributed.gather_objects(message)[0])


def _reason(error: Exception) -> str:
    """The first line of what went wrong (copytree's error: that of its first file)."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        return _reason(OSError(error.args[0][0][-1]))
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _free_bytes(path: Path) -> int:
    """What this user can still write under ``path`` (root may use the blocks reserved for it)."""
    st = os.statvfs(path)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _write_failed(root: Path, tmp: Path, step: int, reason: str) -> CheckpointError:
    """One clear error for a save that could not be written (full disk, quota, I/O error); the
    partial checkpoint is removed and ``latest`` still names the last complete one."""
    written = _bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    previous = _step_dirs(root)
    need = f"about {human_bytes(_bytes(previous[0]))}" if previous else f"more than {human_bytes(written)}"
    probe = root if root.is_dir() else root.parent
    named, _ = _read_latest(root)
    return CheckpointError(
        f"saving checkpoint step {step} under {root} failed ({reason}); {human_bytes(_free_bytes(probe))} free there "
        f"and a checkpoint needs {need}. The partial checkpoint was removed; checkpoints/latest still names "
        f"{named or 'no checkpoint'}. Free space or raise the quota (or lower checkpoint.keep_last), then resume.")


def check_free_space(run_dir: Path, estimate_bytes: int, keep_last: int, log=print) -> None:
    """Warn when the checkpoint dir cannot hold ``keep_last + 1`` checkpoints (a save writes the new
    one before the oldest is pruned). The size is the newest checkpoint's, else ``estimate_bytes``."""
    root = Path(run_dir) / CHECKPOINTS
    probe = root if root.is_dir() else Path(run_dir)
    while not probe.exists():
        probe = probe.parent
    existing = _step_dirs(root)
    size = _bytes(existing[0]) if existing else estimate_bytes
    free = _free_bytes(probe)
    need = (keep_last + 1 - len(existing[:keep_last])) * size
    if free < need:
        log(f"[checkpoint] warning: {human_bytes(free)} free under {probe}, but checkpoint.keep_last = {keep_last} "
            f"needs room for {keep_last + 1} checkpoints of ~{human_bytes(size)} during a save "
            f"({human_bytes(need)} more); a save will fail when the disk fills.")


def _prune(root: Path, keep_last: int, newest: Path) -> None:
    """Keep the ``keep_last`` newest checkpoints, the one just written (``newest``), and the newest
    healthy one older than it (training.loop.guard): the one just written cannot be known healthy yet
    (the next step's loss measures its weights), and after a blow-up every newer one is unhealthy,
    so the last checkpoint from before the trouble is never rotated out."""
    steps = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))
    keep = set(steps[-keep_last:]) | {newest}
    older_healthy = [p for p in steps if p.name < newest.name and is_healthy(p)]
    keep |= set(older_healthy[-1:])
    for old in steps:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + ".universal"), ignore_errors=True)  # training.checkpoint.reshard


def step_of(path: Path) -> int:
    """The step of a checkpoint dir named like step00000100."""
    return int(path.name.removeprefix("step"))


def _meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def is_healthy(path: Path) -> bool:
    """Whether a complete checkpoint was saved outside trouble (training.loop.guard); checkpoints from
    before the field count as healthy, an unreadable meta.json does not."""
    meta = _meta(path)
    return bool(meta) and meta.get("healthy", True) is not False


def mark_unhealthy(path: Path, reason: str) -> None:
    """Record in a saved checkpoint's meta.json (and its manifest entry) that it is not healthy
    (rank 0). Killed in between, the checkpoint fails verification and a resume takes the one
    before, which is where it should go anyway."""
    meta = {**_meta(path), "healthy": False, "unhealthy": reason}
    write_text_atomic(path / "meta.json", json.dumps(meta) + "\n")
    manifest.refresh(path, "meta.json")


def last_healthy(run_dir: str | Path, before: Path | None = None) -> Path | None:
    """The newest healthy checkpoint of a run (older than ``before`` when given)."""
    found = [p for p in step_dirs(run_dir) if (before is None or p.name < before.name) and is_healthy(p)]
    return found[-1] if found else None


def health_warning(path: Path) -> str | None:
    """A warning for a checkpoint saved in trouble (resume, export), naming the last healthy one."""
    if is_healthy(path) or not (path / "meta.json").is_file():
        return None
    previous = last_healthy(path.parent.parent, before=path)
    back = (f"the last healthy checkpoint is {previous}; to go back to it, branch with `norallm train CONFIG "
            f"--run-dir NEW_RUN_DIR --from-checkpoint {previous}`" if previous else "no older healthy checkpoint is left")
    return f"{path.name} is not healthy ({_meta(path).get('unhealthy', 'saved in trouble')}); {back}."


def newest(run_dir: str | Path) -> tuple[Path | None, str | None]:
    """(the run's newest checkpoint: the one ``latest`` names, else the newest under its final name;
    what is wrong with ``latest``, or None). Nothing is verified."""
    root = Path(run_dir) / CHECKPOINTS
    named, problem = _read_latest(root)
    if named is not None and (root / named).is_dir():
        return root / named, None
    if named is not None:
        problem = f"{root / LATEST} names {named}, which does not exist"
    dirs = _step_dirs(root)
    return (dirs[0] if dirs else None), problem


def choose(run_dir: Path, init_from: Path | None = None) -> Path | None:
    """The checkpoint a run starts from (collective, verified): the run's own (``resolve``) or, for
    a run dir without one, ``init_from`` — a checkpoint of another run (branching, e.g. a
    cooldown). None: a fresh run. A checkpoint holding pickled objects other than weights is
    refused (training.checkpoint.safe_load.UnsafeCheckpointError)."""
    log = print if distributed.rank() == 0 else (lambda _: None)
    path = resolve(run_dir, log)
    if path is None and init_from is not None:
        path = Path(init_from)
        if not path.is_dir():
            raise CheckpointError(f"--from-checkpoint {path} does not exist (pruned by checkpoint.keep_last?).")
        if not (path / "config.yaml").is_file():
            raise NorallmError(f"--from-checkpoint {path} is not a checkpoint dir (no config.yaml in it).")
        found = checkpoint_problems(path)
        if found:
            raise CheckpointError(f"--from-checkpoint {path} cannot be used: {'; '.join(found)}.")
    if path is not None and (warning := health_warning(path)):
        log(f"[checkpoint] warning: resuming from a checkpoint saved in trouble: {warning}")
    if path is not None:
        # A refusal, not a fallback to an older checkpoint: a file whose sha256 verifies and that
        # names a non-weights global was written that way (a tampered run dir, or a DeepSpeed that
        # writes a new class); going back in time would hide either and lose the steps since.
        safe_load.refuse_non_weights(path, log)
    return path


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The checkpoints of a run under their final names (a save renames only a complete one), oldest first."""
    return [p for p in reversed(_step_dirs(Path(run_dir) / CHECKPOINTS)) if (p / "meta.json").is_file()]


def tokens_at(path: Path) -> int | None:
    """Training tokens consumed when the checkpoint was written (meta.json; checkpoints from
    before that field: the step × global batch × seq_len of its config.yaml)."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("tokens_consumed") is not None:
        return int(meta["tokens_consumed"])
    config = path / "config.yaml"
    if not config.is_file():
        return None
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    batch, seq_len = (raw.get("train") or {}).get("global_batch_size"), (raw.get("data") or {}).get("seq_len")
    return meta["step"] * batch * seq_len if isinstance(batch, int) and isinstance(seq_len, int) else None


def written_by(path: Path) -> int | None:
    """How many ranks wrote the checkpoint (meta.json), None when unknown."""
    meta = path / "meta.json"
    return json.loads(meta.read_text()).get("world_size") if meta.is_file() else None


def load(engine, path: Path | None, universal: Path | None = None) -> dict | None:
    """Restore ``path`` (from ``choose``) into ``engine`` and return its client state; None: a
    fresh run. ``universal``: the checkpoint converted for another number of ranks
    (training.checkpoint.reshard), loaded by an engine built with ``load_universal``."""
    if path is None:
        return None
    source = universal or path
    with safe_load.weights_only(source):
        _, client_state = engine.load_checkpoint(str(source.parent), tag=source.name)
    if universal is not None:  # this run's own saves are ordinary ones (DeepSpeed #7546 for ZeRO-3)
        engine._config.load_universal_checkpoint = False
    missing = {"step", "tokens_consumed", "data"} - set(client_state or {})
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)} in its client state: it was not "
                              "written by `norallm train`; branch from its exported weights instead.")
    rank = distributed.rank()
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and distributed.runtime().is_gpu:
            torch.cuda.set_rng_state(rng["cuda"])
    return client_state
