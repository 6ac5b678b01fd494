"""Every ``--peft`` method on a tiny 4-bit model: it trains a few steps, the patch report
says honestly what runs fused and what runs its own forward, the trained weights save,
reload into a fresh base and give the same logits, and merge refuses what it cannot fold."""
from __future__ import annotations

import json

import pytest
import torch

import fastlora
from fastlora.train import peft_methods as pm
from tests.helpers import assert_close, requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb

N_LINEAR = 7 * tiny.LAYERS


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_tiny")
    return {f: tiny.save_random(f, root / f) for f in ("llama", "qwen2")}


def _build(path, method):
    torch.manual_seed(3)
    model, info = pm.add_peft(tiny.load_4bit(path), method, r=4, alpha=8, num_virtual_tokens=4, adapter_dim=8,
                              log=lambda msg: None)
    return model, info


def _expect_report(method, report):
    """What the report must say per method (the patch report is honest for every method)."""
    head = report.patched["causal-lm head+loss"]
    if method == "lora":
        assert report.ok and report.patched["lora/bnb-nf4"] == N_LINEAR and head == 1, str(report)
    elif method == "dora":  # no exact fused DoRA: every layer falls back to PEFT's forward, said so
        assert not report.ok and len(report.fallbacks) == N_LINEAR
        assert all("DoRA" in f.reason for f in report.fallbacks)
    else:
        assert report.ok and head == 1 and report.patched["lora/bnb-nf4"] == 0, str(report)
        kept = {
            "ia3": "PEFT Linear4bit",  # PEFT's IA3 layer over bnb 4-bit
            "prefix": "PEFT prefix_tuning",
            "prompt": "PEFT prompt_tuning",
            "adapter": "BottleneckAdapter",
            "bitfit": "BitFit biases",
            "ln": "PEFT LNTuningLayer",
        }[method]
        assert kept in report.kept, str(report)
        assert "own forward" in report.kept[kept][1]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method,family", [
    ("lora", "llama"), ("dora", "llama"), ("ia3", "llama"), ("prefix", "llama"), ("prompt", "llama"),
    ("adapter", "llama"), ("bitfit", "llama"), ("bitfit", "qwen2"),
])
def test_method_trains_saves_reloads(tiny_dirs, tmp_path, method, family):
    path = tiny_dirs[family]
    model, info = _build(path, method)
    used = info["method_used"]
    if method == "bitfit":  # llama has no biases: LN tuning instead, said so; qwen2 has q/k/v biases
        assert used == ("ln" if family == "llama" else "bitfit")
        assert bool(info["notes"]) == (family == "llama")
    assert 0 < info["trainable"] < info["total"] and 0 < info["trainable_percent"] < 100
    _expect_report(used, fastlora.patch(model))

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    b = tiny.batch()
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(not torch.equal(p, q) for p, q in zip(params, before)), "every trainable tensor moved"

    model.eval()  # generation through the patched model (transformers checks its forward's signature)
    with torch.no_grad():
        gen = model.generate(input_ids=b["input_ids"][:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long),
                             max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert gen.shape[-1] == 8

    out = tmp_path / "adapter"
    pm.save_trainable(model, out)
    ids = b["input_ids"][:1]
    want = _logits(model, ids)
    reloaded = pm.load_trainable(tiny.load_4bit(path), out)
    assert_close(_logits(reloaded, ids), want, rtol=1e-5, atol=1e-5)

    refusal = pm.merge_refusal(*_saved_kind(out))
    assert (refusal is None) == (used == "lora"), refusal


def _saved_kind(out):
    if pm.is_own_adapter_dir(out):
        return (json.loads((out / pm.CONFIG_FILE).read_text())["method"],)
    cfg = json.loads((out / "adapter_config.json").read_text())
    return cfg["peft_type"], bool(cfg.get("use_dora", False))


def test_merge_refuses_what_it_cannot_fold(tmp_path):
    from fastlora.train.merge import merge

    for name, files in {
        "prefix": {"adapter_config.json": {"peft_type": "PREFIX_TUNING"}, "adapter_model.safetensors": None},
        "dora": {"adapter_config.json": {"peft_type": "LORA", "use_dora": True}, "adapter_model.safetensors": None},
        "adapter": {pm.CONFIG_FILE: {"method": "adapter"}},
    }.items():
        d = tmp_path / name
        d.mkdir()
        for f, content in files.items():
            (d / f).write_text(json.dumps(content) if content is not None else "")
        with pytest.raises(ValueError, match="cannot merge"):
            merge(d, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()


def test_unknown_method_is_refused_at_the_boundary():
    from fastlora.train.config import SFTConfig

    with pytest.raises(ValueError, match="peft='houlsby' is not one of"):
        SFTConfig(peft="houlsby")
    assert SFTConfig(peft="ia3").resolved().lr == pm.DEFAULT_LR["ia3"]
    assert SFTConfig().resolved().lr == 5e-4  # LoRA keeps the tuned embedded default
