"""Checkpoints load as weights, never as code.

A ``.pt`` file is a pickle, and unpickling can call any function the file names: a checkpoint
with an object whose ``__reduce__`` runs a command would run it at resume or export. DeepSpeed
0.19.8 unpickles with ``torch.load(..., weights_only=False)`` in about forty places (its torch
checkpoint engine, the ZeRO and bf16 optimizers' universal loaders, ``zero_to_fp32``,
``ds_to_universal``), so a checkpoint-engine subclass would cover only the first of them. Every
DeepSpeed load therefore runs inside ``weights_only()``, which sets torch's own switch
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (it overrides an explicit ``weights_only=False``) for its
duration and allows exactly the non-tensor classes DeepSpeed writes (``ALLOWED``); the switch is
an environment variable, so a worker process DeepSpeed starts inherits it and fails closed.

Before a resume or an export the checkpoint's pickles are also read without being run
(``refuse_non_weights``), so that a file naming any other global is refused up front, on every
rank, with the file and the global named. A user who trusts such a checkpoint sets
``NORALLM_TRUST_CHECKPOINT_CODE=1`` for that one command: it then loads as DeepSpeed would load
it, with a warning.

``python -m training.checkpoint.safe_load MODULE ARGS...`` runs a module (``ds_to_universal``) the same way.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import importlib
import os
import pickle
import re
import runpy
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from norallm.errors import NorallmError
from norallm.exits import EXIT_USER_ERROR
from training import distributed

TRUST_ENV = "NORALLM_TRUST_CHECKPOINT_CODE"
_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# What DeepSpeed 0.19.8 writes besides tensors and containers, found by saving checkpoints at ZeRO
# 0-3 in fp32 and bf16 and converting them to universal ones (tests/test_safe_load.py checks that
# the list is still complete and still minimal). Each is inert to build: the weights-only
# unpickler can only call it with data (ints, floats, strings, tensors), and its constructor or
# __new__ only stores those values; none has __setstate__ or __reduce__ of its own.
ALLOWED = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an int Enum: ZeroStageEnum(1) is a lookup
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # a static loss scale: two attributes
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass of two ints (numel, start)
)


class UnsafeCheckpointError(NorallmError):
    """A checkpoint file holds a pickled object that is not weights: loading it would run code."""


def trusted() -> bool:
    return os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes")


def _allowed_classes() -> list[Callable]:
    classes = []
    for name in ALLOWED:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return classes


class _Inert:
    """What every global of a scanned pickle becomes: called, built or filled, it only absorbs."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _GlobalsRecorder(pickle.Unpickler):
    """Reads a pickle with every global it names recorded and replaced by ``_Inert``, and every
    persistent id (a tensor's storage) by None: no object the file names is ever imported or run,
    whatever opcodes (GLOBAL, STACK_GLOBAL, extension codes) name it."""

    def __init__(self, file, found: set[str]):
        super().__init__(file)
        self.found = found

    def find_class(self, module, name):
        # protocol-2 pickles (torch.save's) name Python 2 modules (__builtin__): map them as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        self.found.add(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid):
        return None


def _globals_in_pickles(f, count: int, found: set[str]) -> None:
    """Record the globals of up to ``count`` consecutive pickles of ``f`` (stops at the first one
    that is not a pickle; what it named until then is kept)."""
    for _ in range(count):
        try:
            _GlobalsRecorder(f, found).load()
        except Exception:  # noqa: BLE001 - the end of the pickles, or a file the load itself refuses
            return


# torch.save's legacy (non-zip) format is five pickles in a row (magic number, protocol, system
# info, the object, its storage keys), then the raw storages
_LEGACY_PICKLES = 5


def named_globals(path: Path) -> set[str]:
    """Every global a torch.save file names, in any format torch.load reads: the zip archive
    (``data.pkl``), the legacy format of ``_use_new_zipfile_serialization=False`` (its pickles
    before the raw storages) and the legacy .tar format (which torch refuses to load weights
    only: reported as such). Nothing is imported or run."""
    found: set[str] = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                    found.add("TorchScript code (a scripted module, not weights)")
                for name in names:
                    if name == "data.pkl" or name.endswith("/data.pkl"):
                        with archive.open(name) as f:
                            _globals_in_pickles(f, 1, found)
        elif tarfile.is_tarfile(path):
            found.add("the legacy .tar checkpoint format (torch < 0.4), which cannot load as weights only")
        else:
            with open(path, "rb") as f:
                _globals_in_pickles(f, _LEGACY_PICKLES, found)
    except (OSError, zipfile.BadZipFile, tarfile.TarError):
        pass  # unreadable: the manifest has verified it, or its load reports it
    return found


def non_weights_globals(path: Path) -> list[str]:
    """The globals a torch.save file names beyond tensors, containers and ``ALLOWED`` (torch's own
    weights-only list, as ``get_unsafe_globals_in_checkpoint`` uses it, which reads zip archives
    and GLOBAL opcodes only), read from its pickles without running them, whatever the format."""
    from torch import _weights_only_unpickler

    safe = set(_weights_only_unpickler._get_allowed_globals()) | set(ALLOWED)
    return sorted(named_globals(path) - safe)


def _scan(files: list[Path]) -> dict[str, list[str]]:
    return {str(f): found for f in files if (found := non_weights_globals(f))}


def _message(found: dict[str, list[str]]) -> str:
    listed = "; ".join(f"{f} holds {', '.join(names)}" for f, names in sorted(found.items()))
    return (f"refusing to load a checkpoint that holds non-weights objects: {listed}. Unpickling them would run "
            "code the file chose; norallm and DeepSpeed write only tensors and "
            f"{', '.join(n.rpartition('.')[2] for n in ALLOWED)}. Do not load checkpoints from people or places you "
            f"do not trust. If you wrote this one yourself (e.g. with another DeepSpeed version) and trust it, rerun "
            f"this one command with {TRUST_ENV}=1 to load it as DeepSpeed does (weights_only=False), and say which "
            "global was refused in an issue.")


def refuse_non_weights(checkpoint: Path, log=print) -> None:
    """Raise UnsafeCheckpointError when any ``*.pt`` under ``checkpoint`` names a global outside
    ``ALLOWED`` (collective: each rank reads its share; every rank gets the same answer). With
    ``NORALLM_TRUST_CHECKPOINT_CODE=1`` it warns through ``log`` instead."""
    files = sorted(Path(checkpoint).rglob("*.pt"))
    rank, world = distributed.rank(), distributed.world_size()
    found: dict[str, list[str]] = {}
    for share in distributed.gather_objects(_scan(files[rank::world])):
        found.update(share)
    if trusted():
        held = f" (it holds {', '.join(sorted({n for v in found.values() for n in v}))})" if found else ""
        log(f"[checkpoint] warning: {TRUST_ENV} is set: {checkpoint} is loaded with weights_only=False, so any "
            f"object pickled in it runs{held}.")
    elif found:
        raise UnsafeCheckpointError(_message(found))


@contextlib.contextmanager
def weights_only(checkpoint: Path) -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only, with ``ALLOWED`` added (DeepSpeed calls torch.load
    directly, with ``weights_only=False``, from many modules: torch's override switch is the one
    hook that reaches all of them). The environment is restored on the way out, also on an error;
    a refused global becomes one UnsafeCheckpointError naming the file under ``checkpoint``.
    Process-wide while it lasts: nothing else in norallm loads pickles concurrently."""
    if trusted():
        yield
        return
    saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NO, None)  # both set is an error in torch; ours wins inside
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            yield
    except pickle.UnpicklingError as e:
        found = _scan(sorted(Path(checkpoint).rglob("*.pt")))
        if not found:
            named = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
            found = {f"a file under {checkpoint}": [named.group(1) if named else "an object torch refuses to build"]}
        raise UnsafeCheckpointError(_message(found)) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load(path: str | Path, **kwargs):
    """``torch.load`` of one DeepSpeed file, weights only with ``ALLOWED`` (for a file norallm reads
    itself); a refused global raises UnsafeCheckpointError naming the file. With
    ``NORALLM_TRUST_CHECKPOINT_CODE=1`` it loads as DeepSpeed does (weights_only=False)."""
    if trusted():
        return torch.load(path, weights_only=False, **kwargs)
    with weights_only(Path(path)):
        return torch.load(path, weights_only=True, **kwargs)


def main(argv: list[str]) -> int:
    """``python -m training.checkpoint.safe_load MODULE --input_folder DIR ...``: run MODULE as ``__main__``
    with every load weights-only (for DeepSpeed's ``ds_to_universal``, run as a subprocess)."""
    module, args = argv[0], argv[1:]
    source = args[args.index("--input_folder") + 1] if "--input_folder" in args else "."
    sys.argv = [module, *args]
    try:
        with weights_only(Path(source)):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except UnsafeCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
