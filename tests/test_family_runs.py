"""Warm start from a tiny base of every model family (training.model.families), saved as
transformers saves it, onto a new tokenizer (the vocabulary transplant; and once each with the
base's own tokenizer kept, and with it extended by tokens learned on the corpus), trained on two ranks,
stopped and resumed, exported: the resumed run's losses are the straight run's, and the exported
model's logits are the trained engine's. One torchrun launch trains every family
(tests/dist/train_families.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_training import EMBEDDED, REPO, read_jsonl, tiny_config, torchrun, write_config

from data_pipeline.tokenizer import SpecialTokens, train_bpe
from training.config import parse_config
from training.data.pretraining import run_prepare
from training.model.build import SpecialIds, build_model, hf_config
from training.model.families import FLAVORS

pytestmark = pytest.mark.slow

# name: (flavor of the base, ZeRO stage, sharded safetensors, model.tokenizer_strategy). ZeRO-3
# reads each rank's slices of the base itself (training.model.partitioned), sharded or not; tied
# embeddings under both paths; replace transplants onto the run's 512-entry BPE
RUNS = {
    "tiny-mistral-nemo": ("tiny-mistral-nemo", 2, False, "replace"),  # head_dim 32 ≠ hidden / heads
    "tiny-llama": ("tiny-llama", 2, True, "replace"),
    "tiny-qwen2": ("tiny-qwen2", 3, True, "replace"),  # tied, q/k/v biases
    "tiny-qwen3": ("tiny-qwen3", 2, False, "replace"),  # q/k norms, explicit head_dim
    "tiny-gemma2": ("tiny-gemma2", 3, False, "replace"),  # tied, scaled embedding, soft caps, local layers, eager
    "tiny-olmo2": ("tiny-olmo2", 2, False, "replace"),
    "tiny-bloom": ("tiny-bloom", 2, True, "replace"),  # ALiBi, tied
    "keep-llama": ("tiny-llama", 2, False, "keep"),  # the base's own 400-entry tokenizer, no transplant
    "extend-qwen2": ("tiny-qwen2", 2, False, "extend"),  # the base's 400 + 48 learned on the corpus
}
EXTEND_TOKENS = 48
BASE_VOCAB = 400


def _base(root: Path, name: str, flavor: str, sharded: bool, tokenizer_dir: Path) -> Path:
    """A random base of ``flavor`` with its own tokenizer, as a downloaded base dir looks."""
    base = root / name
    model = build_model(hf_config(flavor, {}, BASE_VOCAB, SpecialIds(1, 2, 0)), seed=11)
    model.save_pretrained(base, max_shard_size="200KB" if sharded else "1GB")
    assert (base / "model.safetensors.index.json").is_file() == sharded
    for f in tokenizer_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    return base


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    texts = [json.loads(line)["text"] for f in ("nob.jsonl", "nno.jsonl")
             for line in (EMBEDDED / f).read_text(encoding="utf-8").splitlines()]
    base_tok = root / "base-tokenizer"
    train_bpe(texts, base_tok, vocab_size=BASE_VOCAB, special=SpecialTokens())
    raw = tiny_config(root, max_steps=3, warmup_steps=1)
    run_prepare(parse_config(raw).tokenizer, parse_config(raw).data, progress=False)  # the new tokenizer: 512
    jobs, dirs = [], {}
    for name, (flavor, stage, sharded, strategy) in RUNS.items():
        raw = tiny_config(root, max_steps=3, warmup_steps=1)
        raw["tokenizer"]["train"] = False
        raw["model"] = {"init": "warm", "base": str(_base(root, f"{name}-base", flavor, sharded, base_tok)),
                        "tokenizer_strategy": strategy}
        if strategy != "replace":  # shards of its own tokenizer
            raw["data"]["shards_dir"] = str(root / f"shards-{name}")
            raw["tokenizer"] = {} if strategy == "keep" else {"path": str(root / f"tokenizer-{name}"), "train": True}
            if strategy == "extend":
                raw["model"]["extend_tokens"] = EXTEND_TOKENS
            cfg = parse_config(raw)
            run_prepare(cfg.tokenizer, cfg.data, progress=False)
        raw["zero"] = {"stage": stage}
        raw["checkpoint"] = {"every_steps": 2, "keep_last": 2}
        raw["eval"] = {"every_steps": 0, "max_samples": 4}
        out = root / name
        out.mkdir()
        config = write_config(out / "config.yaml", raw)
        jobs.append([str(config), str(out / "straight"), str(out / "split"), str(out / "logits.pt")])
        dirs[name] = out
    torchrun(str(REPO / "tests" / "dist" / "train_families.py"), json.dumps(jobs))
    return dirs


@pytest.mark.parametrize("name", list(RUNS))
def test_each_family_warm_starts_trains_resumes_and_exports(family_runs, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.export import export

    flavor, _, _, strategy = RUNS[name]
    run = family_runs[name]
    resolved = parse_config(yaml.safe_load((run / "split" / "config.yaml").read_text(encoding="utf-8")))
    assert FLAVORS[resolved.model.flavor].arch == FLAVORS[flavor].arch  # the base's family, from its config.json
    if strategy == "keep":
        assert not (run / "straight" / "transplant.json").exists()
        assert resolved.model_vocab_size == BASE_VOCAB
        saved = run / "split" / "checkpoints" / "step00000003" / "tokenizer"  # the base dir's tokenizer, not its weights
        assert (saved / "tokenizer.json").is_file() and not list(saved.glob("*.safetensors"))
    else:
        report = json.loads((run / "straight" / "transplant.json").read_text())
        if strategy == "extend":  # every base token copied (3 specials mapped), the new ones averaged
            assert (report["copied"], report["special"], report["averaged"]) == (BASE_VOCAB - 3, 3, EXTEND_TOKENS)
            assert resolved.model_vocab_size == BASE_VOCAB + EXTEND_TOKENS
        else:  # strings found in the base's vocabulary
            assert report["copied"] > 100 and report["averaged"] > 0, report
    straight, split = read_jsonl(run / "straight" / "metrics.jsonl"), read_jsonl(run / "split" / "metrics.jsonl")
    assert [m["step"] for m in split] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in split] == [m[key] for m in straight], key
    out = export(run / "split", tmp_path / "hf", dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.config.model_type == FLAVORS[flavor].arch
    assert model.config.tie_word_embeddings == (model.lm_head.weight is model.get_input_embeddings().weight)
    ref = torch.load(run / "logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=ref["inputs"]).logits
    assert torch.max(torch.abs(logits - ref["logits"])).item() <= 1e-5
