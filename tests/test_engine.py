"""LR schedules, the frozen-body learning rates and the generated DeepSpeed JSON (no processes)."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import TrainConfig, ZeroConfig
from training.loop.engine import build_optimizer, deepspeed_config, lr_at, set_lr
from training.model.build import SpecialIds, build_model, hf_config


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 100, "lr": 1.0,
                          "min_lr": 0.1, "warmup_steps": 10, **kw})


def test_warmup_then_cosine_to_min_lr():
    t = train_cfg(schedule="cosine")
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(55, t) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lr_at(100, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_at(55, train_cfg(schedule="linear")) == pytest.approx(0.1 + 0.9 * 0.5)
    assert [lr_at(s, train_cfg(schedule="constant")) for s in (10, 50, 99)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))])
def test_wsd_is_stable_then_decays_over_decay_steps(shape, mid):
    t = train_cfg(schedule="wsd", decay_steps=20, decay_shape=shape)
    assert all(lr_at(s, t) == 1.0 for s in range(10, 80))  # stable until max_steps - decay_steps
    assert lr_at(89, t) == pytest.approx(0.1 + 0.9 * mid)  # 10 of 20 decay steps done
    assert lr_at(99, t) == pytest.approx(0.1)
    decay = [lr_at(s, t) for s in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def test_frozen_body_gives_body_groups_lr_zero():
    model = build_model(hf_config("tiny-mistral", {}, 256, SpecialIds(1, 2, 0)), seed=0)
    t = train_cfg(frozen_body_steps=3, warmup_steps=0, schedule="constant")
    opt = build_optimizer(model, t)
    parts = {g["part"]: g for g in opt.param_groups}
    assert set(parts) == {"body", "embeddings"}
    emb_params = {id(p) for g in opt.param_groups if g["part"] == "embeddings" for p in g["params"]}
    assert emb_params == {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    set_lr(opt, 2, t)
    assert {g["part"]: g["lr"] for g in opt.param_groups} == {"body": 0.0, "embeddings": 1.0}
    body_before = [p.detach().clone() for g in opt.param_groups if g["part"] == "body" for p in g["params"]]
    model(input_ids=torch.randint(0, 256, (2, 16)), labels=torch.randint(0, 256, (2, 16))).loss.backward()
    opt.step()
    body_after = [p for g in opt.param_groups if g["part"] == "body" for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(body_before, body_after, strict=True))
    set_lr(opt, 3, t)
    assert {g["lr"] for g in opt.param_groups} == {1.0}


def test_frozen_body_lr_is_a_stage_of_its_own_and_the_schedule_starts_after_it():
    # NORA 11B: 1,000 steps of embeddings only at a constant 1e-4, then warmup and WSD counted
    # from the first full step; here 5 frozen steps, then 10 warmup, 20 decay, max_steps 100.
    t = train_cfg(frozen_body_steps=5, frozen_body_lr=0.3, schedule="wsd", decay_steps=20)
    assert [lr_at(s, t) for s in range(5)] == [0.3] * 5
    assert lr_at(5, t) == pytest.approx(0.1) and lr_at(14, t) == pytest.approx(1.0)  # warmup restarts
    assert all(lr_at(s, t) == 1.0 for s in range(15, 80))  # stable until max_steps - decay_steps
    assert lr_at(89, t) == pytest.approx(0.1 + 0.9 * 0.5) and lr_at(99, t) == pytest.approx(0.1)
    # without frozen_body_lr the schedule runs through the frozen stage, as before
    plain = train_cfg(frozen_body_steps=5, schedule="wsd", decay_steps=20)
    assert lr_at(0, plain) == pytest.approx(0.1) and lr_at(9, plain) == pytest.approx(1.0)


def test_frozen_body_lr_needs_its_stage_and_room_for_the_decay():
    alone = TrainConfig.field_problems({**train_cfg().model_dump(), "frozen_body_lr": 1e-4})
    assert [field for field, _ in alone] == ["frozen_body_lr"]
    problems = TrainConfig.field_problems({**train_cfg().model_dump(), "frozen_body_steps": 20,
                                           "frozen_body_lr": 1e-4, "schedule": "wsd", "decay_steps": 75})
    assert problems == [("decay_steps", "75 > max_steps - frozen_body_steps - warmup_steps = 70.")]


def test_deepspeed_json_is_derived_from_the_config():
    t = train_cfg(global_batch_size=64, micro_batch_size=4, precision="bf16", grad_clip=2.5)
    ds = deepspeed_config(t, ZeroConfig(stage=3, offload_optimizer=True, offload_params=True,
                                        extra={"zero_optimization": {"stage3_max_live_parameters": 10}}), 8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64, 4, 2)
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 2.5
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_max_live_parameters"] == 10 and z["contiguous_gradients"]  # extra merged, not replacing


@pytest.mark.parametrize("name,expected", [
    ("normistral-7b-warm", 7_248_023_552),  # Mistral-7B-v0.1's 7,241,732,096 with 32,768 rows
    ("normistral-7b-scratch", 7_248_023_552),
    ("norbloom-7b-scratch", 6_578_388_992),  # NorBLOOM-7b-scratch's published config.json: 32 layers
])
def test_7b_configs_count_parameters_on_the_meta_device(name, expected):
    import resource

    from training.config import load_config
    from training.model.build import count_parameters

    cfg = load_config(f"configs/{name}.yaml")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = count_parameters(hf_config(cfg.model.flavor, cfg.model.overrides, cfg.model_vocab_size, SpecialIds(1, 2, 0)))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert n == expected
    assert grown_mib < 512, f"building {name} allocated {grown_mib:.0f} MiB: not on the meta device"


def test_deepspeed_defaults_for_gpu_runs():
    """fp32 gradient accumulation under bf16; overlap_comm on for ZeRO-2/3 (off for 0/1, where
    there is nothing per micro-step to overlap); buckets sized so overlap's ~4.5× stays small."""
    bf16, fp32 = train_cfg(precision="bf16"), train_cfg(precision="fp32")
    assert deepspeed_config(bf16, ZeroConfig(stage=2), 1)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(fp32, ZeroConfig(stage=2), 1)
    for stage, overlap in ((0, False), (1, False), (2, True), (3, True)):
        assert deepspeed_config(bf16, ZeroConfig(stage=stage), 1)["zero_optimization"]["overlap_comm"] is overlap
    assert deepspeed_config(bf16, ZeroConfig(stage=2, overlap_comm=False), 1)["zero_optimization"]["overlap_comm"] is False
    z2 = deepspeed_config(bf16, ZeroConfig(stage=2), 1)["zero_optimization"]
    assert z2["reduce_bucket_size"] == z2["allgather_bucket_size"] == 200_000_000


def test_bf16_gradients_are_accumulated_and_reduced_in_fp32_as_deepspeed_reads_it():
    """DeepSpeed reduces across ranks in communication_data_type, the model's bf16 unless set:
    read back through DeepSpeed's own parser, both accumulation and reduction are fp32; an fp32
    run leaves DeepSpeed's defaults (fp32 throughout); zero.extra can choose bf16 reduction."""
    from deepspeed.runtime.config import DeepSpeedConfig

    for stage in (1, 2, 3):
        ds = DeepSpeedConfig(deepspeed_config(train_cfg(precision="bf16"), ZeroConfig(stage=stage), 1))
        assert (ds.communication_data_type, ds.grad_accum_dtype) == (torch.float32, "fp32"), stage
    assert DeepSpeedConfig(deepspeed_config(train_cfg(precision="fp32"), ZeroConfig(stage=2), 1)).communication_data_type is None
    cheap = ZeroConfig(stage=2, extra={"communication_data_type": "bf16"})
    assert DeepSpeedConfig(deepspeed_config(train_cfg(precision="bf16"), cheap, 1)).communication_data_type == torch.bfloat16


def _old_build(config, seed, std):
    """What build_model did before: transformers' init, then ours over it (the reference)."""
    from transformers import AutoModelForCausalLM

    from training.model.build import init_scratch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    init_scratch(model, "bloom" if config.model_type == "bloom" else "mistral", std, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@pytest.mark.parametrize("flavor", ["tiny-mistral", "tiny-bloom"])
def test_lean_build_is_the_same_model_with_one_init_in_the_training_dtype(flavor, monkeypatch):
    from transformers import PreTrainedModel

    from training.model.build import build_model

    config = hf_config(flavor, {}, 300, SpecialIds(1, 2, 0))
    want = _old_build(config, seed=3, std=0.02)
    hf_inits = []
    monkeypatch.setattr(PreTrainedModel, "_init_weights", lambda self, m: hf_inits.append(m))
    got = build_model(config, seed=3, std=0.02)
    assert not hf_inits, "transformers' init ran although init_scratch overwrites every weight"
    w, g = dict(want.named_parameters()), dict(got.named_parameters())
    assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) for k in w)
    for name, buf in want.named_buffers():  # e.g. RoPE's inv_freq, computed, not initialised
        assert torch.equal(buf, dict(got.named_buffers())[name]), name
    bf16 = build_model(config, seed=3, std=0.02, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert all(torch.equal(p, w[k].to(torch.bfloat16)) for k, p in bf16.named_parameters())


def test_progress_line():
    from training.loop.metrics import progress_line

    assert progress_line(12, 200, 5.43219, 3e-4, 12345.6, 0.412, 1.5) == (
        "[train] step 12/200: loss 5.4322, lr 3.00e-04, 12,346 tokens/s, MFU 41.2 %, 1.50 s/step, ETA 0:04:42")
    assert "MFU" not in progress_line(1, 2, 1.0, 1e-3, 10.0, None, 3700.0)
    assert progress_line(1, 2, 1.0, 1e-3, 10.0, None, 3700.0).endswith("ETA 1:01:40")
