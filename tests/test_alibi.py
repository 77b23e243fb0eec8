"""BLOOM's fused ALiBi attention (training.model.alibi) against transformers' eager BLOOM, fp32 on CPU:
logits and gradients, packed documents against each document alone, the paths that must stay
transformers' own (a KV cache, a padding mask, attention probabilities), no per-layer T × T
scores, and the trainer choosing it under ``auto``. FlexAttention has no CPU backward, so its
path is held in forward here (unfused on CPU; the GPU check runs it compiled)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.batch import Batch, document_ids
from training.model.alibi import flex_block_mask, install_alibi_attention
from training.model.build import SpecialIds, build_model, hf_config
from training.model.kernels import install_chunked_loss
from training.model.loss import causal_lm_loss, model_inputs

VOCAB, EOS = 300, 2
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def tiny_bloom(**overrides) -> torch.nn.Module:
    return build_model(hf_config("tiny-bloom", overrides, VOCAB, SpecialIds(1, EOS, 0)), seed=0)


def fused(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    out = copy.deepcopy(model)
    install_alibi_attention(out, kind)
    return out


def tokens(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def assert_grads_close(a: torch.nn.Module, b: torch.nn.Module, rel: float = 1e-5) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        scale = max(1.0, pa.grad.abs().max().item())
        assert (pa.grad - pb.grad).abs().max().item() <= rel * scale, name


@pytest.mark.parametrize("seq_len", [77, 130])  # not a multiple of flex's 128-token blocks
def test_sdpa_path_matches_hf_eager_logits_and_gradients(seq_len):
    eager = tiny_bloom(n_head=8, hidden_size=128)  # 8 heads: eight different slopes
    sdpa = fused(eager, "sdpa")
    x = tokens(3, seq_len)
    a = eager(input_ids=x, use_cache=False).logits
    b = sdpa(input_ids=x, use_cache=False).logits
    assert (a - b).abs().max().item() <= 1e-5
    (a.square().mean()).backward()
    (b.square().mean()).backward()
    assert_grads_close(eager, sdpa)


def test_sdpa_path_with_activation_checkpointing_and_fused_loss_matches_hf_eager():
    """The trainer's levers together: every layer is recomputed in backward with the mask it got
    in forward, and the chunked loss calls the base model directly."""
    eager = tiny_bloom()
    sdpa = fused(eager, "sdpa")
    install_chunked_loss(sdpa, chunk_tokens=50)
    if hasattr(sdpa, "activation_checkpointing_enable"):  # transformers ≥ 5.2, as the trainer does
        sdpa.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        sdpa.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sdpa.train()
    assert all(block.gradient_checkpointing for block in sdpa.transformer.h)
    x = tokens(2, 65)
    want = F.cross_entropy(eager(input_ids=x[:, :-1], use_cache=False).logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    got = causal_lm_loss(sdpa, Batch(x[:, :-1], x[:, 1:]))
    assert abs(got.item() - want.item()) <= 1e-6
    want.backward()
    got.backward()
    assert_grads_close(eager, sdpa)


def test_flex_path_matches_hf_eager_logits():
    eager = tiny_bloom(n_head=8, hidden_size=128)
    flex = fused(eager, "flex_attention")
    x = tokens(2, 77)
    with torch.no_grad():
        a = eager(input_ids=x, use_cache=False).logits
        b = flex(input_ids=x, use_cache=False).logits
    assert (a - b).abs().max().item() <= 1e-5


def packed_window(seed: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One row of three EOS-ended documents (lengths 9, 60, 17: 86 tokens), the documents alone."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(3, VOCAB, (n - 1,), generator=gen), torch.tensor([EOS])]) for n in (9, 60, 17)]
    return torch.cat(docs)[None], docs


@pytest.mark.parametrize("kind", ["sdpa", "flex_attention"])
def test_packed_documents_get_the_logits_they_get_alone(kind):
    eager = tiny_bloom()
    model = fused(eager, kind)
    window, docs = packed_window()
    other = tokens(1, window.size(1), seed=5)  # a row holding one document
    x = torch.cat([window, other])
    with torch.no_grad():
        packed = model(**model_inputs(x, document_ids(x, EOS))).logits
        alone = torch.cat([eager(input_ids=d[None], use_cache=False).logits[0] for d in docs])
        whole = eager(input_ids=other, use_cache=False).logits[0]
        unmasked = model(input_ids=x, use_cache=False).logits
    assert (packed[0] - alone).abs().max().item() <= 1e-5
    assert (packed[1] - whole).abs().max().item() <= 1e-5
    assert (unmasked[0, 9:] - packed[0, 9:]).abs().max().item() > 1e-3  # the document mask is really applied
    # HF's own BLOOM takes position ids and ignores them: why eager is refused with document masks
    ignored = eager(**model_inputs(x, document_ids(x, EOS))).logits
    assert (ignored[0, 9:] - alone[9:]).abs().max().item() > 1e-3


def test_packed_documents_train_as_if_alone():
    """The SDPA path's loss and gradients on a packed row (the fused loss, through the base model)
    equal those of the documents run one by one through HF's eager BLOOM."""
    eager = tiny_bloom()
    sdpa = fused(eager, "sdpa")
    install_chunked_loss(sdpa, chunk_tokens=4096)
    window, docs = packed_window()
    inputs, targets = window[:, :-1], window[:, 1:]
    got = causal_lm_loss(sdpa, Batch(inputs, targets, document_ids(inputs, EOS)))
    # each document predicts its tokens after the first; the EOS ending one predicts the next's first
    pieces, start = [], 0
    for d in docs:
        stop = min(start + len(d), inputs.size(1))
        pieces.append(eager(input_ids=inputs[:, start:stop], use_cache=False).logits[0])
        start = stop
    want = F.cross_entropy(torch.cat(pieces), targets[0])
    assert abs(got.item() - want.item()) <= 1e-6
    got.backward()
    want.backward()
    assert_grads_close(eager, sdpa)


def test_cache_padding_mask_and_attention_probabilities_stay_transformers_bloom():
    """What the fused path does not serve goes to HF's own forward, unchanged: generation with a
    KV cache, a 2D padding mask, output_attentions; the weights and their names are untouched."""
    eager = tiny_bloom().eval()
    model = fused(eager, "sdpa").eval()
    assert list(model.state_dict()) == list(eager.state_dict())
    prompt = tokens(2, 7)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        a = eager.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
        b = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True)
        padded = [m(input_ids=prompt, attention_mask=mask).logits for m in (eager, model)]
        probs = model(input_ids=prompt, output_attentions=True, use_cache=False).attentions
    assert torch.equal(a, b)
    assert torch.equal(padded[0], padded[1])
    assert len(probs) == 2 and probs[0].shape == (2, 4, 7, 7)


def test_fused_path_keeps_no_per_layer_scores_and_runs_no_eager_attention(monkeypatch):
    """Eager BLOOM keeps (B, H, T, T) probabilities for backward in every layer; the SDPA path
    keeps the one bias all layers share. Neither fused path calls the eager ``baddbmm`` scores,
    and the flex path gets a BlockMask, no dense mask."""
    eager = tiny_bloom()
    layers = eager.config.n_layer
    seq_len = 48  # not the hidden size (64), so (…, T, T) is only ever attention
    x = tokens(2, seq_len)

    def big_saved(model) -> int:
        """Distinct storages of (…, T, T) tensors saved for backward."""
        seen: set[int] = set()

        def pack(t):
            if tuple(t.shape[-2:]) == (seq_len, seq_len):
                seen.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, use_cache=False).logits.sum().backward()
        return len(seen)

    calls = {"baddbmm": 0, "flex_masks": []}
    baddbmm = torch.Tensor.baddbmm

    def counted_baddbmm(*a, **k):
        calls["baddbmm"] += 1
        return baddbmm(*a, **k)

    monkeypatch.setattr(torch.Tensor, "baddbmm", counted_baddbmm)
    assert big_saved(eager) >= layers and calls["baddbmm"] == layers
    calls["baddbmm"] = 0
    assert big_saved(fused(eager, "sdpa")) == 1 and calls["baddbmm"] == 0

    import training.model.alibi as alibi

    real_flex = alibi._flex

    def spy_flex(q, k, v, score_mod, block_mask, *rest):
        calls["flex_masks"].append(type(block_mask).__name__)
        return real_flex(q, k, v, score_mod, block_mask, *rest)

    monkeypatch.setattr(alibi, "_flex", spy_flex)
    with torch.no_grad():
        fused(eager, "flex_attention")(input_ids=x, use_cache=False)
    assert calls["flex_masks"] == ["BlockMask"] * layers and calls["baddbmm"] == 0


def test_flex_block_mask_is_causal_within_documents():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    from torch.nn.attention.flex_attention import create_mask

    mask = flex_block_mask(9, doc_ids, torch.device("cpu"))

    got = create_mask(mask.mask_mod, 1, None, 9, 9, device="cpu")[0, 0]
    q = torch.arange(9)
    want = (q[:, None] >= q[None, :]) & (doc_ids[0][:, None] == doc_ids[0][None, :])
    assert torch.equal(got, want)


def test_install_refuses_what_it_cannot_compute_exactly():
    from norallm.errors import NorallmError

    with pytest.raises(NorallmError, match="attention_dropout"):
        install_alibi_attention(tiny_bloom(attention_dropout=0.1), "flex_attention")
    with pytest.raises(NorallmError, match="slow_but_exact"):
        install_alibi_attention(tiny_bloom(pretraining_tp=2, slow_but_exact=True), "sdpa")
    model = tiny_bloom(attention_dropout=0.1)
    install_alibi_attention(model, "sdpa")  # SDPA's dropout_p serves it
    with pytest.raises(ValueError, match="installed already"):
        install_alibi_attention(model, "sdpa")


def bloom_config(tmp_path, documents: bool = True, **model):
    from test_training import tiny_config

    from training.config import parse_config

    raw = tiny_config(tmp_path)
    raw["model"] = {"flavor": "tiny-bloom", **model}
    raw["data"]["document_boundaries"] = documents  # allowed for BLOOM now that documents are masked
    return parse_config(raw)


def test_trainer_trains_bloom_with_the_fused_path_under_auto(tmp_path):
    from types import SimpleNamespace

    from training.config import ConfigError
    from training.loop.setup import attention_implementation, build_training_model

    cfg = bloom_config(tmp_path)
    assert cfg.model.attn_implementation == "auto"
    assert attention_implementation(cfg, on_gpu=False) == "sdpa"
    assert attention_implementation(cfg, on_gpu=True) == "flex_attention"
    dropout = bloom_config(tmp_path, overrides={"attention_dropout": 0.1})
    assert attention_implementation(dropout, on_gpu=True) == "sdpa"  # flex has no attention dropout
    assert attention_implementation(bloom_config(tmp_path, False, attn_implementation="eager"), True) == "eager"
    with pytest.raises(ConfigError, match="FlexAttention backward on CPU"):
        attention_implementation(bloom_config(tmp_path, attn_implementation="flex_attention"), on_gpu=False)
    tok = SimpleNamespace(bos_id=1, eos_id=EOS, pad_id=0)
    model = build_training_model(cfg, tok, tmp_path / "run", rank=0)
    assert model.transformer.norallm_attention == "sdpa"
    assert model.config._attn_implementation == "eager"  # the config (and so the export) is HF's BLOOM
    reference = build_model(hf_config("tiny-bloom", {}, cfg.model_vocab_size, SpecialIds(1, EOS, 0)), cfg.seed)
    x = tokens(2, 40)
    with torch.no_grad():
        want = reference(input_ids=x, use_cache=False).logits
        got = model(input_ids=x, use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_config_allows_bloom_packing_except_with_eager_attention(tmp_path):
    """SFT (packed conversations) trains BLOOM with the fused path; eager BLOOM would let them see
    each other. flash_attention_2 is no BLOOM path, and flex has no attention dropout. (Document
    boundaries: tests/test_packing.py.)"""
    from test_training import tiny_config

    from training.config import ConfigError, parse_config

    raw = {**tiny_config(tmp_path), "model": {"flavor": "tiny-bloom"}, "sft": {}}
    assert parse_config(raw).sft is not None
    raw["model"] = {"flavor": "tiny-bloom", "attn_implementation": "eager"}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    got = dict(e.value.problems)
    assert list(got) == ["sft"] and "ignores position ids" in got["sft"]
    raw = tiny_config(tmp_path)
    raw["model"] = {"flavor": "tiny-bloom", "attn_implementation": "flash_attention_2"}
    with pytest.raises(ConfigError, match="not flash_attention_2"):
        parse_config(raw)
    raw["model"] = {"flavor": "tiny-bloom", "attn_implementation": "flex_attention",
                    "overrides": {"attention_dropout": 0.1}}
    with pytest.raises(ConfigError, match="no attention dropout"):
        parse_config(raw)
