"""The GPU-path fixes, held on CPU: a warm start trains in train mode with activation
checkpointing really on; at NORA's shapes (window = seq_len) SDPA gets no mask; document masks
reach FlexAttention as a block mask that agrees with SDPA's dense one; the loop reduces losses
only on logging steps; DeepSpeed's JIT ops are built by one rank per node."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_training import REPO, tiny_config, torchrun, write_config

from data_pipeline.batch import document_ids
from training.config import parse_config
from training.data.pretraining import run_prepare
from training.model.build import SpecialIds, drop_unbound_sliding_window, hf_config
from training.model.loss import model_inputs

pytestmark = pytest.mark.slow
PROBE = str(REPO / "tests" / "dist" / "probe_train.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    cfg = parse_config(tiny_config(root))
    run_prepare(cfg.tokenizer, cfg.data, progress=False)
    return root


def test_unbound_window_is_dropped_for_training_and_kept_for_export():
    cfg = hf_config("mistral-7b", {}, 32768, SpecialIds(1, 2, 2))
    assert cfg.sliding_window == 2048
    drop_unbound_sliding_window(cfg, 2048)
    assert cfg.sliding_window is None  # 2048/2048 cannot bind: exact
    binding = hf_config("mistral-7b", {"sliding_window": 1024}, 32768, SpecialIds(1, 2, 2))
    drop_unbound_sliding_window(binding, 2048)
    assert binding.sliding_window == 1024  # a window that binds stays
    assert hf_config("mistral-7b", {}, 32768, SpecialIds(1, 2, 2)).sliding_window == 2048  # what export builds


def test_warm_start_trains_in_train_mode_with_checkpointing_and_no_mask_at_nora_shapes(data_root, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    base = tmp_path / "base"
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(  # like Mistral-7B-v0.1: a window as long as the context
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, sliding_window=2048, tie_word_embeddings=False,
        rms_norm_eps=1e-5,  # Mistral-7B-v0.1's (MistralConfig's default is 1e-6, which the flavor is not)
    )).save_pretrained(base)
    raw = tiny_config(data_root, max_steps=4, global_batch_size=4, micro_batch_size=1, warmup_steps=1)
    raw["model"].update(init="warm", base=str(base), base_tokenizer=str(data_root / "tokenizer"),
                        activation_checkpointing=True, overrides={"max_position_embeddings": 2048,
                                                                  "sliding_window": 2048})
    raw["data"]["seq_len"] = 2048
    raw["logging"] = {"every_steps": 2}
    raw["checkpoint"] = {"every_steps": 4, "keep_last": 1}
    raw["eval"] = {"every_steps": 2, "max_samples": 2}
    out = tmp_path / "probe.json"
    torchrun(PROBE, str(write_config(tmp_path / "c.yaml", raw)), str(tmp_path / "run"), str(out))
    probe = json.loads(out.read_text())
    forwards = 4 * 2  # 4 steps × 2 micro-batches per rank (global 4 = micro 1 × 2 ranks × 2)
    assert probe["final_step"] == 4 and probe["train_forwards"] == forwards, probe
    assert probe["train_forwards_in_eval_mode"] == 0, probe  # from_pretrained's eval mode is undone
    assert probe["checkpointed_layer_calls"] == forwards * 2, probe  # both layers, every training forward
    assert probe["sdpa_masks"] == [None], probe  # is_causal, no (1, 1, 2048, 2048) mask: the flash path
    assert probe["loss_reductions"] == 2 and probe["stop_agreements"] == 4, probe  # logging steps 2 and 4


def test_flex_block_mask_agrees_with_sdpa_dense_mask():
    """The GPU default for masked documents (FlexAttention, a BlockMask) against the CPU path (SDPA
    with the dense mask transformers builds from the same position ids), on packed documents and a
    row that holds one document only."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = MistralForCausalLM(cfg).eval()
    x = torch.randint(3, 97, (2, 64), generator=torch.Generator().manual_seed(1))
    x[0, 20], x[0, 41] = 2, 2  # three documents in row 0, one in row 1
    with torch.no_grad():
        dense = model(**model_inputs(x, document_ids(x, 2))).logits
        model.config._attn_implementation = "flex_attention"
        flex = model(**model_inputs(x, document_ids(x, 2))).logits
        unmasked = model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)
    assert (unmasked[0, 21:] - flex[0, 21:]).abs().max() > 1e-2  # the mask is really applied


def test_jit_op_is_built_once_per_node_by_local_rank_0(data_root, tmp_path):
    """A cold extension cache: two ranks starting together must not build the same op (the first
    2-rank CPU run used to fail with "deepspeed_shm_comm.so: cannot open shared object file")."""
    raw = tiny_config(data_root, max_steps=1, warmup_steps=1)
    raw["eval"] = {"every_steps": 0, "max_samples": 2}
    ext = tmp_path / "ext"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    from launch import launch_torchrun

    launch = launch_torchrun("-m", "training.cli", "train", str(write_config(tmp_path / "c.yaml", raw)),
                             "--run-dir", str(tmp_path / "run"), env=env)
    assert launch.ok, launch.summary()
    logs = {r: out + err for r, (out, err) in launch.rank_logs.items()}
    assert (ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()
    builders = [r for r, text in sorted(logs.items()) if "[distributed] built DeepSpeed op" in text]
    assert builders == [0], logs  # compiled once, by local rank 0; rank 1 loaded it after the barrier
    assert not any("cannot open shared object" in text for text in logs.values()), logs
    # a run killed while torch's loader held <op dir>/lock used to make every later launch wait forever
    (ext / "deepspeed_shm_comm" / "lock").touch()
    again = launch_torchrun("-m", "training.cli", "train", str(tmp_path / "c.yaml"), "--run-dir",
                            str(tmp_path / "run2"), env=env, timeout=180)
    assert again.ok, again.summary()
    assert "removed a stale build lock" in again.stderr
    shutil.rmtree(ext, ignore_errors=True)
