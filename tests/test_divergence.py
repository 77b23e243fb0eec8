"""Divergence is caught: non-finite steps are counted, never checkpointed over the last good
state, reported as valid JSON, and past train.max_nonfinite_steps the run stops with a message.
Finite blow-ups (a loss spike, a gradient norm 0 or exploding) are found without false alarms on
normal training, mark the checkpoints saved in them unhealthy, and never rotate the last healthy
one out."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.loop.guard import DivergenceError, NonFiniteGuard, finite_or_none


def test_guard_counts_nonfinite_steps_until_a_save():
    guard, log = NonFiniteGuard(limit=10, device=torch.device("cpu")), []
    guard.observe(torch.tensor(2.5), 1.0)
    assert guard.check(1, "p", log.append) == 0 and not log
    guard.observe(torch.tensor(float("nan")), 1.0)
    guard.observe(torch.tensor(2.0), float("inf"))
    guard.observe(torch.tensor(2.0), torch.tensor(float("inf")))  # DeepSpeed may hand back a tensor
    assert guard.check(4, "p", log.append) == 3 and "3 step(s) up to step 4" in log[0]
    guard.saved()
    guard.observe(torch.tensor(2.0), 0.5)
    assert guard.check(5, "p", log.append) == 0 and guard.total == 3


def test_guard_raises_with_step_and_position():
    guard = NonFiniteGuard(limit=2, device=torch.device("cpu"))
    guard.observe(torch.tensor(float("inf")), None)
    assert guard.check(7, "p", lambda _: None) == 1
    guard.observe(torch.tensor(1.0), float("nan"))
    with pytest.raises(DivergenceError, match=r"2 steps .* step 9 \(data position: 1,024 tokens\)"):
        guard.check(9, "1,024 tokens", lambda _: None)


def test_metrics_rows_stay_json():
    row = finite_or_none({"step": 3, "loss": float("inf"), "grad_norm": float("nan"), "lr": 1e-3})
    assert row == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "nonfinite": ["loss", "grad_norm"]}
    json.loads(json.dumps(row, allow_nan=False))


@pytest.mark.slow
def test_a_blow_up_stops_the_run_keeps_the_last_healthy_checkpoint_and_names_it(tmp_path):
    """2 ranks, ZeRO-2: four normal steps, then the issue's run, resumed at lr 1000: the loss
    spikes to ~1e7, the model collapses (gradient norm 0), then goes non-finite. A save every step
    with keep_last 1 would rotate step 4 out at the next save; it stays, healthy and verified, the
    checkpoints after it are unhealthy, rows are flagged, and the stop names step 4 with the
    command that branches from it. Non-finite steps are still null in metrics.jsonl and never
    saved."""
    from launch import launch_torchrun
    from test_training import tiny_config, torchrun, write_config

    from training.checkpoint import store
    from training.config import parse_config
    from training.data.pretraining import run_prepare

    raw = tiny_config(tmp_path, max_steps=30, max_nonfinite_steps=3)
    raw["checkpoint"] = {"every_steps": 1, "keep_last": 1}
    raw["eval"] = {"every_steps": 0, "max_samples": 2}
    cfg = parse_config(raw)
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    config, run = str(write_config(tmp_path / "c.yaml", raw)), tmp_path / "run"
    torchrun("-m", "training.cli", "train", config, "--run-dir", str(run), "--stop-at", "4")
    blown = launch_torchrun("-m", "training.cli", "train", config, "--run-dir", str(run), "--set", "train.lr=1000",
                            expect_returncode=None)
    assert set(blown.rank_returncodes.values()) == {2}, blown.summary()
    assert all("Traceback" not in err for _, err in blown.rank_logs.values())
    healthy = run / "checkpoints" / "step00000004"
    error = next(line for line in blown.stderr.splitlines() if line.startswith("error: training diverged"))
    assert f"The last healthy checkpoint is {healthy.resolve()}" in error
    assert f"--from-checkpoint {healthy.resolve()}`" in error and "train.lr (now 1000)" in error
    assert "anomalous step(s)" in blown.stdout and "the last healthy one is" in blown.stdout
    assert store.is_healthy(healthy) and store.checkpoint_problems(healthy) == []
    later = [p for p in store.step_dirs(run) if p.name > healthy.name]
    assert later and not any(store.is_healthy(p) for p in later)
    assert all(store.checkpoint_problems(p) == [] for p in later)  # marked, and still verified
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("anomalous_steps") for r in rows)
    bad = [r["step"] for r in rows if r.get("nonfinite")]
    assert bad and all(r["grad_norm"] is None or math.isfinite(r["grad_norm"]) for r in rows)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert healthy.name < latest and int(latest.removeprefix("step")) < bad[0]  # no save from a non-finite state


# Finite blow-ups: the detector on synthetic series, then the guard's policy on checkpoints.

def _series(detector, losses, grads, start=1):
    for step, (loss, grad) in enumerate(zip(losses, grads, strict=True), start):
        detector.observe(step, torch.tensor(loss), grad)
    return detector.read()


def _normal_run(seed: int, steps: int = 600, vocab: int = 32768):
    """A pretraining curve: ln V at init, fast drop, slow decay, 3 % noise, a warm-up bump of 1.4×
    at the end of warm-up (warm_vs_scratch's scratch run at 2e-3: ~7 → 9.9), gradient norms that
    start high, wander by ×3 and spike ×10 now and then (clipping's business, not ours)."""
    import random

    rng = random.Random(seed)
    losses, grads = [], []
    for step in range(1, steps + 1):
        level = 2.2 + (math.log(vocab) - 2.2) * math.exp(-step / 60)
        bump = 1.4 if 45 <= step < 50 else 1.0
        losses.append(level * bump * (1 + rng.gauss(0, 0.03)))
        grads.append((8.0 * math.exp(-step / 20) + 0.4) * rng.uniform(0.5, 1.5) * (10 if rng.random() < 0.01 else 1))
    return losses, grads


@pytest.mark.parametrize("seed", range(5))
def test_normal_training_with_warmup_and_noise_raises_no_alarm(seed):
    from training.loop.guard import AnomalyDetector

    losses, grads = _normal_run(seed)
    reading = _series(AnomalyDetector(4.0, 100.0, 20, torch.device("cpu")), losses, grads)
    assert reading.anomalous == 0 and reading.first is None, reading


def test_sft_sized_losses_with_large_relative_noise_raise_no_alarm():
    """A small loss (SFT, a memorised set) that triples from step to step is still under 1 nat off."""
    from training.loop.guard import AnomalyDetector

    losses = [0.2, 0.25, 0.6, 0.15, 0.7, 0.3, 0.2, 0.9, 0.25] * 10
    assert _series(AnomalyDetector(4.0, 100.0, 20, torch.device("cpu")), losses, [1.0] * len(losses)).anomalous == 0


def test_a_loss_spike_a_zero_and_an_exploding_gradient_norm_are_anomalous():
    from training.loop.guard import AnomalyDetector

    d = AnomalyDetector(4.0, 100.0, 20, torch.device("cpu"))
    losses, grads = _normal_run(0, steps=100)
    assert _series(d, losses, grads).anomalous == 0
    # the lr 1000 run: a 1e7 spike with a 4e10 gradient norm, then the collapsed model (ln V, norm 0)
    r = _series(d, [1.35e7, 10.397, 10.397], [torch.tensor(4e10), 0.0, 0.0], start=101)
    assert (r.anomalous, r.spikes, r.grad_spikes, r.zero_grad, r.first, r.last) == (3, 1, 1, 2, 101, 103)
    assert r.worst_loss == pytest.approx(1.35e7) and r.worst_loss_ratio > 1e6
    # the blow-up did not become the new normal: the same loss later is still a spike
    assert _series(d, [1.35e7], [1.0], start=104).spikes == 1
    # non-finite steps are trouble (for the checkpoints' health) but counted by NonFiniteGuard
    r = _series(d, [float("nan")], [1.0], start=105)
    assert (r.anomalous, r.first) == (0, 105)
    # a factor of 0 turns a check off
    off = AnomalyDetector(0.0, 0.0, 20, torch.device("cpu"))
    assert _series(off, [2.0, 1e7], [1.0, 1e9]).anomalous == 0


def test_the_running_means_travel_in_the_checkpoint():
    from training.loop.guard import AnomalyDetector

    d = AnomalyDetector(4.0, 100.0, 20, torch.device("cpu"))
    _series(d, [3.0] * 30, [1.0] * 30)
    resumed = AnomalyDetector(4.0, 100.0, 20, torch.device("cpu"))
    resumed.load_state_dict(d.state_dict())
    assert _series(resumed, [50.0], [1.0], start=31).spikes == 1  # judged against the run's history at once


def _guard(run, resumed=None, state=None, **train):
    from test_training import tiny_config

    from training.config import parse_config
    from training.loop.guard import DivergenceGuard

    cfg = parse_config(tiny_config(run, **train))
    return DivergenceGuard(cfg.train, torch.device("cpu"), run, resumed, state)


def test_trouble_condemns_the_checkpoint_before_it_and_names_the_last_healthy_one(tmp_path):
    """Checkpoints at 2 and 4; step 5's loss spikes (it measured step 4's weights): step 4 is
    marked unhealthy in meta.json (its manifest still verifies), saves in trouble are unhealthy,
    the stop names step 2 with the command that branches from it; after enough normal steps
    checkpoints are healthy again."""
    from test_checkpoint_safety import make_checkpoint

    from training.checkpoint import store

    run = tmp_path / "run"
    guard, log = _guard(run, max_anomalous_steps=3, anomaly_window_steps=5), []
    for step in range(1, 5):
        guard.observe(step, torch.tensor(3.0 - 0.01 * step), 1.0)
        assert guard.check(step, "p", log.append) == 0
        if step % 2 == 0:
            assert guard.health() == {"healthy": True}
            guard.saved(step, make_checkpoint(run, step))
    assert not log
    guard.observe(5, torch.tensor(4.0e4), 1.0)
    guard.check(5, "p", log.append)
    four = run / "checkpoints" / "step00000004"
    assert not store.is_healthy(four) and store.checkpoint_problems(four) == []
    assert "step00000004 holds the weights that step 5 measured: marked unhealthy" in log[0]
    assert "the last healthy one is" in log[1] and str(run / "checkpoints" / "step00000002") in log[1]
    assert guard.row_flags() == {"anomalous_steps": 1, "anomaly": "loss_spike"} and guard.row_flags() == {}
    health = guard.health()
    assert health["healthy"] is False and "since step 5" in health["unhealthy"]
    guard.saved(6, make_checkpoint(run, 6))
    guard.observe(6, torch.tensor(3.0), 0.0)  # collapsed: nothing flows
    guard.check(6, "p", log.append)
    guard.observe(7, torch.tensor(5.0e4), 1.0)
    with pytest.raises(DivergenceError) as e:
        guard.check(7, "1,024 tokens", log.append)
    message = str(e.value)
    two = (run / "checkpoints" / "step00000002").resolve()
    assert "3 anomalous steps since step 5" in message and "gradient norm exactly 0 at 1 step(s)" in message
    assert f"The last healthy checkpoint is {two} (checkpoints/latest names step00000006" in message
    assert f"--from-checkpoint {two}`" in message and "lower train.lr" in message


def test_training_that_recovers_saves_healthy_checkpoints_again(tmp_path):
    run = tmp_path / "run"
    guard, log = _guard(run, anomaly_window_steps=5), []
    guard.observe(1, torch.tensor(3.0), 1.0)
    guard.observe(2, torch.tensor(40.0), 1.0)  # one spike, then normal
    guard.check(2, "p", log.append)
    assert guard.health()["healthy"] is False
    for step in range(3, 8):
        guard.observe(step, torch.tensor(3.0), 1.0)
    guard.check(7, "p", log.append)
    assert guard.health() == {"healthy": True} and "training recovered: 5 normal steps since step 2" in log[-1]


def test_a_resume_inside_trouble_stays_in_trouble(tmp_path):
    from test_checkpoint_safety import make_checkpoint

    run = tmp_path / "run"
    guard = _guard(run)
    guard.observe(1, torch.tensor(3.0), 1.0)
    guard.observe(2, torch.tensor(40.0), 1.0)
    guard.check(2, "p", lambda _: None)
    state = {"step": 2, "anomaly": guard.state_dict()}
    resumed = _guard(run, make_checkpoint(run, 2), state)
    assert resumed.health()["healthy"] is False and resumed.trouble.since == 2
