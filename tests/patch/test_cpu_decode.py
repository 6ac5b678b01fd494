"""The CPU decode fast path of a patched LoRA layer (fastlora.patch.lora._cpu_decode):
bit-identical to the general path, and it notices every change that alters the result."""
import pytest
import torch

import fastlora
from fastlora.patch import lora as patch_lora
from tests.helpers import requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb


def _both(model, x, monkeypatch):
    """(fast, general) logits of a no-grad forward."""
    with torch.no_grad():
        fast = model(x).logits
        with monkeypatch.context() as m:
            m.setattr(patch_lora, "_cpu_decode", lambda self, st, x: None)
            general = model(x).logits
    return fast, general


@pytest.fixture
def model(saved_models):
    from fastlora.ops import nf4_gemv

    if not nf4_gemv._kernel_built():
        pytest.fail("the C++ extension (fastlora._C) is not built: the decode kernel cannot be tested")
    m = tiny.load_qlora(saved_models("llama"))
    fastlora.patch(m)
    m.eval()
    return m


def _calls(monkeypatch):
    hits = []
    orig = patch_lora._cpu_decode

    def spy(self, st, x):
        out = orig(self, st, x)
        hits.append(out is not None)
        return out

    monkeypatch.setattr(patch_lora, "_cpu_decode", spy)
    return hits


def test_fast_path_is_bit_identical_and_used(model, monkeypatch):
    x = torch.randint(3, tiny.VOCAB, (3, 1))  # a decode step: 3 rows, 1 token
    hits = _calls(monkeypatch)
    with torch.no_grad():
        fast = model(x).logits
    assert hits and all(hits), "the decode calls did not take the fast path"
    monkeypatch.undo()
    fast2, general = _both(model, x, monkeypatch)
    assert torch.equal(fast, general) and torch.equal(fast2, general)


def test_fast_path_follows_changes(model, monkeypatch):
    """Every change a caller can make between two decode steps reaches the output."""
    from peft import LoraConfig

    x = torch.randint(3, tiny.VOCAB, (2, 1))
    fast, general = _both(model, x, monkeypatch)
    assert torch.equal(fast, general)
    before = fast.clone()
    # 1. the adapter's weights change in place (an optimizer step between rollouts)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(1.5)
    fast, general = _both(model, x, monkeypatch)
    assert torch.equal(fast, general) and not torch.equal(fast, before)
    # 2. another adapter becomes active (the PPO roles), then the first one again
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    fastlora.patch(model)
    model.set_adapter("other")
    fast_o, general_o = _both(model, x, monkeypatch)
    assert torch.equal(fast_o, general_o) and not torch.equal(fast_o, fast)
    model.set_adapter("default")
    again, _ = _both(model, x, monkeypatch)
    assert torch.equal(again, fast)
    # 3. adapters off: the base model's output
    with model.disable_adapter():
        off, general_off = _both(model, x, monkeypatch)
    assert torch.equal(off, general_off) and not torch.equal(off, fast)
    assert torch.equal(_both(model, x, monkeypatch)[0], fast)  # on again (and the plan is fresh)
    # 4. the scaling changes (PEFT's set_scale)
    for m in model.modules():
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling:
            m.scaling["default"] = m.scaling["default"] * 0.5
    half, general_half = _both(model, x, monkeypatch)
    assert torch.equal(half, general_half) and not torch.equal(half, fast)
    # 5. a forced backend wins: the reference path, not the kernel
    hits = _calls(monkeypatch)
    with fastlora.use_backend("reference"), torch.no_grad():
        model(x)
    assert hits and not any(hits)


def test_training_and_prefill_calls_take_the_general_path(model, monkeypatch):
    hits = _calls(monkeypatch)
    x = torch.randint(3, tiny.VOCAB, (2, 40))  # 80 rows: a prefill, not a decode step
    with torch.no_grad():
        model(x)
    model.train()
    model(torch.randint(3, tiny.VOCAB, (2, 1))).logits.sum().backward()  # grad enabled
    assert not any(hits)
