"""Build the wheels the GPU device image lacks for bench/gpu_check.py into ``.whl/`` (ignored by
git), for the image's Python 3.12 on manylinux x86_64, and check they fit the 64 MiB that travels
with the working tree.

    python bench/gpu_wheels.py            # needs PyPI; writes .whl/*.whl and prints their sizes

The image (/work/.library/device/KINDS.md) has torch 2.11, transformers 5.17, triton, numpy,
safetensors, tokenizers, sentencepiece, pyyaml and, among others, einops, msgpack, ninja, psutil,
py-cpuinfo, tqdm, packaging, pyarrow, fsspec, huggingface-hub and matplotlib. What norallm's
training path imports beyond that (``--trace KINDS.md`` lists what a real ``gpu_check.py --cpu``
run imports, in every process it starts, that the image's package list lacks):

- deepspeed, built from its sdist with ``DS_BUILD_OPS=0`` (no op is compiled; torch's fused AdamW
  needs none), and its hjson; pydantic with its pydantic-core (the cp312 binary),
  annotated-types, typing-inspection and a typing-extensions new enough for them;
- liger-kernel (Triton RMSNorm/RoPE/SwiGLU, ``model.liger_kernel``);
- zstandard (data_pipeline reads .zst sources; imported with the sources module).

(Run in this project's venv, ``--trace`` also lists packages that transformers and torch import
only because they are installed here, e.g. mistral-common and its dependencies, dill; the image's
transformers 5.17 and torch skip them when absent. liger-kernel is not imported on a CPU.)

Install and run on the device, from the repo root (the command bench/README.md gives):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \\
      && timeout 560 python3 bench/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl"
LIMIT_BYTES = 64 * 2**20  # what travels with the working tree to the device, all of it together
# Pinned to the versions this project's CPU environment runs (and liger's newest), so the card
# runs what the tests ran.
BINARY = {
    "hjson": "3.1.0",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
    "liger-kernel": "0.8.5",
    "zstandard": "0.25.0",
}
BUILT = {"deepspeed": "0.19.8"}  # sdist only on PyPI: built here, without ops
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def build(dest: Path) -> list[Path]:
    dest.mkdir(exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *platform_args, "-d", str(dest), *(f"{name}=={version}" for name, version in BINARY.items()))
    for name, version in BUILT.items():
        pip("wheel", "-q", "--no-deps", "-w", str(dest), f"{name}=={version}", env={**os.environ, "DS_BUILD_OPS": "0"})
    return sorted(dest.glob("*.whl"))


_RECORDER = """
import sys
def _record(event, args, _seen=set(), _out=open({out!r} + "/%d.txt" % __import__("os").getpid(), "a")):
    if event == "import":
        top = args[0].partition(".")[0]
        if top not in _seen:
            _seen.add(top)
            _out.write(top + "\\n")
            _out.flush()
sys.addaudithook(_record)
"""


def trace(image_list: Path) -> int:
    """Run ``gpu_check.py --cpu`` with every process recording the modules it imports; print the
    distributions they come from that ``image_list`` (KINDS.md's package list) does not name."""
    import importlib.metadata
    import re
    import tempfile

    image = {n.strip().lower().replace("_", "-") for n in re.split(r"[,\s]+", image_list.read_text()) if n.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        hook, seen = Path(tmp) / "hook", Path(tmp) / "seen"
        hook.mkdir()
        seen.mkdir()
        (hook / "sitecustomize.py").write_text(_RECORDER.format(out=str(seen)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(Path(tmp) / "out")], cwd=REPO,
                       env=env, check=False, stdout=subprocess.DEVNULL)
        modules = {m for f in seen.glob("*.txt") for m in f.read_text().split()}
    dists = importlib.metadata.packages_distributions()
    used = sorted({d.lower().replace("_", "-") for m in modules for d in dists.get(m, [])})
    lacking = [d for d in used if d not in image and d != "norallm"]
    print(f"distributions imported: {', '.join(used)}")
    print(f"not in the image: {', '.join(lacking) or 'none'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", type=Path, default=WHEEL_DIR)
    ap.add_argument("--trace", type=Path, metavar="PACKAGE_LIST",
                    help="instead of building: what gpu_check --cpu imports that this list of names lacks")
    args = ap.parse_args()
    if args.trace:
        return trace(args.trace)
    wheels = build(args.dest)
    total = 0
    for wheel in wheels:
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    missing = sorted((set(BINARY) | set(BUILT)) - names)
    print(f"{total / 2**20:8.2f} MiB  in all ({len(wheels)} wheels; limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    if missing:
        print(f"missing: {missing}", file=sys.stderr)
    any_ops = [w.name for w in wheels if w.name.startswith("deepspeed") and not w.name.endswith("none-any.whl")]
    if any_ops:
        print(f"deepspeed was built with compiled ops ({any_ops}); set DS_BUILD_OPS=0", file=sys.stderr)
    return 0 if total <= LIMIT_BYTES and not missing and not any_ops else 1


if __name__ == "__main__":
    sys.exit(main())
