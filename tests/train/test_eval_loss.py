"""eval_loss: the fused head in eval mode, with the rows' shared system prompt run once in
the patched decoder, gives the loss of a plain forward, in float64, on chat data."""
from __future__ import annotations

import json

import pytest
import torch

from tests.train.conftest import classification_records


def _model(model_dir, patch: bool, share_prefix: bool = True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import fastlora

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    torch.manual_seed(0)  # LoRA A's init: the same adapter on every call
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    if patch:
        fastlora.patch(model, share_prefix=share_prefix)
    return model


def _examples(tok, n=13):
    from fastlora.train.data import prepare

    recs = classification_records(n)
    # odd lengths: a longer query every few rows, and one row trained from its first token on
    for i, r in enumerate(recs):
        r["messages"][1]["content"] += " please" * (i % 4)
    ex, _ = prepare(recs, tok, fmt="messages", max_length=256)
    return ex


def _reference(model, examples, pad_id, batch_size):
    """sum over batches of the plain forward's mean loss x trained tokens, / all trained tokens"""
    from fastlora.train.data import collate
    from fastlora.train.evaluate import trained_tokens

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[s: s + batch_size]], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits.double()
            y = batch["labels"][:, 1:]
            lp = logits[:, :-1].log_softmax(-1)
            keep = y != -100
            nll = -lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
            total += float(nll.sum())
            count += int(keep.sum())
            assert count and trained_tokens(batch["labels"]) == int(keep.sum())
    return total / count


@pytest.mark.parametrize("patch", [True, False])
def test_eval_loss_matches_plain_forward(tiny_model_dir, smollm_tokenizer, patch, monkeypatch):
    from fastlora.patch import head as head_mod
    from fastlora.train import evaluate as ev

    model = _model(tiny_model_dir, patch)
    ex = _examples(smollm_tokenizer)
    pad = smollm_tokenizer.pad_token_id

    import fastlora
    from tests.patch.fp64 import float64_all_the_way

    calls = {"fused": 0}
    real_fused = head_mod.fused_loss

    def fused(*a, **k):
        out = real_fused(*a, **k)
        calls["fused"] += out is not None
        return out

    monkeypatch.setattr(head_mod, "fused_loss", fused)
    with float64_all_the_way():  # transformers' float32 RMSNorm would hide or fake differences below 1e-7
        ref = _reference(_model(tiny_model_dir, patch, share_prefix=False), ex, pad, 5)  # every row in full
        got = ev.eval_loss(model, ex, pad_token_id=pad, batch_size=5)
    # patched: fastlora's float64 cross-entropy; unpatched: transformers' loss, which casts
    # the logits to float32 first
    assert got == pytest.approx(ref, rel=1e-10 if patch else 1e-6, abs=0)
    assert calls["fused"] == (3 if patch else 0)  # 13 rows in batches of 5: every batch fused when patched
    stats = fastlora.shared_prefix_stats(model)
    if patch:  # the system prompt and the user turn's header ran once per batch
        assert stats["shared_calls"] == 3 and stats["tokens_run"] < stats["tokens_in"], stats
    else:
        assert stats["calls"] == 0


def test_eval_loss_keeps_the_mode_and_prompt_learning_forward(tiny_model_dir, smollm_tokenizer):
    """eval_loss leaves the model in the mode it found it in, and a prompt-learning model's
    loss is its PeftModel forward's (virtual tokens first; eval_loss puts them in the cache,
    so the loss, which transformers reduces in float32, agrees to float32 rounding)."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fastlora.train import evaluate as ev

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.train()
    ex = _examples(smollm_tokenizer, 6)
    pad = smollm_tokenizer.pad_token_id
    got = ev.eval_loss(model, ex, pad_token_id=pad, batch_size=3)
    assert model.training
    from fastlora.train.data import collate

    model.eval()
    with torch.no_grad():
        order = sorted(range(len(ex)), key=lambda i: -len(ex[i]["input_ids"]))
        tot = cnt = 0
        for s in range(0, 6, 3):
            b = collate([ex[i] for i in order[s:s + 3]], pad)
            n = ev.trained_tokens(b["labels"])
            tot += float(model(**b).loss) * n
            cnt += n
    assert got == pytest.approx(tot / cnt, rel=1e-6)
    assert json.dumps(got)  # a plain float
