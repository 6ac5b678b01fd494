"""eval_loss: the fused head in eval mode and the shared untrained prefix run once give
the loss of a plain forward, in float64, on chat data whose rows share a system prompt."""
from __future__ import annotations

import json

import pytest
import torch

from tests.train.conftest import classification_records


def _model(model_dir, patch: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import fastlora

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    if patch:
        fastlora.patch(model)
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
    ref = _reference(model, ex, pad, 5)

    calls = {"fused": 0, "prefix": []}
    real_fused, real_prefix = head_mod.fused_loss, ev._untrained_shared_prefix

    def fused(*a, **k):
        out = real_fused(*a, **k)
        calls["fused"] += out is not None
        return out

    def prefix(*a):
        calls["prefix"].append(real_prefix(*a))
        return calls["prefix"][-1]

    monkeypatch.setattr(head_mod, "fused_loss", fused)
    monkeypatch.setattr(ev, "_untrained_shared_prefix", prefix)
    got = ev.eval_loss(model, ex, pad_token_id=pad, batch_size=5)
    # patched: fastlora's float64 cross-entropy; unpatched: transformers' loss, which casts
    # the logits to float32 first
    assert got == pytest.approx(ref, rel=1e-10 if patch else 1e-6, abs=0)
    assert calls["fused"] == (3 if patch else 0)  # 13 rows in batches of 5: every batch fused when patched
    # the system prompt and the user turn's header are shared; the assistant answer is trained
    sys_len = len(smollm_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Classify the query."}], tokenize=True))
    assert all(p >= sys_len for p in calls["prefix"]), calls["prefix"]
    # and the figure is not the same with a wrong prefix length: the test can fail
    monkeypatch.setattr(ev, "_untrained_shared_prefix", lambda *a: real_prefix(*a) + 3)
    bad = ev.eval_loss(model, ex, pad_token_id=pad, batch_size=5)
    assert abs(bad - ref) > 1e-6


def test_untrained_shared_prefix_rules():
    from fastlora.train.evaluate import _untrained_shared_prefix as P

    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 0], [1, 2, 3, 4, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    none = torch.full_like(ids, -100)
    assert P(ids, mask, none) == 3  # tokens 1, 2, 3 in every row
    lab = none.clone()
    lab[1, 2] = 9  # the target of position 1 is trained: only position 0 may be shared
    assert P(ids, mask, lab) == 1
    assert P(ids[:1], mask[:1], none[:1]) == 0  # one row: nothing to share
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert P(same, torch.ones_like(same), torch.full_like(same, -100)) == 2  # each row keeps a token
    left = torch.tensor([[0, 1, 2], [1, 1, 2]])
    assert P(left, torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.full_like(left, -100)) == 0  # masked column


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
