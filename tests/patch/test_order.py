"""patch in any order, next to forwards other libraries install, and PEFT's numerics
under autocast and with adapters narrower than the compute dtype (no TRL needed)."""
import types

import pytest
import torch

import fastlora
from fastlora.patch import unpatch
from tests.helpers import requires_bnb
from tests.patch import tiny
from tests.patch.test_patch import loss_and_grads

pytestmark = requires_bnb


def _library_head(lm):
    """Install a forward the way TRL's add_fused_lm_head does: an instance attribute
    wrapping whatever forward was there, with a contract of its own (``extra``)."""
    inner = lm.forward

    def library_forward(self, *args, library_flag=False, **kwargs):
        out = inner(*args, **kwargs)
        out["extra"] = "library"
        return out

    lm.forward = types.MethodType(library_forward, lm)
    return lm.forward


def test_a_forward_installed_before_patch_is_kept_and_restored(saved_models):
    pat = tiny.load_qlora(saved_models("llama"))
    lm = pat.get_base_model()
    theirs = _library_head(lm)
    report = fastlora.patch(pat)
    assert report.ok and report.patched["causal-lm head+loss"] == 0
    n, why = report.kept["causal-LM head"]
    assert n == 1 and "library_forward" in why and "kept as is" in why
    assert lm.__dict__["forward"] is theirs  # not wrapped
    pat.train()
    assert pat(**tiny.batch(), library_flag=True)["extra"] == "library"  # its contract holds
    assert unpatch(pat) == 7 * tiny.LAYERS + 1  # and the decoder (shared prefixes)
    assert lm.__dict__["forward"] is theirs


def test_a_forward_installed_after_patch_survives_unpatch(saved_models):
    path = saved_models("llama")
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    fastlora.patch(pat)
    lm = pat.get_base_model()
    theirs = _library_head(lm)  # wraps fastlora's head
    again = fastlora.patch(pat)  # a second call describes the model as it is now
    assert again.already_patched and again.patched["causal-lm head+loss"] == 0
    assert "installed over fastlora's head" in again.kept["causal-LM head"][1]
    assert unpatch(pat) == 2 + 7 * tiny.LAYERS  # head, decoder, LoRA layers
    assert lm.__dict__["forward"] is theirs  # theirs stays; ours, inside it, is detached
    b = tiny.batch()
    pat.train(), ref.train()
    out = pat(**b)
    assert out["extra"] == "library" and out.logits is not None  # the original forward runs inside
    assert torch.equal(out.loss, ref(**b).loss)


def test_patch_before_lora_is_added_is_loud_and_a_second_call_fuses_it(saved_models):
    from peft import get_peft_model

    path = saved_models("llama")
    base = tiny.load_4bit(path)
    with pytest.warns(UserWarning, match="accelerated no LoRA layer"):
        early = fastlora.patch(base)
    assert not early.ok and early.fallbacks[0].kind == "lora" and "patch(model) again" in early.fallbacks[0].reason
    torch.manual_seed(1)
    pat = get_peft_model(base, tiny.lora_config())
    later = fastlora.patch(pat)
    assert later.ok and later.already_patched and later.patched["lora/bnb-nf4"] == 7 * tiny.LAYERS
    ref = tiny.load_qlora(path)
    from tests.patch.test_patch import assert_same_step

    assert_same_step(ref, pat, tiny.batch())


def test_nothing_to_accelerate_is_not_ok():
    with pytest.warns(UserWarning, match="accelerated nothing"):
        report = fastlora.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert not report.ok and report.nothing_accelerated
    assert str(report).startswith("fastlora.patch: NOTHING TO ACCELERATE")


@pytest.mark.parametrize("case", ["autocast-fp32-model", "bf16-adapters"])  # both at once: test_trl.py
def test_peft_numerics_are_kept_bit_for_bit(saved_models, case):
    """Under bf16 autocast with an fp32 model, and with TRL-style bf16 adapters on an fp32
    model, the patched layer returns PEFT's dtype and rounding: loss and grads equal.

    The head is left unfused here (``loss=False``, as under TRL, whose fused head stays):
    fastlora's fused loss sums the hidden-state gradient in another order (fp32 last
    bits), which bf16 adapters' gradient casts then round to bf16-sized differences."""
    path = saved_models("qwen2")  # biases too
    ref, pat = tiny.load_qlora(path), tiny.load_qlora(path)
    if "adapters" in case:
        for m in (ref, pat):
            for p in m.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    fastlora.patch(pat, loss=False)
    layer_ref = ref.get_base_model().model.layers[0].self_attn.q_proj
    layer_pat = pat.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, tiny.HIDDEN)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in case)
    with autocast:
        y_ref, y_pat = layer_ref(x), layer_pat(x)
    assert y_pat.dtype == y_ref.dtype and torch.equal(y_pat, y_ref)
    b = tiny.batch()
    with autocast:
        l_ref, l_pat = loss_and_grads(ref, b), loss_and_grads(pat, b)
    assert torch.equal(l_pat, l_ref)
    g_ref, g_pat = tiny.lora_grads(ref), tiny.lora_grads(pat)
    assert all(torch.equal(g_pat[n], g_ref[n]) for n in g_ref)
