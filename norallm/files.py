"""File helpers used across the project: one way to write a file atomically, to fingerprint,
and to expand a user's path."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a resume after kill -9 or a power loss) sees
    the old file or the new one, never a part: a temporary file in the same dir, flushed to disk,
    renamed over ``path``. The temporary name is per process, so concurrent writers (array tasks
    finishing together) never share one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: no temporary file is left beside ``path``
        tmp.unlink(missing_ok=True)
        raise


def human_bytes(n: int | float) -> str:
    """A size for people, in the binary unit that fits: ``512 bytes``, ``2.0 KiB``, ``1.9 MiB``,
    ``3.2 GiB``, ``1.1 TiB`` (never ``0.0 GiB`` for a few megabytes)."""
    if abs(n) < 1024:
        return f"{int(n):,} byte{'' if int(n) == 1 else 's'}"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if round(abs(n), 1) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:,.1f} PiB"


def json_hash(obj) -> str:
    """A short stable hash of a JSON-able value (keys sorted; other values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """A short hash of a file's bytes (a tokenizer's identity, for example)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def expand_path(path: str) -> str:
    """``~`` and ``$VARS`` expanded (an unset variable stays as written, and fails where it is used)."""
    return os.path.expandvars(os.path.expanduser(path))


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def unset_hint(path: str | Path) -> str:
    """For an error about ``path``: which ``$VARS`` in it were not set when it was expanded
    (they stay as written), and what to do; empty when there are none."""
    names = sorted({a or b for a, b in _VARIABLE.findall(str(path))} - set(os.environ))
    if not names:
        return ""
    listed = ", ".join(f"${n}" for n in names)
    return (f" ({listed} {'is' if len(names) == 1 else 'are'} not set in this environment: export "
            f"{'it' if len(names) == 1 else 'them'}, or write the path out)")


def default_run_dir(name: str, root: str | None = None) -> str:
    """Where a run's dir goes when neither --run-dir nor slurm.run_dir says: ``<root>/<name>`` under
    a cluster profile's run root, else ``runs/<name>`` under the working directory."""
    return f"{root or 'runs'}/{name}"
