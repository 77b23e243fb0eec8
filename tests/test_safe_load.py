"""Checkpoints are weights, not code (training.checkpoint.safe_load): an object with ``__reduce__`` placed in a
checkpoint file — model states or optimizer states — is refused at resume and at export with one
clear error, and never runs; every ZeRO stage still resumes and exports, all of it weights-only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint.safe_load import ALLOWED, TRUST_ENV, UnsafeCheckpointError
from training.checkpoint.store import CheckpointError, manifest, safe_load

REPO = Path(__file__).resolve().parents[1]
STAGES = ("0:fp32", "1:fp32", "1:bf16", "2:fp32", "2:bf16", "3:fp32", "3:bf16")  # ZeRO-0 bf16: DeepSpeed refuses


class RunsCode:
    """Unpickled by plain pickle, this writes ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_weights_only_refuses_an_object_that_would_run_code_and_restores_torch(tmp_path, monkeypatch):
    marker, f = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": RunsCode(marker)}, f)
    torch.load(f, weights_only=False)  # the finding: DeepSpeed's way of loading runs it
    assert marker.read_text() == "ran"
    marker.unlink()

    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's setting, put back afterwards
    with pytest.raises(UnsafeCheckpointError) as e, safe_load.weights_only(tmp_path):
        torch.load(f, weights_only=False)  # as DeepSpeed calls it
    assert not marker.exists()
    assert f"{f} holds builtins.exec" in str(e.value) and f"{TRUST_ENV}=1" in str(e.value)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ and os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"

    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        safe_load.refuse_non_weights(tmp_path)
    warnings: list[str] = []
    monkeypatch.setenv(TRUST_ENV, "1")
    safe_load.refuse_non_weights(tmp_path, log=warnings.append)  # trusted: a warning that it will run
    assert "weights_only=False" in warnings[0] and "builtins.exec" in warnings[0]


@pytest.mark.parametrize("fmt", ["legacy", "legacy-protocol-4", "zip-protocol-4"])
def test_every_torch_save_format_is_scanned_without_running_it(tmp_path, fmt):
    """The legacy (non-zip) format escaped the up-front scan (torch's scanner reads zip archives,
    and GLOBAL opcodes only); its globals are read from its pickles, none of them imported."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "ran"
    kwargs = {"_use_new_zipfile_serialization": not fmt.startswith("legacy"),
              "pickle_protocol": 4 if fmt.endswith("4") else 2}
    clean, evil = tmp_path / "clean.pt", tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "stage": ZeroStageEnum.gradients}, clean, **kwargs)
    torch.save({"w": torch.ones(2), "payload": RunsCode(marker)}, evil, **kwargs)
    assert safe_load.non_weights_globals(clean) == []
    assert safe_load.non_weights_globals(evil) == ["builtins.exec"]
    with pytest.raises(UnsafeCheckpointError, match=f"{evil} holds builtins.exec"):
        safe_load.refuse_non_weights(tmp_path)
    assert not marker.exists()
    if fmt == "legacy":  # the format torch.save writes with it still loads (torch's weights-only
        # unpickler refuses protocol 4's opcodes itself)
        assert safe_load.load(clean)["stage"] is ZeroStageEnum.gradients
    (tmp_path / "junk.pt").write_bytes(b"no pickle at all")
    assert safe_load.non_weights_globals(tmp_path / "junk.pt") == []  # its load decides (and fails)


def test_the_allowed_classes_load_weights_only_and_nothing_else_is_allowed(tmp_path, monkeypatch):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    f = tmp_path / "optim.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1), "frag": fragment_address(4, 0)}, f)
    assert safe_load.non_weights_globals(f) == []
    got = safe_load.load(f)
    assert got["zero_stage"] is ZeroStageEnum.gradients and got["frag"] == fragment_address(4, 0)
    assert got["loss_scaler"].cur_scale == 1
    assert [f"{c.__module__}.{c.__qualname__}" for c in safe_load._allowed_classes()] == list(ALLOWED)
    left = set(torch.serialization.get_safe_globals()) & {LossScaler, ZeroStageEnum, fragment_address}
    assert not left  # allowed while loading only, not registered process-wide
    monkeypatch.setenv(TRUST_ENV, "1")  # trusted: loaded as DeepSpeed does, DeepSpeed's classes included
    assert safe_load.load(f)["zero_stage"] is ZeroStageEnum.gradients


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[Path, Path]:
    """(config path, dir of run dirs ``<stage><precision>``): one process trains each of ``STAGES``
    one step and resumes it for a second one (tests/dist/every_stage.py)."""
    from test_checkpoint_safety import prepared_run

    root = tmp_path_factory.mktemp("stages")
    config, _ = prepared_run(root, max_steps=2, keep_last=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "dist" / "every_stage.py"), config, str(root / "runs"),
                           *STAGES], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("[train] resuming at step 1;") == len(STAGES), proc.stdout[-3000:]
    return Path(config), root / "runs"


def _export_weights(run: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from training.cli import main

    assert main(["export", str(run), str(out), "--dtype", "fp32"]) == 0
    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_every_zero_stage_resumes_and_exports_weights_only(stages, tmp_path):
    """Each stage resumed weights-only (the fixture); the files hold exactly the allowed classes
    and nothing else (the list is complete and minimal); ZeRO-0 exports (it crashed in
    zero_to_fp32) with the same weights as ZeRO 1–3 on one rank; the universal conversion of
    training.checkpoint.reshard runs weights-only and writes nothing outside the list either."""
    from training.checkpoint import reshard

    _, runs = stages
    files = sorted(runs.glob("*/checkpoints/step*/*.pt"))
    named = {g for f in files for g in torch.serialization.get_unsafe_globals_in_checkpoint(f)}
    assert named == set(ALLOWED), named
    assert not any(safe_load.non_weights_globals(f) for f in files)

    exported = {s: _export_weights(runs / s, tmp_path / s) for s in ("0fp32", "1fp32", "2fp32", "3fp32")}
    # the config's secrets (test_checkpoint_safety.SECRETS) are in no file: config.yaml, the
    # checkpoints' config.yaml and client state (mp_rank_00_model_states.pt), the exports
    from test_checkpoint_safety import SECRETS

    written = [p for p in [*runs.rglob("*"), *tmp_path.rglob("*")] if p.is_file()]
    assert not [str(p) for p in written for v in SECRETS.values() if v.encode() in p.read_bytes()]
    client = safe_load.load(runs / "2fp32" / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt")
    assert set(client["config"]["slurm"]["env"]) == set(SECRETS)
    assert all(v.startswith("<redacted") for v in client["config"]["slurm"]["env"].values())
    for stage, weights in exported.items():
        assert weights.keys() == exported["0fp32"].keys()
        # one rank: ZeRO 1/2 do ZeRO-0's arithmetic exactly; ZeRO-3 sums gradients in another order
        # (measured 7.6e-6 apart after two AdamW steps of lr 3e-3)
        atol = 1e-3 if stage == "3fp32" else 0
        for k, v in weights.items():
            torch.testing.assert_close(v, exported["0fp32"][k], rtol=0, atol=atol, msg=f"{stage} {k}")

    ckpt = runs / "2bf16" / "checkpoints" / "step00000002"
    reshard._convert(ckpt, tmp_path / "universal")
    universal = sorted((tmp_path / "universal").rglob("*.pt"))
    assert universal and not any(safe_load.non_weights_globals(f) for f in universal)


def _inject(ckpt: Path, pattern: str, marker: Path, legacy: bool = False) -> Path:
    """Put a RunsCode into the checkpoint's first file matching ``pattern`` (``legacy``: written in
    torch's older non-zip format) and rewrite the manifest, as someone who can write the files can
    (so the sha256 check passes and this check is reached)."""
    target = sorted(ckpt.glob(pattern))[0]
    state = safe_load.load(target)
    state["payload"] = RunsCode(marker)
    torch.save(state, target, _use_new_zipfile_serialization=not legacy)
    manifest.write(ckpt, [manifest.hash_share(ckpt, 0, 1)])
    return target


@pytest.mark.slow
@pytest.mark.parametrize("pattern,legacy", [("*model_states.pt", False), ("*optim_states.pt", False),
                                            ("*optim_states.pt", True)])
def test_an_object_in_a_checkpoint_is_refused_at_resume_and_export_and_never_runs(stages, tmp_path, pattern, legacy,
                                                                                   monkeypatch, capsys):
    import yaml

    from training.cli import main
    from training.export import fp32_state_dict

    config, runs = stages
    run, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(runs / "2fp32", run)
    ckpt = run / "checkpoints" / "step00000002"
    target = _inject(ckpt, pattern, marker, legacy)
    raw = yaml.safe_load(config.read_text())
    raw["zero"], raw["train"]["max_steps"] = {"stage": 2}, 3
    config.with_name("z2.yaml").write_text(yaml.safe_dump(raw))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    resumed = subprocess.run([sys.executable, "-m", "training.cli", "train", str(config.with_name("z2.yaml")),
                              "--run-dir", str(run)], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert resumed.returncode == 2, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"{target} holds builtins.exec" in resumed.stderr and TRUST_ENV in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert not marker.exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing changed, no fallback

    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "export")]) == 2
    assert f"{target} holds builtins.exec" in capsys.readouterr().err and not marker.exists()
    # past the up-front check: the load itself is weights-only (zero_to_fp32 reads zip archives only)
    with pytest.raises((UnsafeCheckpointError, CheckpointError), match="legacy .non-zip. format" if legacy else "exec"):
        fp32_state_dict(ckpt)
    assert not marker.exists()

    monkeypatch.setenv(TRUST_ENV, "1")  # the documented override loads it as DeepSpeed does: it runs
    if legacy:  # (but not a file that zero_to_fp32 cannot read at all: a clear error, not a traceback)
        assert main(["export", str(run), str(tmp_path / "trusted")]) == 2
        assert "legacy (non-zip) format" in capsys.readouterr().err and not marker.exists()
        return
    _export_weights(run, tmp_path / "trusted")
    assert marker.read_text() == "ran"
