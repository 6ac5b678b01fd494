"""fastlora.generate on tiny 4-bit QLoRA models of several families (fp32 compute, CPU).

The oracle for greedy decoding is transformers' own ``generate`` on the unpatched model
(bitsandbytes NF4 + PEFT as users run it): token for token, on left-padded batches of
different prompt lengths, with rows stopping at different steps.
"""
from __future__ import annotations

import pytest
import torch

import fastlora
from tests.helpers import requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb

EXTRA_FAMILIES = {  # logit scaling in the head
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
}


def _save(family, path):
    if family in tiny.FAMILIES:
        return tiny.save_random(family, path)
    import transformers
    from transformers import AutoModelForCausalLM

    cls, extra = EXTRA_FAMILIES[family]
    cfg = getattr(transformers, cls)(
        hidden_size=tiny.HIDDEN, intermediate_size=tiny.INTER, vocab_size=tiny.VOCAB, num_hidden_layers=tiny.LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **extra,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_models")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _save(family, root / family)
        return cache[family]

    return get


def prompts_batch(seed=0, lengths=(9, 5, 12)):
    """Left-padded (ids, mask) of prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros((len(lengths), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, tiny.VOCAB, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def hf_greedy(model, ids, mask, n, eos):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=eos, temperature=None, top_p=None, top_k=None)
    rows = []
    for r in out[:, ids.shape[1]:].tolist():
        rows.append(r[: r.index(eos) + 1] if eos in r else r)
    return rows


@pytest.mark.parametrize("family", list(tiny.FAMILIES) + list(EXTRA_FAMILIES))
def test_greedy_matches_transformers_generate(model_dir, family):
    path = model_dir(family)
    ref = tiny.load_qlora(path)
    pat = tiny.load_qlora(path)
    assert fastlora.patch(pat).ok
    ids, mask = prompts_batch()
    n = 10
    # a stop token that one row reaches early, so rows end at different steps
    free = fastlora.generate(ref, input_ids=ids, attention_mask=mask, max_new_tokens=n, stop_token_ids=[])
    assert [len(s) for s in free.sequences] == [n] * 3
    eos = int(free.sequences[1][3])
    want = hf_greedy(ref, ids, mask, n, eos)
    assert len(want[1]) <= 4
    from fastlora.generate.decode import Runner
    from fastlora.generate.static import supports_static

    # the static-cache decoder (CUDA-graph path, run eagerly here) wherever the model allows it
    decoders = ["dynamic"] + (["static"] if supports_static(Runner(ref)) is None else [])
    assert family == "gemma2" or decoders == ["dynamic", "static"]
    for model in (ref, pat):
        for decoder in decoders:
            got = fastlora.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                    stop_token_ids=[eos], decoder=decoder)
            assert [s.tolist() for s in got.sequences] == want, (family, decoder)
            assert got.lengths.tolist() == [len(w) for w in want]
            assert got.finish_reasons == ["stop_token" if w[-1] == eos else "length" for w in want]


def test_rows_independent_of_batch_and_padding(model_dir):
    pat = tiny.load_qlora(model_dir("llama"))
    fastlora.patch(pat)
    ids, mask = prompts_batch(seed=3, lengths=(4, 11, 7, 2))
    batch = fastlora.generate(pat, input_ids=ids, attention_mask=mask, max_new_tokens=6, stop_token_ids=[])
    for i in range(4):
        row = ids[i][mask[i].bool()].unsqueeze(0)
        alone = fastlora.generate(pat, input_ids=row, max_new_tokens=6, stop_token_ids=[])
        assert alone.sequences[0].tolist() == batch.sequences[i].tolist()
    # right padding is read as the same prompts
    right = torch.zeros_like(ids)
    rmask = torch.zeros_like(mask)
    for i in range(4):
        r = ids[i][mask[i].bool()]
        right[i, : len(r)] = r
        rmask[i, : len(r)] = 1
    again = fastlora.generate(pat, input_ids=right, attention_mask=rmask, max_new_tokens=6, stop_token_ids=[],
                              batch_size=3)
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in batch.sequences]


def _teacher_forced(model, prompt, new):
    """fp64 log-softmax of a plain forward over prompt + new tokens: (len(new), V)."""
    seq = torch.cat([prompt, new]).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, len(prompt) - 1: -1].double()
    return logits


def test_logprobs_match_a_teacher_forced_forward(model_dir):
    pat = tiny.load_qlora(model_dir("qwen2"))
    fastlora.patch(pat)
    pat.eval()
    ids, mask = prompts_batch(seed=5)
    for kw in (dict(temperature=0.0), dict(temperature=0.7, top_k=20, seed=1), dict(temperature=1.3, top_p=0.8, seed=2)):
        out = fastlora.generate(pat, input_ids=ids, attention_mask=mask, max_new_tokens=7, stop_token_ids=[],
                                return_logprobs=True, **kw)
        for i in range(3):
            prompt = ids[i][mask[i].bool()]
            logits = _teacher_forced(pat, prompt, out.sequences[i])
            tok = out.sequences[i]
            full = logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
            torch.testing.assert_close(out.logprobs[i].double(), full, rtol=0, atol=2e-4)
            assert out.logprobs[i].dtype == torch.float32
            if kw["temperature"] == 0.0:
                assert torch.equal(tok, logits.argmax(-1))
                assert torch.equal(out.sampling_logprobs[i], torch.zeros(len(tok)))
                continue
            z = logits / kw["temperature"]
            if "top_k" in kw:
                kth = z.topk(kw["top_k"], -1).values[:, -1:]
                z = z.masked_fill(z < kth, float("-inf"))
            if "top_p" in kw:
                p = z.softmax(-1)
                sp, order = p.sort(-1, descending=True)
                before = sp.cumsum(-1) - sp
                drop = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, before >= kw["top_p"])
                drop.scatter_(-1, order[:, :1], False)
                z = z.masked_fill(drop, float("-inf"))
            samp = z.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
            assert torch.isfinite(samp).all(), "a sampled token lies outside the top-k / top-p set"
            torch.testing.assert_close(out.sampling_logprobs[i].double(), samp, rtol=0, atol=2e-4)


def test_sampling_is_reproducible(model_dir):
    pat = tiny.load_qlora(model_dir("llama"))
    fastlora.patch(pat)
    ids, mask = prompts_batch(seed=7)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, temperature=1.0, stop_token_ids=[])
    a = fastlora.generate(pat, seed=11, **kw)
    b = fastlora.generate(pat, seed=11, **kw)
    c = fastlora.generate(pat, seed=12, **kw)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    assert [s.tolist() for s in a.sequences] != [s.tolist() for s in c.sequences]
    # top_k=1 is greedy
    g = fastlora.generate(pat, input_ids=ids, attention_mask=mask, max_new_tokens=8, stop_token_ids=[])
    k1 = fastlora.generate(pat, seed=3, top_k=1, **kw)
    assert [s.tolist() for s in k1.sequences] == [s.tolist() for s in g.sequences]
    # a row's draws do not depend on the rows around it finishing
    stop = int(a.sequences[0][1])
    d = fastlora.generate(pat, seed=11, **{**kw, "stop_token_ids": [stop]})
    for s_a, s_d in zip(a.sequences, d.sequences):
        n = len(s_d)
        assert s_d.tolist() == s_a[:n].tolist()


def test_adapter_switch_and_training_state_restored(model_dir):
    pat = tiny.load_qlora(model_dir("llama"))
    fastlora.patch(pat)
    pat.train()
    ids, mask = prompts_batch(seed=9)
    with_adapter = fastlora.generate(pat, input_ids=ids, attention_mask=mask, max_new_tokens=6, stop_token_ids=[])
    assert pat.training, "generate leaves the model in the mode it found it"
    with pat.disable_adapter():
        base = fastlora.generate(pat, input_ids=ids, attention_mask=mask, max_new_tokens=6, stop_token_ids=[])
    ref = tiny.load_4bit(model_dir("llama"))
    want = hf_greedy(ref, ids, mask, 6, eos=-1)
    assert [s.tolist() for s in base.sequences] == want
    assert [s.tolist() for s in with_adapter.sequences] != want


def test_generate_never_repacks_bnb_weights(model_dir):
    import bitsandbytes as bnb

    model = tiny.load_qlora(model_dir("llama"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:  # as if the model had been loaded without protection
        m.support_avx512bf16_for_cpu = True
    before = [m.weight.data.clone() for m in layers]
    ids, mask = prompts_batch()
    fastlora.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    for m, b in zip(layers, before):
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(m.weight.data, b)


def test_bad_input(model_dir):
    model = tiny.load_qlora(model_dir("llama"))
    ids, mask = prompts_batch()
    with pytest.raises(ValueError, match="prompts is empty"):
        fastlora.generate(model, [], tokenizer=object())
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        fastlora.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=0)
    for p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"top_p must be in \(0, 1\], got {p}"):
            fastlora.generate(model, input_ids=ids, top_p=p, temperature=1.0)
    with pytest.raises(ValueError, match="prompt 0 has 64 tokens but the model's context is 64 tokens"):
        fastlora.generate(model, input_ids=torch.randint(3, 200, (1, 64)))
    with pytest.raises(ValueError, match="exactly one of prompts"):
        fastlora.generate(model)
    with pytest.raises(ValueError, match="need a tokenizer"):
        fastlora.generate(model, ["hello"])
    with pytest.raises(ValueError, match="row 1 of input_ids has no token"):
        fastlora.generate(model, input_ids=ids, attention_mask=torch.stack([mask[0], mask[1] * 0, mask[2]]))
    with pytest.raises(ValueError, match="decoder='cuda_graph' needs the model on a CUDA device"):
        fastlora.generate(model, input_ids=ids, decoder="cuda_graph")
    with pytest.raises(ValueError, match="decoder must be"):
        fastlora.generate(model, input_ids=ids, decoder="fast")
    with pytest.raises(ValueError, match="temperature must be"):
        fastlora.generate(model, input_ids=ids, temperature=-1.0)
