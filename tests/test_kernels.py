"""The speed levers compute the same thing as the plain path (CPU here; the GPU benchmark checks
them again on the card): chunked LM head + cross-entropy, the liger fallback, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from training.model.build import SpecialIds, build_model, hf_config
from training.model.families import FLAVORS
from training.model.kernels import apply_liger, chunked_cross_entropy, install_chunked_loss

TINY = sorted(name for name in FLAVORS if name.startswith("tiny-"))


def plain_loss(model, inputs, targets):
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("flavor", TINY)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_chunked_loss_matches_plain_loss_and_gradients(flavor, dtype, tol):
    plain = build_model(hf_config(flavor, {}, 300, SpecialIds(1, 2, 0)), seed=0).to(dtype)
    fused = copy.deepcopy(plain)
    install_chunked_loss(fused, chunk_tokens=7)  # chunks cross row borders
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (3, 33), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :5] = -100  # masked targets, as in SFT
    a = plain_loss(plain, inputs, targets)
    b = fused(input_ids=inputs, targets=targets).loss
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    for (name, pa), pb in zip(plain.named_parameters(), fused.parameters(), strict=True):
        scale = pa.grad.abs().max().item() + 1e-12
        assert (pa.grad.float() - pb.grad.float()).abs().max().item() <= tol * max(1.0, scale) * 5, name
    # Without targets the model is unchanged: logits for generation, eval and export.
    torch.testing.assert_close(fused(input_ids=inputs).logits, plain(input_ids=inputs).logits)


@pytest.mark.parametrize("flavor", TINY)
def test_chunked_loss_is_the_familys_own_loss_at_large_logits(flavor):
    """The family's own ``labels=`` loss is the reference, at an init whose logits reach Gemma-2's
    final soft cap (30): a chunked loss of the uncapped head trains another model."""
    model = build_model(hf_config(flavor, {}, 300, SpecialIds(1, 2, 0)), seed=0, std=0.5)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=tokens, labels=tokens).loss
        assert model(input_ids=tokens).logits.abs().max() > 10  # the cap binds (Gemma-2's is 30)
        install_chunked_loss(model, chunk_tokens=16)
        targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
        fused = model(input_ids=tokens, targets=targets).loss
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_never_holds_all_logits():
    """Peak extra memory is one chunk of logits, not (tokens × vocab): measured with saved tensors."""
    head = torch.nn.Linear(16, 5000, bias=False)
    hidden = torch.randn(1, 512, 16, requires_grad=True)
    targets = torch.randint(0, 5000, (1, 512))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(hidden, head, targets, chunk_tokens=64)
    loss.backward()
    assert max(saved) < 512 * 5000 // 4, max(saved)  # nothing near the full logits is kept
    ref = F.cross_entropy(head(hidden.detach()).reshape(-1, 5000), targets.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_liger_falls_back_to_the_transformers_modules_on_cpu():
    model = build_model(hf_config("tiny-mistral", {}, 300, SpecialIds(1, 2, 0)), seed=0)
    before = {n: type(m) for n, m in model.named_modules()}
    lines: list[str] = []
    assert apply_liger(model, log=lines.append) is False
    assert lines and "keeping the transformers modules" in lines[0]
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = build_model(hf_config("tiny-mistral", {}, 300, SpecialIds(1, 2, 0)), seed=0)
    compiled = torch.compile(copy.deepcopy(model))
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    a = plain_loss(model, tokens[:, :-1], tokens[:, 1:])
    b = plain_loss(compiled, tokens[:, :-1], tokens[:, 1:])
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for pa, pb in zip(model.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5)
