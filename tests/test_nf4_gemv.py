"""The CPU NF4 GEMV (csrc/nf4_gemv_cpu.cpp) against the float64 reference, on every
instruction-set path this CPU has, and its use by lora_linear for no-grad decode calls."""
from __future__ import annotations

import pytest
import torch

from fastlora import _ext
from fastlora.nf4 import quantize_nf4
from fastlora.ops import nf4_gemv as G
from fastlora.ops.lora_linear import lora_linear, lora_linear_reference

# (N, K, blocksize, double quant): odd N; K not a multiple of the blocksize (blocks span
# rows); K not a multiple of 32 (vector tails); odd K (the scalar path); long rows; a
# SmolLM2-sized row; every blocksize with and without double quantization.
CASES = (
    (1, 64, 64, False), (7, 100, 64, True), (33, 66, 32, False), (33, 66, 32, True), (5, 129, 64, True),
    (5, 129, 128, False), (45, 96, 128, True), (24, 576, 64, True), (24, 576, 256, False), (3, 2048, 256, True),
    (9, 160, 32, True), (16, 384, 128, False),
)


def _isas():
    mod = _ext.require("the CPU NF4 GEMV tests")  # a missing extension fails, never skips
    return [name for name, code in G.ISA.items() if code >= 0 and mod.nf4_gemv_cpu_isa_available(code)]


def _weight(N, K, dtype, blocksize, dq, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (0.1 + 3 * torch.rand(N, 1, generator=g))
    return quantize_nf4(w.to(dtype), blocksize=blocksize, double_quant=dq)


def _check(y, x, wq, bias, what):
    """|y - ref| <= bound, ref in float64 on the reference-decoded weight; the bound is the
    fp32 summation error K·eps·Σ|x·w| (both too high and too low fail)."""
    w = wq.dequantize(backend="reference").to(x.dtype).double()
    xd = x.double()
    ref = xd @ w.t() + (0 if bias is None else bias.to(x.dtype).double())
    K = x.shape[1]
    mag = xd.abs() @ w.abs().t() + (0 if bias is None else bias.double().abs())
    eps = 2.0 ** -24 if x.dtype == torch.float32 else 2.0 ** -8
    bound = 2 * K * 2.0 ** -24 * mag + eps * ref.abs() + 1e-30
    err = (y.double() - ref).abs()
    assert y.shape == ref.shape and y.dtype == x.dtype, what
    assert bool((err <= bound).all()), f"{what}: max err {float((err - bound).max()):.3e} over bound"
    assert float(ref.abs().max()) > 0, f"{what}: vacuous (zero reference)"


@pytest.mark.parametrize("N,K,blocksize,dq", CASES)
def test_matches_reference_every_isa(N, K, blocksize, dq):
    wq = _weight(N, K, torch.float32, blocksize, dq)
    g = torch.Generator().manual_seed(1)
    for M in (1, 3, 9):  # 9: a full row tile of 8 and one more
        x = torch.randn(M, K, generator=g)
        bias = torch.randn(N, generator=g) if M == 3 else None
        for isa in _isas():
            _check(G.nf4_gemv(x, wq, bias, isa=isa), x, wq, bias, f"N={N} K={K} bs={blocksize} dq={dq} M={M} {isa}")


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_weight_and_input_dtypes(wdtype, xdtype):
    # the decoded values are rounded to the weight's dtype first, as bitsandbytes does
    wq = _weight(37, 192, wdtype, 64, True, seed=3)
    x = torch.randn(4, 192, generator=torch.Generator().manual_seed(2)).to(xdtype)
    for isa in _isas():
        _check(G.nf4_gemv(x, wq, isa=isa), x, wq, None, f"{wdtype} weight, {xdtype} x, {isa}")


def test_isa_paths_agree_and_strided_x():
    wq = _weight(64, 512, torch.bfloat16, 64, True, seed=5)
    big = torch.randn(5, 1024, generator=torch.Generator().manual_seed(4))
    x = big[:, ::2]  # a row stride the kernel must honour
    outs = {isa: G.nf4_gemv(x, wq, isa=isa) for isa in _isas()}
    for isa, y in outs.items():
        _check(y, x.contiguous(), wq, None, isa)
    assert "scalar" in outs and len(outs) >= 2 or len(_isas()) == 1



def test_threads_split_output_features_bit_identically():
    """With 2 threads (work above the kernel's threshold) each output feature is still one
    thread's sum in one order: the result equals the single-thread one bit for bit, and
    the reference within the fp32 bound; odd N leaves an uneven last chunk."""
    wq = _weight(1031, 576, torch.float32, 64, True, seed=7)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(8))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = G.nf4_gemv(x, wq)
        torch.set_num_threads(2)
        two = G.nf4_gemv(x, wq)
    finally:
        torch.set_num_threads(n)
    assert 9 * 1031 * 576 >= 1 << 22  # above the kernel's threshold: the parallel region runs
    assert torch.equal(one, two)
    _check(two, x, wq, None, "2 threads")

def test_bad_input():
    wq = _weight(8, 64, torch.float32, 64, False)
    with pytest.raises(ValueError, match=r"x has shape \(2, 32\) but the weight has shape \(8, 64\)"):
        G.nf4_gemv(torch.zeros(2, 32), wq)
    with pytest.raises(ValueError, match="isa 'sse9'"):
        G.nf4_gemv(torch.zeros(2, 64), wq, isa="sse9")
    with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
        G.nf4_gemv(torch.zeros(2, 64), wq, torch.zeros(3))
    with pytest.raises(ValueError, match="2-D float"):
        G.nf4_gemv(torch.zeros(2, 64, dtype=torch.long), wq)


def _lora(N, K, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, K, generator=g) * 0.1, torch.randn(N, r, generator=g) * 0.1


def test_lora_linear_uses_it_for_no_grad_decode(monkeypatch):
    N, K = 48, 192
    wq = _weight(N, K, torch.float32, 64, True)
    A, B = _lora(N, K)
    bias = torch.randn(N)
    calls = []
    impl = G._impl
    monkeypatch.setattr(G, "_impl", lambda *a: calls.append(a[0].shape[0]) or impl(*a))
    x = torch.randn(2, 3, K)  # M = 6 rows
    with torch.no_grad():
        y = lora_linear(x, wq, A, B, scaling=2.0, bias=bias)
    assert calls == [6], "the decode call went to the GEMV"
    w = wq.dequantize(backend="reference")
    ref = lora_linear_reference(x.double(), w.double(), A.double(), B.double(), 2.0, bias.double())
    _check(y.reshape(6, N) - (((x.reshape(6, K) @ A.t()) @ B.t()) * 2.0), x.reshape(6, K), wq, bias, "base part")
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # large M, or autograd to record: the ordinary path
    calls.clear()
    with torch.no_grad():
        lora_linear(torch.randn(G.CPU_GEMV_MAX_M + 1, K), wq, A, B, scaling=2.0)
    lora_linear(torch.randn(2, K, requires_grad=True), wq, A, B, scaling=2.0)
    assert calls == []
