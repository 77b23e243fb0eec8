"""The trainer's promises for the NORA recipes, on tiny models with real multi-rank DeepSpeed:
data-parallel equivalence, exact resume for ZeRO 1/2/3 across schedule phases, signal-safe and
kill-safe checkpoints, export parity for Mistral and BLOOM from ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from launch import launch_torchrun, signalled_ok
from test_training import REPO, read_jsonl, tiny_config, torchrun, write_config

from training.config import parse_config
from training.data.pretraining import run_prepare

pytestmark = pytest.mark.slow
DUMP = str(REPO / "tests" / "dist" / "train_and_dump.py")
TRAIN = ["-m", "training.cli", "train"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    cfg = parse_config(tiny_config(root))
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    return root


def recipe(data_root: Path, stage: int = 2, flavor: str = "tiny-mistral", **train) -> dict:
    raw = tiny_config(data_root, **{"max_steps": 5, "schedule": "wsd", "warmup_steps": 1, "decay_steps": 2, **train})
    raw["model"]["flavor"] = flavor
    raw["zero"]["stage"] = stage
    raw["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    raw["eval"] = {"every_steps": 0, "max_samples": 4}
    return raw


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """Uninterrupted reference runs, one per (flavor, ZeRO stage), each with the trained engine's
    logits on a fixed batch dumped for the export-parity checks."""
    cache: dict[tuple[str, int], Path] = {}

    def get(flavor: str, stage: int) -> Path:
        if (flavor, stage) not in cache:
            run = tmp_path_factory.mktemp(f"straight-{flavor}-z{stage}")
            config = write_config(run / "config-in.yaml", recipe(data_root, stage, flavor))
            torchrun(DUMP, str(config), str(run / "run"), str(run / "logits.pt"))
            cache[(flavor, stage)] = run
        return cache[(flavor, stage)]

    return get


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")]


def test_zero2_two_ranks_match_one_rank(data_root, straight, tmp_path):
    config = write_config(tmp_path / "c.yaml", recipe(data_root, 2))
    torchrun(*TRAIN, str(config), "--run-dir", str(tmp_path / "one"), nproc=1)
    one, two = losses(tmp_path / "one"), losses(straight("tiny-mistral", 2) / "run")
    assert len(one) == len(two) == 5
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5, (one, two)


def test_zero3_matches_zero2(straight):
    z2, z3 = losses(straight("tiny-mistral", 2) / "run"), losses(straight("tiny-mistral", 3) / "run")
    assert max(abs(a - b) for a, b in zip(z2, z3, strict=True)) <= 1e-5, (z2, z3)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exact_resume_across_schedule_phases(data_root, straight, tmp_path, stage):
    """Stop after step 2 (warmup → stable), resume through the WSD decay (steps 4–5)."""
    config = write_config(tmp_path / "c.yaml", recipe(data_root, stage))
    run = tmp_path / "run"
    torchrun(*TRAIN, str(config), "--run-dir", str(run), "--stop-at", "2")
    resumed = torchrun(*TRAIN, str(config), "--run-dir", str(run))
    # DeepSpeed calls torch collectives by deprecated names, a FutureWarning on every rank several
    # times a run (ZeRO-3's reduce-scatter; training.distributed filters them); and ZeRO-3's module
    # hooks warn about an output they cannot see into (the fused loss returns a ModelOutput)
    noise = ("FutureWarning", "unknown inputs or outputs type")
    assert not [r for r, (out, err) in resumed.rank_logs.items() if any(n in out + err for n in noise)], \
        resumed.summary()
    if stage == 1:
        reference = tmp_path / "ref"
        torchrun(*TRAIN, str(config), "--run-dir", str(reference))
    else:
        reference = straight("tiny-mistral", stage) / "run"
    ref, got = read_jsonl(reference / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    lrs = [m["lr"] for m in got]
    assert lrs[1] == lrs[2] > lrs[3] > lrs[4], lrs  # stable, then decay: the resume crossed phases
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in ref] == [m[key] for m in got], key


def _children(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "training.cli" in " ".join(p.cmdline())]


@pytest.mark.parametrize("how", ["usr1", "ctrl_c"])
def test_signal_checkpoints_and_resume_is_bit_identical(data_root, tmp_path, how):
    """Slurm's USR1 to the ranks, or a Ctrl-C in the terminal (SIGINT to torchrun and its ranks;
    torchrun then SIGTERMs them): the ranks finish the step, save and exit 42."""
    raw = recipe(data_root, 2, max_steps=40, decay_steps=10)
    raw["checkpoint"]["every_steps"] = 100  # only the signal and the end save
    config = write_config(tmp_path / "c.yaml", raw)
    run, reference = tmp_path / "run", tmp_path / "ref"

    def signal_after_three_steps(proc, ranks) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and len(read_jsonl(run / "metrics.jsonl")) >= 3:
                break
            time.sleep(0.2)
        if how == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)
            return
        for child in _children(proc):  # what Slurm's --signal does to the job steps
            child.send_signal(signal.SIGUSR1)

    first = launch_torchrun(*TRAIN, str(config), "--run-dir", str(run), timeout=300,
                            during=signal_after_three_steps, expect_returncode=None)
    if how == "usr1":
        assert signalled_ok(first), first.summary()
    else:  # torchrun itself dies of the SIGINT (SignalException) without its table of rank exit codes
        assert "exiting with 42" in first.stdout and "Ctrl-C: finishing this step and saving" in first.stderr
    assert "KeyboardInterrupt" not in first.stderr, first.summary()
    saved = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    assert 3 <= saved < 40
    torchrun(*TRAIN, str(config), "--run-dir", str(run))
    torchrun(*TRAIN, str(config), "--run-dir", str(reference))
    assert losses(run) == losses(reference)
    assert len(losses(run)) == 40


def test_kill_during_save_leaves_latest_on_a_complete_checkpoint(data_root, straight, tmp_path):
    config = write_config(tmp_path / "c.yaml", recipe(data_root, 2))
    run = tmp_path / "run"
    env = {**os.environ, "NORALLM_TEST_KILL_DURING_SAVE": "4"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *TRAIN,
           str(config), "--run-dir", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    assert (ckpts / ".tmp-step00000004").is_dir() and not (ckpts / "step00000004").exists()
    torchrun(*TRAIN, str(config), "--run-dir", str(run))
    assert not list(ckpts.glob(".tmp-*"))
    assert losses(run) == losses(straight("tiny-mistral", 2) / "run")


@pytest.mark.parametrize("flavor,stage", [("tiny-mistral", 3), ("tiny-bloom", 2), ("tiny-bloom", 3)])
def test_export_matches_engine_logits(straight, tmp_path, flavor, stage):
    from transformers import AutoModelForCausalLM

    from training.export import export

    run = straight(flavor, stage)
    out = export(run / "run", tmp_path / "hf", dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = torch.load(run / "logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=ref["inputs"]).logits
    assert torch.max(torch.abs(logits - ref["logits"])).item() <= 1e-5
    bf16 = export(run / "run", tmp_path / "hf-bf16", dtype="bf16")
    reloaded = AutoModelForCausalLM.from_pretrained(str(bf16))
    assert reloaded.dtype == torch.bfloat16


def test_zero3_offload_bf16_activation_checkpointing_trains(data_root, tmp_path):
    """The memory levers for 7B on few GPUs: ZeRO-3, optimizer + parameter CPU offload (DeepSpeed's
    CPU Adam), bf16 and activation checkpointing, together."""
    from transformers import AutoModelForCausalLM

    from training.export import export

    raw = recipe(data_root, 3, max_steps=6, schedule="constant", precision="bf16")
    raw["zero"].update(offload_optimizer=True, offload_params=True)
    raw["model"]["activation_checkpointing"] = True
    config = write_config(tmp_path / "c.yaml", raw)
    proc = torchrun(*TRAIN, str(config), "--run-dir", str(tmp_path / "run"))
    assert "ZeRO-3, bf16" in proc.stdout
    got = losses(tmp_path / "run")
    assert len(got) == 6 and sum(got[-2:]) < sum(got[:2]), got
    model = AutoModelForCausalLM.from_pretrained(str(export(tmp_path / "run", tmp_path / "hf", "bf16")))
    assert model.dtype == torch.bfloat16


def test_cooldown_branches_from_a_saved_checkpoint(data_root, tmp_path):
    """A WSD cooldown started from step 4 of a constant-LR run: same state and data position, then
    the LR decays to min_lr over decay_steps."""
    long = recipe(data_root, 2, max_steps=6, schedule="constant", warmup_steps=0)
    main_run = tmp_path / "main"
    torchrun(*TRAIN, str(write_config(tmp_path / "main.yaml", long)), "--run-dir", str(main_run))
    cool = recipe(data_root, 2, max_steps=6, schedule="wsd", warmup_steps=0, decay_steps=2)
    branch = tmp_path / "cooldown"
    branched = torchrun(*TRAIN, str(write_config(tmp_path / "cool.yaml", cool)), "--run-dir", str(branch),
                        "--from-checkpoint", str(main_run / "checkpoints" / "step00000004"))
    assert "[train] step00000004 was trained with other settings; continuing with this config's: " in branched.stdout
    assert "train.schedule 'constant' → 'wsd'" in branched.stdout
    a, b = read_jsonl(main_run / "metrics.jsonl"), read_jsonl(branch / "metrics.jsonl")
    assert [m["step"] for m in b] == [5, 6]
    assert b[0]["loss"] == a[4]["loss"]  # same weights, optimizer state and batch at step 5
    assert b[0]["lr"] < a[4]["lr"] and b[1]["lr"] == pytest.approx(cool["train"]["min_lr"])
    # the branch records where it came from, so `norallm report` draws the parent up to step 4
    (row,) = read_jsonl(branch / "resumes.jsonl")
    assert row["step"] == 4 and row["from"] == str((main_run / "checkpoints" / "step00000004").resolve())
    from training.eval.report import _parent

    name, rows, at = _parent([row])
    assert (name, [m["step"] for m in rows], at) == ("main", [1, 2, 3, 4], 4)

    # another shape and ZeRO stage: one line and exit 2 on every rank (it was DeepSpeed's traceback, exit 1)
    other = recipe(data_root, 3, max_steps=6)
    other["model"]["overrides"] = {"num_hidden_layers": 1}
    refused = launch_torchrun(*TRAIN, str(write_config(tmp_path / "other.yaml", other)), "--run-dir",
                              str(tmp_path / "other"), "--from-checkpoint", str(main_run / "checkpoints" / "step00000004"),
                              expect_returncode=None)
    assert set(refused.rank_returncodes.values()) == {2}, refused.summary()
    assert "model.overrides {} → {'num_hidden_layers': 1}; zero.stage 2 → 3" in refused.stderr, refused.summary()
    assert not any("Traceback" in out + err for out, err in refused.rank_logs.values())
    assert not (tmp_path / "other").exists()


def test_a_resume_across_a_mixture_change_says_what_changed(data_root, tmp_path):
    """With data.allow_mixture_change a run resumes on new shares, and its log says where the
    order changed and what changed."""
    raw = recipe(data_root, 2, max_steps=3)
    run = tmp_path / "run"
    torchrun(*TRAIN, str(write_config(tmp_path / "a.yaml", raw)), "--run-dir", str(run), "--stop-at", "2", nproc=1)
    raw["data"]["sources"][1]["share"] = 0.25
    raw["data"]["allow_mixture_change"] = True
    second = torchrun(*TRAIN, str(write_config(tmp_path / "b.yaml", raw)), "--run-dir", str(run), nproc=1)
    assert "[train] resuming at step 2" in second.stdout
    assert "[train] mixture changed at global sample 16: the share of 'nno' changed (" in second.stdout
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
