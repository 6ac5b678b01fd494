"""fastlora.lora_linear against a float64 reference: forward and every gradient.

The NF4 weights come from fastlora's own quantizer (bit-exact with bitsandbytes:
tests/test_nf4.py proves it where bitsandbytes is installed), so these tests need no
bitsandbytes; the dense reference weight is the pure-torch reference dequantization,
upcast to float64.
"""
from __future__ import annotations

import pytest
import torch

from fastlora.backend import Backend
from fastlora.ops.lora_linear import (
    lora_linear,
    lora_linear_reference,
    nf4_linear_bwd_input,
    nf4_linear_fwd,
)
from tests.helpers import assert_close, requires_triton

HAS_CUDA = torch.cuda.is_available()
K, N, R, BS = 200, 130, 8, 64  # K and N are not multiples of the block or of blocksize
# Triton runs on the GPU when there is one, else in the interpreter on CPU tensors
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"



def device_for(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


class _BnbNF4:
    """The duck-typed NF4 contract (no NF4Weight): packed bytes and fp32 block scales."""

    def __init__(self, packed, absmax, code, shape, blocksize, dtype):
        self.packed, self._absmax, self.code = packed, absmax, code
        self.shape, self.blocksize, self.dtype = tuple(shape), blocksize, dtype
        self.device = packed.device

    def absmax_f32(self):
        return self._absmax


def make_nf4(out_f, in_f, dtype=torch.float32, device="cpu", blocksize=BS, seed=0, wrap=None):
    """(NF4 weight, its dense dequantization in the weight's dtype).

    The weight is a double-quantized ``fastlora.NF4Weight`` from fastlora's CPU quantizer;
    ``wrap="raw"`` gives the same values through the duck-typed contract with fp32
    statistics (whose fields the bad-input tests corrupt)."""
    from fastlora.nf4 import quantize_nf4

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    q = quantize_nf4(w, blocksize, double_quant=True, backend="cpp")
    dense = q.dequantize(backend="reference").to(device)  # the oracle, in `dtype`
    if wrap is None:
        return q.to(device), dense
    weight = _BnbNF4(q.packed.to(device), q.absmax_f32().to(device), q.code.to(device),
                     (out_f, in_f), blocksize, dtype)
    return weight, dense


def make_inputs(lead, dtype, device="cpu", r=R, bias="grad", lora_dtype=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*lead, K, generator=g).to(device, dtype).requires_grad_()
    A = (torch.randn(r, K, generator=g) / K**0.5).to(device, lora_dtype).requires_grad_()
    B = (torch.randn(N, r, generator=g) / r**0.5).to(device, lora_dtype).requires_grad_()
    b = None
    if bias is not None:
        b = torch.randn(N, generator=g).to(device, dtype).requires_grad_(bias == "grad")
    return x, A, B, b


def reference64(x, dense, A, B, scaling, b, mask=None, p=0.0):
    """Float64 forward and grads of everything that requires grad, for upstream dy."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, A, B, b)]
    x64, A64, B64, b64 = leaves
    y = lora_linear_reference(x64, dense.double(), A64, B64, scaling, b64, mask, p)
    return y, leaves


# (rtol, atol) by the dtype the result is computed in; gradients get 4x atol (sums over rows)
CHECK_TOL = {torch.float32: (1e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (1e-2, 1e-2)}


def check(x, weight, dense, A, B, b, *, scaling=0.5, p=0.0, backend=None, dtype=None, tol=None):
    dtype = dtype or x.dtype
    rtol, atol = tol or CHECK_TOL[dtype]
    y = lora_linear(x, weight, A, B, scaling, b, p, backend=backend)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    y_ref, leaves = reference64(x, dense, A, B, scaling, b)
    assert_close(y, y_ref, rtol=rtol, atol=atol, msg="forward")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    y.backward(dy)
    y_ref.backward(dy.double())
    for name, t, ref in zip(("dx", "dA", "dB", "dbias"), (x, A, B, b), leaves):
        if t is None:
            continue
        if not t.requires_grad:
            assert t.grad is None, f"{name} must not be computed"
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        r, a = rtol, atol
        if name in ("dA", "dB") and tol is None and t.dtype in CHECK_TOL:
            # dA, dB are computed in the adapters' own dtype from operands that are exact
            # there (fp32 adapters on bf16 x): held to that dtype's tolerance, not x's
            r, a = CHECK_TOL[t.dtype]
        assert_close(t.grad, ref.grad, rtol=r, atol=a * 4, msg=name)


# --------------------------------------------------------------------------- CPU paths


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("M", [1, 3, 129])
@pytest.mark.parametrize("bias", [None, "grad", "frozen"])
def test_nf4_fp32_cpu(backend, M, bias):
    weight, dense = make_nf4(N, K)
    x, A, B, b = make_inputs((M,), torch.float32, bias=bias)
    check(x, weight, dense, A, B, b, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_nf4_bf16_cpu(backend):
    # the SFT default on this project's CPUs: bf16 weights and activations, fp32 LoRA
    weight, dense = make_nf4(N, K, dtype=torch.bfloat16)
    x, A, B, b = make_inputs((33,), torch.bfloat16, lora_dtype=torch.float32)
    check(x, weight, dense, A, B, b, backend=backend, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_frozen_x_and_empty_batch(backend):
    # the first LoRA layer after frozen embeddings gets an x without grad: no dx at all
    dev = device_for(backend)
    weight, dense = make_nf4(N, K, device=dev)
    x, A, B, b = make_inputs((4,), torch.float32, device=dev)
    check(x.detach(), weight, dense, A, B, b, backend=backend)
    x0 = torch.zeros(2, 0, K, device=dev, requires_grad=True)
    y = lora_linear(x0, weight, A, B, 0.5, b, 0.1, backend=backend)
    assert y.shape == (2, 0, N)
    y.sum().backward()
    assert x0.grad.shape == x0.shape


def test_nf4_contract_without_nf4weight():
    # any object with the NF4Weight fields works (plain fp32 statistics here)
    weight, dense = make_nf4(N, K, wrap="raw")
    x, A, B, b = make_inputs((3,), torch.float32)
    check(x, weight, dense, A, B, b)


@pytest.mark.parametrize("M", [1, 3, 129])
def test_plain_weight_fp32_cpu(M):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(N, K, generator=g) / K**0.5
    x, A, B, b = make_inputs((M,), torch.float32)
    check(x, w, w, A, B, b)


def test_weight_dtype_roundtrip_bf16_weight_fp32_x():
    # bnb semantics: dequantize to the weight's own dtype (bf16, RNE), then cast to x.dtype.
    weight, dense = make_nf4(N, K, dtype=torch.bfloat16)
    assert dense.dtype == torch.bfloat16
    x, A, B, b = make_inputs((5,), torch.float32)
    check(x, weight, dense, A, B, b)


def test_3d_and_noncontiguous_x():
    weight, dense = make_nf4(N, K)
    x, A, B, b = make_inputs((2, 3), torch.float32)
    check(x, weight, dense, A, B, b)
    base = torch.randn(K, 7, 4, generator=torch.Generator().manual_seed(4))
    xt = base.permute(2, 1, 0).requires_grad_()  # (4, 7, K), non-contiguous
    assert not xt.is_contiguous()
    x, A, B, b = make_inputs((4, 7), torch.float32)
    check(xt, weight, dense, A, B, b)


def test_lora_in_fp32_with_fp64_x():
    # PEFT runs the LoRA branch in the LoRA weights' dtype and casts back.
    weight, dense = make_nf4(N, K, dtype=torch.float32)
    x, A, B, b = make_inputs((6,), torch.float64, lora_dtype=torch.float32)
    check(x, weight, dense, A, B, b, dtype=torch.float32)


# --------------------------------------------------------------------------- dropout


def _dropout_case(backend, device="cpu", dtype=torch.float32, M=9, p=0.4):
    """With A = I and B = I (N = K), the LoRA branch returns s·dropout(x) itself, so the
    forward's mask can be read back from the output and the reference rebuilt with it;
    the backward is then checked against that mask."""
    k = 64
    weight, dense = make_nf4(k, k, device=device)
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(M, k, generator=g) + 0.5).to(device, dtype).requires_grad_()  # no zeros
    A = torch.eye(k, device=device, dtype=dtype).requires_grad_()
    B = torch.eye(k, device=device, dtype=dtype).requires_grad_()
    s = 2.0
    y = lora_linear(x, weight, A, B, s, None, p, backend=backend)
    lora_out = (y - x @ dense.to(dtype).t()) / s  # = dropout(x)
    mask = lora_out.abs() > 0.25 * x.abs()  # kept: x/(1-p) ≥ x; dropped: ~0
    assert 0 < mask.sum() < mask.numel(), "dropout mask is trivial"
    # inverted dropout, checked here without the module's own helper: kept x/(1-p), dropped 0
    assert_close(lora_out[mask], (x.detach() / (1 - p))[mask], rtol=1e-5, atol=1e-5, msg="kept")
    assert_close(lora_out[~mask], torch.zeros_like(lora_out[~mask]), rtol=0, atol=1e-5, msg="dropped")
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    y.backward(dy)
    y_ref, (x64, A64, B64, _) = reference64(x, dense, A, B, s, None, mask, p)
    y_ref.backward(dy.double())
    rtol, atol = (1e-5, 2e-5) if dtype == torch.float32 else (4e-3, 4e-3)
    assert_close(y, y_ref, rtol=rtol, atol=atol, msg="forward")
    assert_close(x.grad, x64.grad, rtol=rtol, atol=atol * 4, msg="dx")
    assert_close(A.grad, A64.grad, rtol=rtol, atol=atol * 4, msg="dA")
    assert_close(B.grad, B64.grad, rtol=rtol, atol=atol * 4, msg="dB")
    # a fresh mask each call (dropout is not frozen at one draw)
    y2 = lora_linear(x.detach(), weight, A.detach(), B.detach(), s, None, p, backend=backend)
    assert not torch.equal(y2, y.detach())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_dropout_exact_cpu(backend):
    _dropout_case(backend)


def test_dropout_plain_weight_and_p1():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(N, K, generator=g) / K**0.5
    x, A, B, b = make_inputs((4,), torch.float32)
    y = lora_linear(x, w, A, B, 3.0, b, 1.0)  # everything dropped: base only
    assert_close(y, (x @ w.t() + b).detach(), msg="p=1")
    y.sum().backward()
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


# --------------------------------------------------------------------------- memory, no dW


def test_saves_no_dense_weight_and_no_weight_grad():
    weight, dense = make_nf4(N, K)
    x, A, B, b = make_inputs((129,), torch.float32)
    shapes = []

    saved = []

    def pack(t):
        shapes.append(tuple(t.shape))
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, weight, A, B, 0.5, b, 0.1)
    assert shapes, "nothing saved: the hook did not see the op"
    assert (N, K) not in shapes and (K, N) not in shapes, shapes
    assert max(a * b for a, b in (s2 + (1,) * (2 - len(s2)) for s2 in shapes if len(s2) <= 2)) < N * K, shapes
    if getattr(weight, "nested", False):  # double-quant stats stay 8-bit in between
        nblocks = -(-N * K // BS)
        assert all(not (t.dtype == torch.float32 and t.numel() == nblocks) for t in saved), shapes
    y.sum().backward()
    assert not weight.packed.requires_grad and weight.packed.grad is None


def test_plain_weight_requiring_grad_is_refused():
    w = torch.randn(N, K, requires_grad=True)
    x, A, B, _ = make_inputs((2,), torch.float32)
    with pytest.raises(ValueError, match=r"requires grad.*\(130, 200\)|\(130, 200\).*requires grad"):
        lora_linear(x, w, A, B)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs():
    weight, _ = make_nf4(N, K)
    x, A, B, b = make_inputs((3,), torch.float32)
    with pytest.raises(ValueError, match=r"lora_A has shape \(8, 300\) but x has in_features 200"):
        lora_linear(x, weight, torch.randn(8, 300), B)
    with pytest.raises(ValueError, match=r"lora_B has shape \(130, 4\).*lora_A has shape \(8, 200\)"):
        lora_linear(x, weight, A, torch.randn(N, 4))
    with pytest.raises(ValueError, match=r"x has shape \(3, 199\).*weight has shape \(130, 200\)"):
        lora_linear(torch.randn(3, 199), weight, A, B)
    with pytest.raises(ValueError, match=r"bias has shape \(129,\).*\(130, 200\)"):
        lora_linear(x, weight, A, B, bias=torch.randn(129))
    with pytest.raises(ValueError, match=r"lora_A has dtype torch.float32.*lora_B has dtype torch.float16"):
        lora_linear(x, weight, A, B.detach().half())
    with pytest.raises(ValueError, match=r"weight has dtype torch.float16 but x has dtype torch.float32"):
        lora_linear(x, torch.randn(N, K).half(), A, B)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        lora_linear(x, weight, A, B, dropout=1.5)
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        lora_linear(x, weight, A, B, scaling=float("nan"))
    with pytest.raises(TypeError, match="NF4Weight"):
        lora_linear(x, object(), A, B)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        lora_linear(torch.ones(3, K, dtype=torch.long), weight, A, B)
    bad = make_nf4(N, K, wrap="raw")[0]
    bad.packed = bad.packed[:-1]
    with pytest.raises(ValueError, match=r"shape \(130, 200\) needs 13000 packed uint8 bytes"):
        lora_linear(x, bad, A, B)
    bad = make_nf4(N, K, wrap="raw")[0]
    bad._absmax = bad._absmax[:-1]
    with pytest.raises(ValueError, match="needs 407 float32 absmax values"):
        lora_linear(x, bad, A, B)
    with pytest.raises(ValueError, match=r"no cuda backend"):
        lora_linear(x, weight, A, B, backend="cuda")
    with pytest.raises(ValueError, match=r"bias must be floating point, got dtype torch.int64"):
        lora_linear(x, weight, A, B, bias=torch.ones(N, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown backend 'trtion'"):
        lora_linear(x, torch.randn(N, K), A, B, backend="trtion")


def test_plain_weight_says_backend_does_not_apply(monkeypatch):
    import fastlora._ext

    monkeypatch.setattr(fastlora._ext, "_warned", set())  # warn_once: fresh for this check
    w = torch.randn(N, K) / K**0.5
    x, A, B, b = make_inputs((2,), torch.float32)
    with pytest.warns(RuntimeWarning, match="plain .*weight runs torch's matmuls; backend='triton'"):
        y = lora_linear(x, w, A, B, 0.5, b, backend="triton")
    assert_close(y, lora_linear(x, w, A, B, 0.5, b, backend="reference"), rtol=0, atol=0)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_prefers_gemv_for_decode_on_cuda(monkeypatch):
    # Pretend every backend is available: the choice itself is what is tested here.
    import fastlora.backend as fb
    import fastlora.ops.lora_linear as ll
    from fastlora.ops.lora_linear import GEMV_MAX_M, _choose_backends_uncached

    monkeypatch.setattr(fb, "available", lambda b: (True, None))
    monkeypatch.setattr(ll, "_gemv_missing", lambda: None)
    cuda = torch.device("cuda")
    T, C = Backend.TRITON, Backend.CUDA
    assert _choose_backends_uncached(cuda, 1, torch.bfloat16, None) == (C, T)
    assert _choose_backends_uncached(cuda, GEMV_MAX_M, torch.float16, None) == (C, T)
    assert _choose_backends_uncached(cuda, GEMV_MAX_M + 1, torch.bfloat16, None) == (T, T)
    assert _choose_backends_uncached(cuda, 1, torch.float32, None) == (T, T)  # the GEMV is 16-bit only
    assert _choose_backends_uncached(cuda, 1, torch.bfloat16, "triton") == (T, T)
    assert _choose_backends_uncached(torch.device("cpu"), 1, torch.float32, None) == (Backend.CPP,) * 2
    assert _choose_backends_uncached(torch.device("cpu"), 1, torch.float32, "reference") == (Backend.REFERENCE,) * 2
    with pytest.raises(ValueError, match="no cuda backend"):
        _choose_backends_uncached(cuda, GEMV_MAX_M + 1, torch.bfloat16, "cuda")
    # an extension without the GEMV: Triton serves decode too, and says why
    import fastlora._ext

    monkeypatch.setattr(ll, "_gemv_missing", lambda: "no nf4_gemv")
    monkeypatch.setattr(fastlora._ext, "_warned", set())  # warn_once: fresh for this check
    with pytest.warns(RuntimeWarning, match="no nf4_gemv"):
        assert _choose_backends_uncached(cuda, 1, torch.bfloat16, None) == (T, T)
    # a dtype without a GPU kernel: the reference, and it says so
    with pytest.warns(RuntimeWarning, match="no GPU kernel for torch.float64"):
        assert _choose_backends_uncached(cuda, 1, torch.float64, None) == (Backend.REFERENCE,) * 2


def test_dispatch_picks_each_path_at_its_sizes():
    """gemv up to GEMV_MAX_M rows, the fused GEMM below DENSE_MIN_M, the dequantize-into-
    a-buffer + matmul path from DENSE_MIN_M up (and wherever the fused kernel has no
    variant: odd K, fp32 on a GPU, the CPU backends)."""
    from fastlora.ops.lora_linear import DENSE_MIN_M, GEMV_MAX_M, _path

    T, C, P, Rf = Backend.TRITON, Backend.CUDA, Backend.CPP, Backend.REFERENCE
    bf16 = torch.bfloat16
    assert 1 <= GEMV_MAX_M < DENSE_MIN_M
    for fwd in (True, False):
        assert _path(T, "cuda", GEMV_MAX_M + 1, 4096, bf16, fwd, 64) == "fused"
        assert _path(T, "cuda", DENSE_MIN_M - 1, 4096, bf16, fwd, 64) == "fused"
        assert _path(T, "cuda", DENSE_MIN_M, 4096, bf16, fwd, 64) == "buffer"
        assert _path(T, "cuda", 16384, 14336, torch.float16, fwd, 64) == "buffer"
        assert _path(T, "cuda", 8, 4096, torch.float32, fwd, 64) == "buffer"  # no fp32 GEMM variant
        assert _path(T, "cuda", 8, 4095, bf16, fwd, 64) == "buffer"  # a byte would straddle rows
        assert _path(T, "cpu", DENSE_MIN_M, 4096, torch.float32, fwd, 64) == "fused"  # interpreter tests
        assert _path(T, "cpu", 8, 200, torch.float32, fwd, 64) == "fused"  # rows not whole blocks
        # on a GPU only the spill-free variants: rows of whole blocks of >= 64 weights
        assert _path(T, "cuda", 8, 4096, bf16, fwd, 128) == "fused"
        assert _path(T, "cuda", 8, 4096, bf16, fwd, 32) == "buffer"
        assert _path(T, "cuda", 8, 4096 + 32, bf16, fwd, 64) == "buffer"
        for b in (P, Rf):
            assert _path(b, "cpu", 1, 4096, torch.float32, fwd, 64) == "buffer"
            assert _path(b, "cpu", 100000, 4096, bf16, fwd, 64) == "buffer"
    # the GEMV computes forwards only; its backward is a GEMM
    assert _path(C, "cuda", 1, 4096, bf16, True, 64) == "gemv"
    assert _path(C, "cuda", 1, 4096, bf16, False, 64) == "fused"


def test_buffer_path_reuses_one_buffer_across_layers(monkeypatch):
    """Two layers of different shapes, forward and backward: one dense-weight buffer per
    (device, dtype), sized to the largest weight, and results equal to the reference."""
    import fastlora.ops.lora_linear as ll

    ll.release_dequant_buffers()
    assert ll.dequant_buffer_bytes() == {}
    seen = []
    real = ll._DequantBuffer.get

    def spy(numel, dtype, device):
        t = real(numel, dtype, device)
        seen.append((t.untyped_storage().data_ptr(), numel))
        return t

    monkeypatch.setattr(ll._DequantBuffer, "get", spy)
    w1, d1 = make_nf4(N, K, seed=3)  # the larger weight first
    w2, d2 = make_nf4(40, K, seed=4)
    for weight, dense, n in ((w1, d1, N), (w2, d2, 40)):
        x, A, _, _ = make_inputs((5,), torch.float32)
        B = (torch.randn(n, R, generator=torch.Generator().manual_seed(2)) / R**0.5).requires_grad_()
        y = lora_linear(x, weight, A, B, 0.5, None, backend="cpp")
        y_ref = lora_linear_reference(x.double(), dense.double(), A.double(), B.double(), 0.5)
        assert_close(y, y_ref, rtol=1e-5, atol=2e-5)
        y.sum().backward()
    # each layer's forward decodes; its backward, right after, finds its decode still
    # in the buffer (a model's other layers would have overwritten it: then it decodes)
    assert len(seen) == 2
    assert len({p for p, _ in seen}) == 1, "every call must reuse the same buffer"
    assert ll.dequant_buffer_bytes() == {"cpu/float32": N * K * 4}
    # w1 again after w2 used the buffer: decoded again, and right
    x, A, B, _ = make_inputs((3,), torch.float32)
    y = lora_linear(x, w1, A, B, 0.5, None, backend="cpp")
    assert len(seen) == 3
    assert_close(y, lora_linear_reference(x.double(), d1.double(), A.double(), B.double(), 0.5), rtol=1e-5, atol=2e-5)
    # an in-place change of the weight's bytes is seen (version counter), not served stale
    with torch.no_grad():
        w1.packed[:5] ^= 0x11
    y2 = lora_linear(x, w1, A, B, 0.5, None, backend="cpp")
    assert len(seen) == 4
    assert_close(y2, lora_linear(x, w1, A, B, 0.5, None, backend="reference"), rtol=1e-6, atol=1e-6)
    ll.release_dequant_buffers()
    assert ll.dequant_buffer_bytes() == {}


def test_buffer_path_numerics_match_reference_in_float64():
    """The buffer path's matmul + addmm(alpha=scaling) is the reference's formula: in
    float64 (x, LoRA) the two agree to rounding, forward and every gradient."""
    weight, dense = make_nf4(N, K)
    x, A, B, b = make_inputs((7,), torch.float64)
    check(x, weight, dense, A, B, b, backend="cpp", dtype=torch.float64, tol=(1e-12, 1e-12))


def test_triton_refuses_cpu_tensors_unless_interpreting():
    """Compiled Triton kernels cannot take CPU tensors: without Triton's interpreter the
    library says so, instead of a launcher error deep inside Triton."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, fastlora\n"
        "from fastlora.nf4 import quantize_nf4\n"
        "w = quantize_nf4(torch.randn(8, 64), 64)\n"
        "try:\n"
        "    fastlora.lora_linear(torch.randn(2, 64), w, torch.randn(4, 64), torch.randn(8, 4), backend='triton')\n"
        "except ValueError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "REFUSED" in proc.stdout and "interpreter" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- custom ops


def _storage(weight):
    """(packed, code, absmax, state2_absmax, state2_code, offset), as the ops take it."""
    if getattr(weight, "nested", False):
        return (weight.packed, weight.code, weight.absmax, weight.state2_absmax,
                weight.state2_code, weight.offset)
    return (weight.packed, weight.code, weight.absmax_f32(), None, None, None)


def _op_args(M=5, k=40, n=24, r=4, device="cpu", dtype=torch.float32, backend="reference", wrap=None):
    weight, _ = make_nf4(n, k, blocksize=32, device=device, wrap=wrap)
    g = torch.Generator().manual_seed(8)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    st = _storage(weight)
    fwd = (mk(M, k), *st, n, 32, torch.float32, mk(M, r), mk(n, r), 0.5, mk(n), backend)
    bwd = (mk(M, n), *st, k, 32, torch.float32, mk(M, r), mk(r, k), backend)
    return fwd, bwd


@pytest.mark.parametrize("wrap", [None, "raw"])  # double-quant stats, plain fp32 stats
@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=requires_triton)])
def test_opcheck(backend, wrap):
    fwd, bwd = _op_args(backend=backend, device=device_for(backend), wrap=wrap)
    torch.library.opcheck(nf4_linear_fwd, fwd)
    torch.library.opcheck(nf4_linear_bwd_input, bwd)
    fwd_none = fwd[:10] + (None, None, 1.0, None, backend)
    torch.library.opcheck(nf4_linear_fwd, fwd_none)


# --------------------------------------------------------------------------- Triton (interpreter on CPU)

@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,bias,r", [(1, "grad", 8), (3, None, 5), (129, "frozen", 16)])
def test_triton(dtype, M, bias, r):
    dev = TRITON_DEVICE
    weight, dense = make_nf4(N, K, dtype=dtype, device=dev)
    x, A, B, b = make_inputs((M,), dtype, device=dev, r=r, bias=bias)
    check(x, weight, dense, A, B, b, backend="triton")


@requires_triton
@pytest.mark.parametrize("k,blocksize", [(192, 64), (256, 128), (199, 64)])
def test_triton_whole_block_rows_and_odd_k(k, blocksize):
    """Rows that are whole NF4 blocks (the fused kernel's one-scale-per-row tiles), and
    an odd K, which dispatch sends to the dequantize + matmul path."""
    dev = TRITON_DEVICE
    g = torch.Generator().manual_seed(12)
    from fastlora.nf4 import quantize_nf4

    q = quantize_nf4((torch.randn(N, k, generator=g) / k**0.5), blocksize, backend="cpp")
    dense = q.dequantize(backend="reference").to(dev)
    x = torch.randn(9, k, generator=g).to(dev).requires_grad_()
    A = (torch.randn(R, k, generator=g) / k**0.5).to(dev).requires_grad_()
    B = (torch.randn(N, R, generator=g) / R**0.5).to(dev).requires_grad_()
    check(x, q.to(dev), dense, A, B, None, backend="triton")


@requires_triton
def test_triton_3d_noncontiguous_mixed_lora_dtype():
    dev = TRITON_DEVICE
    weight, dense = make_nf4(N, K, dtype=torch.float32, device=dev)
    base = torch.randn(K, 5, 2, generator=torch.Generator().manual_seed(9)).to(dev, torch.float16)
    x = base.permute(2, 1, 0).requires_grad_()  # (2, 5, K), non-contiguous
    _, A, B, b = make_inputs((1,), torch.float16, device=dev, lora_dtype=torch.float32)
    check(x, weight, dense, A, B, b, backend="triton", dtype=torch.float16)


@requires_triton
def test_triton_dropout_exact():
    _dropout_case("triton", device=TRITON_DEVICE, M=5)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 3, 129, 1000])
def test_bf16_gpu_auto(M):
    weight, dense = make_nf4(N, K, dtype=torch.bfloat16, device="cuda")
    x, A, B, b = make_inputs((M,), torch.bfloat16, device="cuda")
    check(x, weight, dense, A, B, b)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [K, 256])  # scalar path (K % 32 != 0) and vector path
def test_cuda_gemv(M, dtype, k):
    from fastlora.ops.lora_linear import _gemv_missing

    if _gemv_missing() is not None:
        pytest.skip(f"CUDA GEMV not built: {_gemv_missing()}")
    weight, dense = make_nf4(N, k, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(10)
    x = torch.randn(M, k, generator=g).to("cuda", dtype)
    bias = torch.randn(N, generator=g).to("cuda", dtype)
    y = nf4_linear_fwd(x, *_storage(weight), N, BS, torch.bfloat16, None, None, 1.0, bias, "cuda")
    ref = x.double() @ dense.to(dtype).double().t() + bias.double()
    assert_close(y, ref, dtype=dtype)
    if k == K:  # through the public API: the forward runs the GEMV, the backward Triton
        x, A, B, b = make_inputs((M,), dtype, device="cuda")
        check(x, weight, dense, A, B, b, backend="cuda")


@requires_triton
def test_triton_rounds_to_weight_dtype_first():
    # bf16 weight, fp32 activations: the decoded value must be rounded to bf16 (RNE)
    # before the fp32 dot, as bitsandbytes' dequantize_4bit(W).to(x.dtype) does.
    dev = TRITON_DEVICE
    weight, dense = make_nf4(N, K, dtype=torch.bfloat16, device=dev)
    x, A, B, b = make_inputs((17,), torch.float32, device=dev)
    check(x, weight, dense, A, B, b, backend="triton", tol=(1e-5, 2e-5))


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_blocksizes(backend, blocksize):
    # blocks of 128 and 256 span rows of K = 200 (and 32 never does)
    dev = device_for(backend)
    weight, dense = make_nf4(N, K, blocksize=blocksize, device=dev)
    x, A, B, b = make_inputs((3,), torch.float32, device=dev)
    check(x, weight, dense, A, B, b, backend=backend)
