"""Check norallm against transformers releases: every name the code imports from transformers,
imported for real from each release, recorded in tests/transformers_api.json for the offline
test (tests/test_transformers_range.py) to hold the code to.

    python bench/transformers_range.py                          # the oldest allowed release and the device image's
    python bench/transformers_range.py --versions 5.0.0,5.17.0 --pytest "tests/test_engine.py -m 'not slow'"

Each release is installed with its own dependencies (tokenizers, huggingface-hub, …) into a
temporary --target dir put first on PYTHONPATH, beside this environment's torch and DeepSpeed,
so it needs PyPI (run it where pip works; CI runs only the offline test). ``--pytest`` also runs
those tests under each release and records their summary line.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "tests" / "transformers_api.json"
DEVICE_IMAGE = "5.17.0"  # the GPU image's transformers (/work/.library/device/KINDS.md)
_SOURCE_DIRS = ("norallm", "data_pipeline", "training", "bench", "tests")


def allowed_floor(pyproject: Path = REPO / "pyproject.toml") -> str:
    """The oldest transformers release pyproject.toml allows, as X.Y.Z (``>=5.0`` → ``5.0.0``)."""
    match = re.search(r'"transformers>=([0-9.]+)', pyproject.read_text(encoding="utf-8"))
    if not match:
        raise SystemExit("pyproject.toml names no transformers>= floor")
    parts = match.group(1).split(".")
    return ".".join((parts + ["0", "0"])[:3])


def imported_names(repo: Path = REPO) -> set[str]:
    """``module:name`` for every ``from transformers… import name`` in the project's sources, and
    ``module:`` for every ``import transformers…``."""
    used: set[str] = set()
    for top in _SOURCE_DIRS:
        for path in sorted((repo / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "transformers":
                    used |= {f"{node.module}:{alias.name}" for alias in node.names}
                elif isinstance(node, ast.Import):
                    used |= {f"{a.name}:" for a in node.names if a.name.split(".")[0] == "transformers"}
    return used


_PROBE = r"""
import importlib, json, sys
import transformers
present, absent = [], []
for entry in json.loads(sys.argv[1]):
    module, _, name = entry.partition(":")
    try:
        mod = importlib.import_module(module)
        ok = not name or hasattr(mod, name)
    except Exception:
        ok = False
    (present if ok else absent).append(entry)
print(json.dumps({"version": transformers.__version__, "present": present, "absent": absent}))
"""


def check(version: str, names: list[str], pytest_args: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"transformers-{version}-") as target:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target",
                        target, f"transformers=={version}"], check=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([target, str(REPO)]), "HF_HUB_OFFLINE": "1"}
        probe = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], env=env, capture_output=True,
                               text=True, check=True)
        result = json.loads(probe.stdout.strip().splitlines()[-1])
        if result["version"] != version:
            raise SystemExit(f"imported transformers {result['version']}, not {version}: is it shadowed?")
        del result["version"]
        if pytest_args:
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                  *shlex.split(pytest_args)], cwd=REPO, env=env, capture_output=True, text=True)
            summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
            result["pytest"] = {"args": pytest_args, "summary": summary}
            print(run.stdout[-3000:])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", help=f"comma-separated (default: pyproject's floor and {DEVICE_IMAGE})")
    ap.add_argument("--pytest", help="also run these pytest arguments under each release")
    args = ap.parse_args()
    versions = args.versions.split(",") if args.versions else sorted({allowed_floor(), DEVICE_IMAGE})
    names = sorted(imported_names())
    record = {"about": "names norallm imports from transformers, imported from each release by "
                       "bench/transformers_range.py; held by tests/test_transformers_range.py",
              "releases": {}}
    for version in versions:
        result = check(version, names, args.pytest)
        record["releases"][version] = result
        print(f"transformers {version}: {len(result['present'])} of {len(names)} names present"
              + (f"; lacks {result['absent']}" if result["absent"] else "")
              + (f"; pytest: {result['pytest']['summary']}" if "pytest" in result else ""))
    RECORD.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RECORD.relative_to(REPO)}")
    return 1 if any(r["absent"] for r in record["releases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
