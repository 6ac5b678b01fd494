"""fastlora.token_logprobs against the float64 reference on full logits: log-probs and
entropy, gradients wrt hidden / weight / bias through both, options, bad input,
memory, Triton."""
import itertools

import pytest
import torch

import fastlora
from fastlora.backend import Backend
from fastlora.ops import token_logprobs as tlp_mod
from tests.helpers import assert_close, requires_triton

ref = tlp_mod._reference


def _data(shape, h, v, dtype=torch.float64, seed=0, wscale=1.0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(*shape, h, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) * wscale / h**0.5).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    tok = torch.randint(0, v, shape, generator=g)
    return hid, w, b, tok


def _check(hid, w, b, tok, *, use_bias=True, grad_w=True, entropy=True, rtol=None, atol=None, **opts):
    leaves = [hid.clone().requires_grad_(), w.clone().requires_grad_(grad_w), b.clone().requires_grad_()]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    bias, rbias = (leaves[2], refs[2]) if use_bias else (None, None)
    out = fastlora.token_logprobs(leaves[0], leaves[1], tok, bias=bias, return_entropy=entropy, **opts)
    opts.pop("chunk_size", None)
    opts.pop("backend", None)
    exp = ref(refs[0], refs[1], tok, bias=rbias, return_entropy=entropy, **opts)
    out, exp = (out, exp) if entropy else ((out,), (exp,))
    gen = torch.Generator().manual_seed(3)
    total_a, total_e = 0, 0
    for a, e in zip(out, exp):
        assert a.shape == tok.shape
        assert_close(a, e, dtype=hid.dtype, rtol=rtol, atol=atol, msg="value")
        wt = torch.randn(tok.shape, generator=gen, dtype=torch.float64)
        total_a = total_a + (a * wt.to(a.dtype)).sum()
        total_e = total_e + (e * wt).sum()
    total_a.backward()
    total_e.backward()
    for name, a, e in zip(("hidden", "weight", "bias"), leaves, refs):
        if not a.requires_grad or (name == "bias" and not use_bias):
            assert a.grad is None
            continue
        assert a.grad.dtype == hid.dtype
        assert_close(a.grad, e.grad, dtype=hid.dtype, rtol=rtol, atol=atol, msg=f"grad {name}")


OPTIONS = [
    dict(temperature=t, logit_scale=s, softcap=c)
    for t, s, c in itertools.product((1.0, 0.7), (1.0, 0.5), (None, 2.5))
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("entropy", [False, True])
def test_options_float64(opts, entropy):
    hid, w, b, tok = _data((3, 7), 6, 23)
    _check(hid, w, b, tok, entropy=entropy, chunk_size=5, **opts)


@pytest.mark.parametrize("use_bias,grad_w", [(False, True), (True, False)])
def test_optional_bias_and_frozen_weight(use_bias, grad_w):
    hid, w, b, tok = _data((11,), 5, 13)
    _check(hid, w, b, tok, use_bias=use_bias, grad_w=grad_w, chunk_size=4)


def test_float32_vocab_50257():
    hid, w, b, tok = _data((4,), 8, 50257, dtype=torch.float32)
    _check(hid, w, b, tok, chunk_size=3, temperature=0.7)


def test_bfloat16():
    hid, w, b, tok = _data((2, 9), 16, 40, dtype=torch.bfloat16)
    _check(hid, w, b, tok, chunk_size=5, rtol=1.5e-2, atol=1.5e-2)


def test_logits_of_magnitude_1e4():
    hid, w, b, tok = _data((9,), 8, 17, wscale=3e4)
    _check(hid, w, b, tok, chunk_size=4)


def test_matches_log_softmax_gather_without_saving_logits():
    n, h, v = 48, 8, 400
    hid, w, b, tok = _data((n,), h, v, dtype=torch.float32)
    hid.requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = fastlora.token_logprobs(hid, w, tok, chunk_size=8)
    lp.sum().backward()
    exp = torch.log_softmax(hid.detach() @ w.t(), -1).gather(-1, tok[:, None]).squeeze(-1)
    assert_close(lp, exp)
    assert max(sizes) < n * v


def test_out_of_range_tokens_and_shapes_raise():
    hid, w, b, tok = _data((6,), 4, 9)
    bad = tok.clone()
    bad[1] = -100  # token_logprobs has no ignore_index: every position needs a token
    with pytest.raises(ValueError, match=r"tokens: value -100 .*\[0, 9\)"):
        fastlora.token_logprobs(hid, w, bad)
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(5,\)"):
        fastlora.token_logprobs(hid, w, tok[:5])
    with pytest.raises(TypeError, match="tokens must be an integer tensor, got list"):
        fastlora.token_logprobs(hid, w, tok.tolist())
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor, got dtype torch.float64"):
        fastlora.token_logprobs(hid, w, tok.double())
    with pytest.raises(ValueError, match="temperature"):
        fastlora.token_logprobs(hid, w, tok, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got inf"):
        fastlora.token_logprobs(hid, w, tok, temperature=float("inf"))
    with pytest.raises(ValueError, match="logit_scale must be finite, got nan"):
        fastlora.token_logprobs(hid, w, tok, logit_scale=float("nan"))


@requires_triton
@pytest.mark.parametrize("entropy", [False, True])
def test_triton_matches_reference(entropy):
    hid, w, b, tok = _data((2, 5), 16, 150, dtype=torch.float32)
    _check(hid, w, b, tok, entropy=entropy, chunk_size=4, temperature=0.7, softcap=3.0,
           backend=Backend.TRITON)


@pytest.mark.cuda
def test_cuda_ppo_size_memory_under_tenth_of_log_softmax_gather():
    """Memory bound only: B*L = 8*1024 tokens, H=2048, V=128256, bf16, frozen weight."""
    n, h, v = 8 * 1024, 2048, 128256
    dev = "cuda"
    w = torch.randn(v, h, device=dev, dtype=torch.bfloat16) * 0.02
    tok = torch.randint(0, v, (n,), device=dev)

    def peak(fn):
        hid = torch.randn(n, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hid).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    eager = peak(lambda hid: torch.log_softmax((hid @ w.t()).float(), -1).gather(-1, tok[:, None]))
    ours = peak(lambda hid: fastlora.token_logprobs(hid, w, tok))
    assert ours <= 0.1 * eager, (ours / 2**30, eager / 2**30)


@requires_triton
def test_triton_several_vocab_blocks(monkeypatch):
    from fastlora.kernels import cross_entropy_triton as k

    monkeypatch.setattr(k, "MAX_BLOCK_V", 32)  # V=90: 2 full blocks + a partial one
    hid, w, b, tok = _data((7,), 8, 90, dtype=torch.float32, wscale=5.0)
    _check(hid, w, b, tok, chunk_size=3, temperature=0.7, backend=Backend.TRITON)


def test_torch_compile_aot_eager():
    hid, w, b, tok = _data((9,), 8, 25, dtype=torch.float32)
    h1 = hid.clone().requires_grad_()
    fn = lambda h: fastlora.token_logprobs(h, w, tok, temperature=0.7, return_entropy=True)  # noqa: E731
    lp, ent = torch.compile(fn, backend="aot_eager")(h1)
    (lp.sum() + ent.sum()).backward()
    h2 = hid.double().requires_grad_()
    rlp, rent = ref(h2, w.double(), tok, temperature=0.7, return_entropy=True)
    (rlp.sum() + rent.sum()).backward()
    assert_close(lp, rlp)
    assert_close(ent, rent)
    assert_close(h1.grad, h2.grad, dtype=torch.float32)
