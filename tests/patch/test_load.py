"""fastlora.load: local weights -> 4-bit NF4 + PEFT LoRA + patch, never the network."""
import pytest
import torch

import fastlora
from tests.helpers import requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("load") / "tiny-llama"
    tiny.save_random("llama", path)
    words = ["[UNK]", "[PAD]", "<s>", "</s>"] + [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return path


def test_load_gives_patched_4bit_lora_model(model_dir):
    from bitsandbytes.nn import Linear4bit

    model, tok, report = fastlora.load(model_dir, lora={"r": 4, "lora_dropout": 0.0})
    assert report.ok and report.patched["lora/bnb-nf4"] == 7 * tiny.LAYERS
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * tiny.LAYERS
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    assert all(m.compute_dtype == torch.float32 and not m.support_avx512bf16_for_cpu for m in layers)
    assert {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n} == {4}
    ids = tok(["w1 w2 w3 w4 w5", "w9 w8 w7 w6 w5"], return_tensors="pt").input_ids
    assert ids.shape == (2, 5)
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_load_defaults_and_no_patch(model_dir):
    model, tok, report = fastlora.load(model_dir, tokenizer=False)
    assert tok is None and report.ok
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    assert layer.r["default"] == 16 and layer.scaling["default"] == 2.0
    assert layer.lora_dropout["default"].p == 0.05
    plain, _, none = fastlora.load(model_dir, lora=False, patch=False, tokenizer=False)
    assert none is None and not any("lora_" in n for n, _ in plain.named_parameters())


def test_load_bad_inputs_name_the_problem(model_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        fastlora.load(missing)
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        fastlora.load(model_dir, gguf_file="model.gguf")
    with pytest.raises(TypeError, match="lora must be"):
        fastlora.load(model_dir, lora=123, tokenizer=False)
