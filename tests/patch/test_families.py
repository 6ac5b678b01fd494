"""Patched vs unpatched QLoRA models of several families, fp32 compute on CPU.

The unpatched model is the oracle: transformers + bitsandbytes NF4 + PEFT as users run
them. Both are loaded from the same saved weights with the same random adapters.
"""
import pytest
import torch

import fastlora
from tests.helpers import assert_close, requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb

FAMILIES = list(tiny.FAMILIES)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_grads_match(ref, pat, tol=1e-5):  # fp32: measured <= 8e-7
    g_ref, g_pat = tiny.lora_grads(ref), tiny.lora_grads(pat)
    assert set(g_ref) == set(g_pat) and len(g_ref) == len(tiny.trainable(ref)), "every LoRA weight has a grad"
    for name in g_ref:
        assert g_ref[name].abs().max() > 0, f"{name}: zero gradient, the test would be vacuous"
        err = rel_err(g_pat[name], g_ref[name])
        assert err <= tol, f"{name}: relative gradient error {err:.2e} > {tol}"


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_lora_grad_match(saved_models, family):
    path = saved_models(family)
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    report = fastlora.patch(pat)
    assert report.ok, str(report)
    n_lora = 7 * tiny.LAYERS  # q k v o gate up down
    assert report.patched["lora/bnb-nf4"] == n_lora
    assert report.patched["causal-lm head+loss"] == 1
    assert report.protected == n_lora
    b = tiny.batch()
    ref.train(), pat.train()
    out_ref, out_pat = ref(**b), pat(**b)
    assert out_pat.logits is None  # never materialized on the training path
    assert_close(out_pat.loss, out_ref.loss, rtol=1e-5, atol=0)
    out_ref.loss.backward()
    out_pat.loss.backward()
    assert_grads_match(ref, pat)


@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_curve_matches(saved_models, family):
    path = saved_models(family)
    curves = []
    for do_patch in (False, True):
        model = tiny.load_qlora(path)
        if do_patch:
            assert fastlora.patch(model).ok
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        for step in range(20):
            loss = model(**tiny.batch(seed=step % 4)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    ref, pat = curves
    assert ref[-4:].mean() < ref[:4].mean() - 0.05, "the run must actually learn"
    assert_close(pat, ref, rtol=1e-4, atol=0)  # 20 AdamW steps compound rounding; one step is 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_eval_logits_unchanged(saved_models, family):
    path = saved_models(family)
    ref, head_only, full = (tiny.load_qlora(path) for _ in range(3))
    fastlora.patch(head_only, lora=False)
    fastlora.patch(full)
    b = tiny.batch()
    ids = b["input_ids"]
    for m in (ref, head_only, full):
        m.eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        # the head path is the model's own in eval: bit-identical
        assert torch.equal(head_only(input_ids=ids).logits, want)
        # LoRA layers run lora_linear: equal up to fp32 rounding
        assert_close(full(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        # eval with labels keeps the original forward too: loss and logits
        out_ref, out = ref(**b), full(**b)
    assert out.logits is not None
    assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=0)
    for m in (ref, head_only, full):
        for layer in m.modules():
            qs = getattr(getattr(layer, "weight", None), "quant_state", None)
            assert not getattr(qs, "packing_format_for_cpu", False)
