"""Greedy generation on the embedded default model (SmolLM2-135M-Instruct, NF4 + double
quant, fp32 compute, LoRA on every linear layer), as the default SFT run evaluates it:
``fastlora.generate`` on the patched model (CPU NF4 GEMV for decode, the shared system
prompt run once) gives token for token what transformers' ``generate`` gives on the
unpatched model."""
from __future__ import annotations

import torch

import fastlora
from tests.helpers import requires_bnb

pytestmark = requires_bnb


def test_default_model_greedy_matches_transformers(smollm_dir, chat_tokenizer):
    from fastlora.train.evaluate import task_items
    from fastlora.train.model import add_lora, load_base
    from fastlora.train.sft import SFTConfig, load_data

    tok = chat_tokenizer
    base = load_base(smollm_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    model = add_lora(base, r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so the LoRA term is part of every step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.002)
    data = load_data(SFTConfig().resolved())
    prompts = [it.prompt for it in task_items(data["test"][:6], tok, data["format"])]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
    want = []
    for r in out[:, enc["input_ids"].shape[1]:].tolist():
        want.append(r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r)
    assert fastlora.patch(model).ok
    got = fastlora.generate(model, prompts, tokenizer=tok, max_new_tokens=12, add_special_tokens=False,
                            stop_token_ids=[tok.eos_token_id])
    assert [s.tolist() for s in got.sequences] == want
    assert got.texts == [tok.decode(w, skip_special_tokens=True) for w in want]
    # The label-restricted evaluation reads the free greedy answers off its own forwards
    # (with_greedy): the same tokens. The labels send every row off the trie at its first
    # token; choices made of rows' own first tokens walk it (natural text, unlike a tiny
    # random model's repeated tokens), and a stop token after one ends that row there.
    from tests.generate.test_choices import _own_choices

    labels = sorted({r["label"] for r in data["test"]})
    choices = [tok.decode(tok(f'{{"category": "{c}"}}', add_special_tokens=False)["input_ids"]) for c in labels]
    res = fastlora.generate(model, prompts, tokenizer=tok, max_new_tokens=12, add_special_tokens=False,
                            stop_token_ids=[tok.eos_token_id], choices=choices, with_greedy=True, batch_size=4)
    assert [s.tolist() for s in res.greedy.sequences] == want
    own = _own_choices(tok, prompts, got.sequences, 4)
    assert len(own) >= 2
    walked = [i for i, q in enumerate(got.sequences) if tok.decode(q[:4].tolist()) in own]
    stop = int(got.sequences[walked[0]][4])
    plain = fastlora.generate(model, prompts, tokenizer=tok, max_new_tokens=12, add_special_tokens=False,
                              stop_token_ids=[tok.eos_token_id, stop], batch_size=4)
    res = fastlora.generate(model, prompts, tokenizer=tok, max_new_tokens=12, add_special_tokens=False,
                            stop_token_ids=[tok.eos_token_id, stop], choices=own, with_greedy=True, batch_size=4)
    assert [s.tolist() for s in res.greedy.sequences] == [s.tolist() for s in plain.sequences]
    assert res.greedy.finish_reasons[walked[0]] == "stop_token"
    assert res.greedy.info["rows_without_a_decode_step"] >= 1
