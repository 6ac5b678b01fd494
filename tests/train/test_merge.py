"""fastlora merge: the merged 16-bit model reproduces the 4-bit + adapter model, because the
delta is merged into the dequantized NF4 weights (not the original ones, not re-quantized)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, requires_bnb

pytestmark = requires_bnb


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    from fastlora.train.checkpoint import save_adapter
    from fastlora.train.model import add_lora, load_base

    base = load_base(tiny_model_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    # Not every linear layer: the untargeted NF4 layers must be dequantized as well.
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)  # stands in for training: a delta far from zero
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, out)
    x = torch.randint(0, 2000, (2, 11))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=x).logits.double()
        with model.disable_adapter():
            no_delta = model(input_ids=x).logits.double()
    return out, x, ref, no_delta


def _logits(path, x):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert not hasattr(m.config, "quantization_config")
    with torch.no_grad():
        return m(input_ids=x).logits.double()


def test_merged_float32_matches_4bit_plus_adapter(trained_adapter, tiny_model_dir, tmp_path):
    from fastlora.train import merge

    adapter, x, ref, no_delta = trained_adapter
    out = merge(adapter, tmp_path / "m32", model=tiny_model_dir, dtype="float32")
    got = _logits(out, x)
    assert (ref - no_delta).abs().max() > 1e-2  # the adapter changes the output measurably
    assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_merged_bf16_is_close_and_uses_the_adapters_base(trained_adapter, tiny_model_dir, tmp_path):
    """Default dtype bf16, base taken from adapter_config.json. Merging into the ORIGINAL
    weights would be off by the NF4 quantization error; check we are much closer than that."""
    from transformers import AutoModelForCausalLM

    from fastlora.train import merge

    adapter, x, ref, _ = trained_adapter
    out = merge(adapter, tmp_path / "m16")
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.dtype == torch.bfloat16
    with torch.no_grad():
        got = m.float()(input_ids=x).logits.double()
    err = (got - ref).abs().max()
    # The same adapter on the unquantized base: what merging into the original weights gives.
    from peft import PeftModel

    orig = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        wrong = PeftModel.from_pretrained(orig, str(adapter)).eval()(input_ids=x).logits.double()
    wrong_err = (wrong - ref).abs().max()
    assert err < 0.25 * wrong_err, (float(err), float(wrong_err))
    assert_close(got, ref, rtol=3e-2, atol=3e-2)


def test_merge_refuses_bad_input(trained_adapter, tmp_path):
    from fastlora.train import merge

    adapter, *_ = trained_adapter
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge(tmp_path / "nothing", tmp_path / "o1")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not empty"):
        merge(adapter, busy)
    assert (busy / "keep.txt").read_text() == "precious"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        merge(adapter, tmp_path / "o2", model=tmp_path / "no_such_model")
    assert not (tmp_path / "o2").exists()
