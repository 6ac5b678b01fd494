"""The growing cache layer (in-place appends into buffers with room) holds exactly what
transformers' DynamicLayer holds, through appends, row selection, repetition and crops;
and generation leaves no hook on the model's head."""
from __future__ import annotations

import pytest
import torch


def _pair():
    from transformers.cache_utils import DynamicLayer

    from fastlora.generate.decode import growing_layer_class

    return DynamicLayer(), growing_layer_class()()


def _same(a, b):
    assert a.get_seq_length() == b.get_seq_length()
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_growing_layer_matches_dynamic_layer():
    g = torch.Generator().manual_seed(0)
    ref, got = _pair()

    def add(t, B=5):
        k, v = torch.randn(B, 2, t, 3, generator=g), torch.randn(B, 2, t, 3, generator=g)
        rk, rv = ref.update(k, v)
        gk, gv = got.update(k.clone(), v.clone())
        assert torch.equal(rk, gk) and torch.equal(rv, gv)

    add(7)  # a prefill
    for _ in range(150):  # past several reallocations
        add(1)
    _same(ref, got)
    buf = got._kbuf
    add(1)
    assert got._kbuf is buf  # appends write in place while there is room
    for op, arg in (("batch_select_indices", torch.tensor([4, 0, 2])), ("batch_repeat_interleave", 2),
                    ("crop", -3)):
        getattr(ref, op)(arg)
        getattr(got, op)(arg)
        _same(ref, got)
        add(2, B=ref.keys.shape[0])
        add(1, B=ref.keys.shape[0])
        _same(ref, got)


def test_runner_cache_uses_growing_layers_and_fork_reads_them(tiny_chat_model_dir):
    from transformers import AutoModelForCausalLM

    from fastlora.generate.decode import Runner, fork_cache, growing_layer_class

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32)
    r = Runner(model)
    cache = r.new_cache()
    ids = torch.randint(5, 100, (3, 6))
    with torch.no_grad():
        r(ids, torch.ones_like(ids), torch.arange(6).expand(3, -1), cache)
    assert all(type(layer) is growing_layer_class() for layer in cache.layers)
    forked = fork_cache(r, cache, torch.tensor([2, 0]), 4)
    assert forked is not None
    for a, b in zip(cache.layers, forked.layers):
        assert torch.equal(a.keys[[2, 0], :, :4], b.keys) and torch.equal(a.values[[2, 0], :, :4], b.values)


def test_generate_leaves_no_hook_on_the_head(tiny_chat_model_dir, chat_tokenizer):
    from transformers import AutoModelForCausalLM

    import fastlora

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32)
    head = model.get_output_embeddings()
    seen = []
    real = head.forward

    def spy(x):
        seen.append(x.is_contiguous())
        return real(x)

    head.forward = spy
    fastlora.generate(model, ["hello there", "a longer prompt than the first"], tokenizer=chat_tokenizer,
                      max_new_tokens=3)
    assert seen and all(seen)  # the prefill's last position arrives as a contiguous copy
    assert not head._forward_pre_hooks
    x = torch.randn(2, 4, head.in_features)[:, -1:, :]
    seen.clear()
    head(x)
    assert seen == [False]  # outside generation the head sees what it is given


@pytest.mark.parametrize("n", [1, 3])
def test_growing_layer_after_reset(n):
    """A fresh growing layer after reset behaves as a new one."""
    ref, got = _pair()
    k = torch.randn(2, 1, n, 4)
    got.update(k, k)
    got.reset()
    ref.update(k * 2, k * 3)
    got.update(k * 2, k * 3)
    _same(ref, got)


def test_shared_prefix_runs_once_per_call(tiny_chat_model_dir, chat_tokenizer, monkeypatch):
    """Batches of one call that share a system prompt run it once, and the tokens are
    those of a call that lays every row out on its own."""
    from transformers import AutoModelForCausalLM

    import fastlora
    from fastlora.generate import decode as D

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32)
    system = "You are a careful assistant. Answer with one short sentence about the topic."
    prompts = [chat_tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                   {"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True)
               for q in ["hi", "what is rain", "tell me about cats", "and dogs?", "why is the sky blue", "ok"]]
    ref = fastlora.generate(model, prompts, tokenizer=chat_tokenizer, max_new_tokens=4, share_prefix=False)
    widths = []
    real = D.Runner.__call__

    def spy(self, ids, *a, **k):
        widths.append(ids.shape)
        return real(self, ids, *a, **k)

    monkeypatch.setattr(D.Runner, "__call__", spy)
    got = fastlora.generate(model, prompts, tokenizer=chat_tokenizer, max_new_tokens=4, batch_size=2)
    assert [s.tolist() for s in got.sequences] == [s.tolist() for s in ref.sequences]
    prefix_runs = [w for w in widths if w[0] == 1 and w[1] >= D.MIN_SHARED_PREFIX]
    assert len(prefix_runs) == 1, widths  # three batches, one run of the shared prefix
