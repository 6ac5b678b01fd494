"""The fused QLoRA linear: ``y = x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias``.

Contract
--------
``W`` is frozen: an :class:`fastlora.NF4Weight` (bitsandbytes NF4 layout) or a plain
``[out, in]`` tensor. ``A`` ``[r, in]`` and ``B`` ``[out, r]`` are PEFT's ``lora_A`` /
``lora_B`` weights. The result matches PEFT's LoRA layer over bitsandbytes'
``Linear4bit`` (the numerics we must not change under a user):

* the NF4 weight is dequantized to its own dtype (``code·absmax`` in fp32, one RNE
  cast), then cast to ``x.dtype``; the bias is cast to ``x.dtype``;
* the LoRA branch runs in the LoRA weights' dtype (PEFT casts ``x`` to
  ``lora_A.weight.dtype``) and its result is cast back to ``x.dtype`` before the add.

Backward gives dx, dA, dB and dbias, never a gradient for W. Nothing of size
``[out, in]`` is kept between forward and backward: the backward decodes W again (in
registers on GPU). Rank-r products come first: ``(dy·B)·A``, never ``dy·(B·A)``.

Dropout keeps its mask as a bool tensor ``[M, in]`` saved for backward, and x itself
(which the caller usually keeps alive anyway) rather than ``dropout(x)``: one byte per
element instead of a second copy of x. A seed-regenerated mask would save that byte too,
but it ties exactness to reproducing one RNG stream on every backend, and a silent
mismatch there would corrupt gradients; the bool mask cannot.

Layout of this file, in flash-attention's order: the reference (the spec and the test
oracle), the compute core as ``torch.library`` ops with fake implementations (Triton
kernels live in ``fastlora/kernels/lora_linear_triton.py``, the decode GEMV in
``csrc/nf4_gemv_cuda.cu``), the ``autograd.Function``, the functional wrapper.
"""
from __future__ import annotations

import math
import sys
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from ..backend import Backend, select

__all__ = ["lora_linear", "lora_linear_reference", "GEMV_MAX_M"]

# Largest row count served by the CUDA decode GEMV, from analysis until a GPU measures
# it: the GEMV decodes each weight in every warp that reads it (~6 ops) and then spends
# ~2 ops per row on it (convert x, FMA), all on the CUDA cores, so at H200's ~33 T ops/s
# against 9.6 T packed weights/s it is memory-bound only up to M ~ 1-2; the fused GEMM
# decodes each weight once per 16-row tile (~10 ops) and multiplies on the tensor cores.
# They cross near M = 2..4 (at 16 rows the GEMV is FMA-bound and slower than cuBLAS).
GEMV_MAX_M = 4

# Activation dtypes with a GPU kernel (the fused GEMM takes fp16/bf16: fp32 on a GPU
# runs the buffer path, see lora_linear_triton.GPU_DTYPES).
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FUSED_GPU_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Reference: the spec. Pure torch, any device, any float dtype.
# ---------------------------------------------------------------------------------------


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """PEFT's LoRA layer over a dense weight, autograd by torch.

    ``weight`` is the dense (dequantized) ``[out, in]`` weight; ``dropout_mask`` (bool,
    x's shape) is the keep mask with drop probability ``dropout``.
    """
    base = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    xd = x if dropout_mask is None else _apply_dropout(x, dropout_mask, dropout)
    lora = (xd.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t() * scaling
    return base + lora.to(x.dtype)


def _apply_dropout(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    # One helper for forward and backward so both see bit-identical dropout(x).
    if p >= 1.0:
        return torch.zeros_like(x)
    return x.masked_fill(~mask, 0) * (1.0 / (1.0 - p))


# ---------------------------------------------------------------------------------------
# Compute core: torch.library ops (the NF4 matmuls with their fused epilogues).
# ---------------------------------------------------------------------------------------


# NF4 storage as the ops take it, bitsandbytes' fields as they are stored:
#   packed (uint8), code (16 fp32), absmax (fp32, or uint8 codes when double-quantized),
#   state2_absmax / state2_code / offset (the double-quant statistics, or None).
#
# Three paths compute ``x·Wᵀ`` (and ``dy·W``); _path picks one per call:
#   "gemv"   the CUDA decode GEMV (csrc/nf4_gemv_cuda.cu), forward, M <= GEMV_MAX_M;
#   "fused"  the Triton GEMM that decodes W tile by tile in registers, M < DENSE_MIN_M;
#   "buffer" W dequantized into a reused buffer (one layer's weight, see _DequantBuffer),
#            then one torch matmul (cuBLAS / MKL) with the LoRA term folded in by addmm.
# Large M is compute-bound: dequantizing is O(N·K), the GEMM O(M·N·K), so from a few
# hundred rows a materialized weight costs a few percent, and cuBLAS's GEMM is faster
# than any GEMM that decodes inside its K loop (whose decode is redone per row tile).
#
# DENSE_MIN_M, from analysis until a GPU measures it (H200, Llama-3-8B 4096x14336 bf16):
# the buffer path's fixed cost is the dequantize (read 0.5 B + write 2 B per weight,
# ~35 us at 4.8 TB/s) plus cuBLAS reading the dense W instead of the packed one (~20 us),
# ~55 us; the fused GEMM instead decodes W once per 64-row tile, ~10 integer/float ops
# per weight on the CUDA cores (~33 T ops/s): ~18 us per tile of rows, and it leaves the
# tensor cores waiting meanwhile. They cross at ~3 row tiles, ~200 rows: 256 (a bucket
# boundary of the fused kernel's autotuner). benchmarks/NOTES.md says how to measure it.
DENSE_MIN_M = 256


class _DequantBuffer:
    """The dense weight of the "buffer" path: ONE flat buffer per (device, dtype), grown
    to the largest weight seen and reused by every layer, forward and backward.

    Lifetime: from the first large-M call on a device until :func:`release_dequant_buffers`
    (or process exit). Memory: one weight, e.g. Llama-3-8B's MLP 14336 x 4096 x 2 B =
    117 MB in bf16, however many layers run. Each use is complete (dequantize, matmul)
    before the next starts on the same stream: the buffer is never read by a later
    kernel of an earlier call. Callers on several CUDA streams at once must not share it
    (fastlora issues everything on the current stream).
    """

    _buffers: dict = {}
    # what each buffer holds: (weak refs to the weight's tensors, their versions, format),
    # so a backward right after its forward (a lone layer, the last layer of a model)
    # reuses the decode. A weak ref, not an address: a freed weight's memory may be
    # reused by another weight; a version counter: in-place writes change it.
    _holds: dict = {}

    @classmethod
    def get(cls, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        buf = cls._buffers.get(key)
        if buf is None or buf.numel() < numel:
            cls._buffers.pop(key, None)  # free the old one first: peak memory is one buffer
            buf = torch.empty(numel, dtype=dtype, device=device)
            cls._buffers[key] = buf
        cls._holds.pop(key, None)  # the caller is about to overwrite it
        return buf[:numel]

    @classmethod
    def holding(cls, tensors, fmt, dtype, device) -> Optional[torch.Tensor]:
        """The buffer if it still holds exactly this weight's decode, else None."""
        key = (device, dtype)
        held = cls._holds.get(key)
        if held is None or held[2] != fmt:
            return None
        refs, versions = held[0], held[1]
        for t, ref, version in zip(tensors, refs, versions):
            if t is None:
                if ref is not None:
                    return None
            elif ref is None or ref() is not t or t._version != version:
                return None
        return cls._buffers[key][: fmt[0][0] * fmt[0][1]]

    @classmethod
    def mark(cls, tensors, fmt, dtype, device) -> None:
        refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        versions = tuple(None if t is None else t._version for t in tensors)
        cls._holds[(device, dtype)] = (refs, versions, fmt)

    @classmethod
    def nbytes(cls) -> dict:
        return {f"{d}/{str(t)[6:]}": b.numel() * b.element_size() for (d, t), b in cls._buffers.items()}


def dequant_buffer_bytes() -> dict:
    """Bytes held by the reused dequantize buffers, by ``device/dtype``."""
    return _DequantBuffer.nbytes()


def release_dequant_buffers() -> None:
    """Free the reused dequantize buffers (they come back on the next large-M call)."""
    _DequantBuffer._buffers.clear()
    _DequantBuffer._holds.clear()


def _path(b: Backend, device_type: str, M: int, K: int, dtype: torch.dtype, forward: bool, blocksize: int) -> str:
    """Which of "gemv", "fused", "buffer" computes this call (see above)."""
    if b is Backend.CUDA:
        return "gemv" if forward else _path(Backend.TRITON, device_type, M, K, dtype, forward, blocksize)
    if b is not Backend.TRITON:
        return "buffer"
    if K % 2:  # the fused kernel decodes whole bytes: a byte may not straddle two rows
        return "buffer"
    if device_type == "cuda":
        if M >= DENSE_MIN_M or dtype not in _FUSED_GPU_DTYPES:
            return "buffer"
        # The GPU variants proven spill-free (tests/test_aot_compile.py) read one block
        # scale per weight row and K tile: rows of whole blocks of at least 64 weights
        # (bitsandbytes' default is 64). Other layouts take the buffer path on a GPU.
        if K % blocksize or blocksize < 64:
            return "buffer"
    return "fused"


def _absmax_f32(absmax, state2_absmax, state2_code, offset):
    if state2_absmax is None:
        return absmax
    from ..nf4 import STATE2_BLOCKSIZE, _reference_decode_absmax

    return _reference_decode_absmax(absmax, state2_absmax, state2_code, offset, STATE2_BLOCKSIZE)


def _dense_weight(
    packed, code, absmax, state2_absmax, state2_code, offset, shape, blocksize, weight_dtype,
    out_dtype, backend: Backend,
) -> torch.Tensor:
    """Dense W in ``out_dtype`` in the reused buffer, by fastlora.nf4's dequantize
    implementation for ``backend``, rounded to the weight's dtype first (as bitsandbytes'
    ``dequantize_4bit(W).to(x.dtype)``)."""
    from ..nf4 import _dequantize_into

    n = shape[0] * shape[1]
    tensors = (packed, absmax, code, state2_absmax, state2_code, offset)
    fmt = (tuple(shape), blocksize)
    w = _DequantBuffer.holding(tensors, fmt, weight_dtype, packed.device)
    if w is None:
        dq = backend
        if dq in (Backend.TRITON, Backend.CUDA) and packed.device.type == "cuda":
            dq = Backend.CUDA if _cuda_dequant_built() else Backend.TRITON
        buf = _DequantBuffer.get(n, weight_dtype, packed.device)
        w = _dequantize_into(*tensors[:2], code, *tensors[3:], blocksize, list(shape), weight_dtype, dq.value,
                             out=buf.view(shape))
        _DequantBuffer.mark(tensors, fmt, weight_dtype, packed.device)
    w = w.view(shape)
    return w if weight_dtype == out_dtype else w.to(out_dtype)


def _cuda_dequant_built() -> bool:
    from .. import _ext

    ext = _ext.load()
    return ext is not None and hasattr(ext, "nf4_dequantize_cuda")


def _add_lora(y: torch.Tensor, left: torch.Tensor, right_t: torch.Tensor, scaling: float) -> torch.Tensor:
    """``y + scaling·(left @ right_t)``, in place. In fp32, one addmm. In 16-bit, PEFT's
    rounding: the rank-r product rounded, then scaled and rounded, then added
    (``result + lora_B(lora_A(x)) * scaling``); an addmm rounds once, and bf16 makes that
    last-bit difference visible in a patched run against PEFT's (tests/patch/test_order.py)."""
    if left.dtype == y.dtype == torch.float32:
        return y.addmm_(left, right_t, alpha=scaling)
    return y.add_(((left @ right_t) * scaling).to(y.dtype))


def _nf4_linear_fwd_impl(
    x: torch.Tensor,
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    state2_absmax: Optional[torch.Tensor],
    state2_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    out_features: int,
    blocksize: int,
    weight_dtype: torch.dtype,
    xa: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    bias: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """``x·Wᵀ + scaling·(xa·Bᵀ) + bias`` with W in NF4; x ``(M, K)``, xa ``(M, r)``,
    lora_B ``(N, r)``, bias ``(N,)``; returns ``(M, N)`` in x.dtype."""
    b = Backend(backend)
    N, K = out_features, x.shape[1]
    stats = (state2_absmax, state2_code, offset)
    path = _path(b, x.device.type, x.shape[0], K, x.dtype, True, blocksize)
    if path == "fused":
        from ..kernels.lora_linear_triton import nf4_matmul

        return nf4_matmul(
            x, packed, _absmax_f32(absmax, *stats).contiguous(), code, N, K, blocksize, weight_dtype,
            transpose_w=True, lora_left=xa, lora_right=lora_B, scaling=scaling, bias=bias,
        )
    if path == "gemv":
        y = _cuda_gemv(x, packed, absmax, *stats, code, N, K, blocksize, weight_dtype, bias)
    else:
        w = _dense_weight(packed, code, absmax, *stats, (N, K), blocksize, weight_dtype, x.dtype, b)
        y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    if xa is not None:
        y = _add_lora(y, xa, lora_B.t(), scaling)
    return y


nf4_linear_fwd = torch.library.custom_op("fastlora::nf4_linear_fwd", _nf4_linear_fwd_impl, mutates_args=())


@nf4_linear_fwd.register_fake
def _(x, packed, code, absmax, state2_absmax, state2_code, offset, out_features, blocksize,
      weight_dtype, xa, lora_B, scaling, bias, backend):
    return x.new_empty((x.shape[0], out_features))


def _nf4_linear_bwd_input_impl(
    dy: torch.Tensor,
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    state2_absmax: Optional[torch.Tensor],
    state2_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    in_features: int,
    blocksize: int,
    weight_dtype: torch.dtype,
    t: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """``dy·W + t·A`` with W in NF4; dy ``(M, N)``, t ``(M, r)``, lora_A ``(r, K)``;
    returns ``(M, K)`` in dy.dtype. ``t`` is the LoRA branch's gradient at ``x·Aᵀ``
    (already scaled); pass None when dropout sits between (the caller masks it)."""
    b = Backend(backend)
    N, K = dy.shape[1], in_features
    stats = (state2_absmax, state2_code, offset)
    if _path(b, dy.device.type, dy.shape[0], K, dy.dtype, False, blocksize) == "fused":
        from ..kernels.lora_linear_triton import nf4_matmul

        return nf4_matmul(
            dy, packed, _absmax_f32(absmax, *stats).contiguous(), code, N, K, blocksize, weight_dtype,
            transpose_w=False, lora_left=t, lora_right=lora_A, scaling=1.0, bias=None,
        )
    w = _dense_weight(packed, code, absmax, *stats, (N, K), blocksize, weight_dtype, dy.dtype, b)
    dx = dy @ w
    if t is not None:
        dx = _add_lora(dx, t, lora_A, 1.0)
    return dx


nf4_linear_bwd_input = torch.library.custom_op(
    "fastlora::nf4_linear_bwd_input", _nf4_linear_bwd_input_impl, mutates_args=()
)


@nf4_linear_bwd_input.register_fake
def _(dy, packed, code, absmax, state2_absmax, state2_code, offset, in_features, blocksize,
      weight_dtype, t, lora_A, backend):
    return dy.new_empty((dy.shape[0], in_features))


def _eager(t: torch.Tensor) -> bool:
    # Eager calls on plain tensors run the implementations directly: a custom op's Python
    # dispatch costs tens of microseconds, more than a decode-sized kernel. torch.compile,
    # fake tensors and tensor subclasses go through the registered ops (and fake kernels).
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _cuda_gemv(x, packed, absmax, state2_absmax, state2_code, offset, code, N, K, blocksize, weight_dtype, bias):
    """Decode-sized ``x·Wᵀ (+ bias)`` by the CUDA kernel of csrc/nf4_gemv_cuda.cu, which
    decodes double-quantized statistics itself (no per-call torch ops for them)."""
    from .. import _ext

    why = _gemv_missing()
    if why is not None:
        raise RuntimeError(f"the NF4 decode GEMV cannot run: {why}")
    ext = _ext.load()
    M = x.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    nested = state2_absmax is not None
    with torch.cuda.device(x.device):  # the launch goes to the current device
        ext.nf4_gemv(
            x.data_ptr(), x.stride(0), packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
            state2_absmax.data_ptr() if nested else 0, state2_code.data_ptr() if nested else 0,
            offset.data_ptr() if nested else 0,
            0 if b is None else b.data_ptr(), y.data_ptr(),
            M, N, K, blocksize, _GEMV_DTYPE[x.dtype], _GEMV_DTYPE[weight_dtype],
            torch.cuda.current_stream(x.device).cuda_stream,
        )
    return y


# dtype codes shared with csrc/nf4_gemv_cuda.cu
_GEMV_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


def _nf4_storage(w):
    """A frozen NF4 weight as the autograd Function takes it: the weight's own tensors
    (saved for backward as they are: no new memory) and its metadata.

    Double-quantized statistics stay in their 8-bit form between forward and backward
    and are decoded in each: keeping an fp32 absmax alive would cost 4 bytes per 64
    weights per layer, about 1/32 of a bf16 model.

    A :class:`fastlora.NF4Weight` keeps the result (it was validated when built, and its
    tensors are fixed): ``fastlora.patch`` keeps one view per layer, so a decode step
    does not rebuild or re-check the storage of every layer."""
    cached = getattr(w, "_lora_storage", None)
    if cached is not None:
        return cached
    shape = (int(w.shape[0]), int(w.shape[1]))
    if getattr(w, "nested", False):  # fastlora.NF4Weight with double quantization
        tensors = (w.packed, w.code, w.absmax, w.state2_absmax, w.state2_code, w.offset)
    else:
        tensors = (w.packed, w.code, w.absmax_f32(), None, None, None)
    # the kernels index packed and code flat (no-ops for bnb's storage)
    tensors = tuple(None if t is None else t.contiguous() for t in tensors)
    result = tensors, (shape, int(w.blocksize), w.dtype)
    if _is_nf4weight(w):
        w._lora_storage = result
    return result


def _is_nf4weight(w) -> bool:
    nf4 = sys.modules.get("fastlora.nf4")  # loaded whenever an NF4Weight exists
    return nf4 is not None and type(w) is nf4.NF4Weight


def _forward(x, dense, lora_A, lora_B, bias, meta, wt):
    """The forward of :class:`LoRALinearFunction`: (y, dropout mask or None, xa). Called
    directly, without the autograd Function, when nothing needs a gradient (inference,
    generation), so a decode step pays for no autograd bookkeeping."""
    scaling, p, wmeta, fwd_backend, _ = meta
    (N, K), blocksize, wdtype = wmeta
    mask = None
    if p > 0.0:
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
    xd = x if mask is None else _apply_dropout(x, mask, p)
    xa = xd.to(lora_A.dtype) @ lora_A.t()  # (M, r) in the LoRA dtype
    if dense is not None:
        y = F.linear(x, dense, None if bias is None else bias.to(x.dtype))
        y = y + ((xa @ lora_B.t()) * scaling).to(x.dtype)
    else:
        op = _nf4_linear_fwd_impl if _eager(x) else nf4_linear_fwd
        y = op(x, *wt, N, blocksize, wdtype, xa, lora_B, scaling, bias, fwd_backend.value)
    return y, mask, xa


class LoRALinearFunction(torch.autograd.Function):
    """Inputs: x2d ``(M, K)``; ``dense`` (the plain ``(N, K)`` weight, or None); A
    ``(r, K)``; B ``(N, r)``; bias ``(N,)`` or None; ``meta`` (scaling, dropout p, the
    weight's shape/blocksize/dtype, forward and backward backends); then, for an NF4
    weight, its storage tensors as :func:`_nf4_storage` lists them.

    With ``xd = dropout(x) = x⊙m/(1-p)``, ``xa = xd·Aᵀ`` and
    ``y = x·Wᵀ + s·xa·Bᵀ + b``, for upstream ``dy``:

        dB    = s·dyᵀ·xa                  (N, r)
        dxa   = s·dy·B                    (M, r)   rank-r first: never forms B·A
        dA    = dxaᵀ·xd                   (r, K)
        dx    = dy·W + (dxa·A)⊙m/(1-p)    (M, K)   W decoded again, never saved
        dbias = Σ_rows dy                 (N,)
    """

    @staticmethod
    def forward(ctx, x, dense, lora_A, lora_B, bias, meta, *wt):
        y, mask, xa = _forward(x, dense, lora_A, lora_B, bias, meta, wt)
        ctx.save_for_backward(x, mask, xa, dense, lora_A, lora_B, *wt)
        ctx.meta = meta
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mask, xa, dense, lora_A, lora_B, *wt = ctx.saved_tensors
        scaling, p, wmeta, fwd_backend, bwd_backend = ctx.meta
        (N, K), blocksize, wdtype = wmeta
        need_x, _, need_A, need_B, need_bias = ctx.needs_input_grad[:5]

        g = dy.to(lora_B.dtype)  # (M, N): PEFT's LoRA branch runs in its own dtype
        # the products with the scaling folded in (one BLAS call each, alpha = scaling)
        zero = g.new_zeros(())
        dB = torch.addmm(zero, g.t(), xa, beta=0, alpha=scaling) if need_B else None  # (N, r)
        dxa = torch.addmm(zero, g, lora_B, beta=0, alpha=scaling) if (need_A or need_x) else None  # (M, r)
        dA = None
        if need_A:
            xd = x if mask is None else _apply_dropout(x, mask, p)
            dA = dxa.t() @ xd.to(lora_A.dtype)  # (r, K)

        dx = None
        if need_x:
            # Without dropout the LoRA term joins the base GEMM's epilogue; with it, the
            # mask applies to that term alone.
            fused = mask is None
            if dense is not None:
                dx = dy @ dense
            else:
                op = _nf4_linear_bwd_input_impl if _eager(dy) else nf4_linear_bwd_input
                dx = op(dy, *wt, K, blocksize, wdtype, dxa if fused else None, lora_A if fused else None,
                        bwd_backend.value)
            if dense is not None and fused:
                dx = dx + (dxa @ lora_A).to(dx.dtype)
            elif not fused:
                dx = dx + _apply_dropout((dxa @ lora_A).to(dx.dtype), mask, p)

        dbias = None
        if need_bias:
            dbias = dy.sum(0).to(ctx.bias_dtype)
        return (dx, None, dA, dB, dbias, None) + (None,) * len(wt)


# ---------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------


def _fmt(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _is_nf4(weight) -> bool:
    return not isinstance(weight, torch.Tensor) and all(
        hasattr(weight, a) for a in ("packed", "absmax_f32", "code", "shape", "blocksize", "dtype")
    )


def _check(x, weight, lora_A, lora_B, scaling, bias, dropout):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension [..., in], got shape {_fmt(x.shape)}")
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out, in], got shape {_fmt(weight.shape)}")
        if weight.dtype != x.dtype:
            raise ValueError(
                f"weight has dtype {weight.dtype} but x has dtype {x.dtype}; a plain weight "
                "must match x (as in nn.Linear)"
            )
        if weight.requires_grad:
            raise ValueError(
                f"weight (shape {_fmt(weight.shape)}) requires grad, but lora_linear treats "
                "the base weight as frozen and never computes its gradient; freeze it "
                "(weight.requires_grad_(False)) or use a plain linear layer"
            )
        N, K = weight.shape
        wdev = weight.device
    elif _is_nf4(weight):
        if len(weight.shape) != 2:
            raise ValueError(f"NF4 weight must be [out, in], got shape {_fmt(weight.shape)}")
        N, K = int(weight.shape[0]), int(weight.shape[1])
        wdev = weight.packed.device
    else:
        raise TypeError(
            f"weight must be a torch.Tensor [out, in] or an NF4Weight, got {type(weight).__name__}"
        )
    if x.shape[-1] != K:
        raise ValueError(
            f"x has shape {_fmt(x.shape)} (in_features {x.shape[-1]}) but weight has shape "
            f"{_fmt((N, K))} (in_features {K})"
        )
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {_fmt(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(
            f"lora_A has shape {_fmt(lora_A.shape)} but x has in_features {K} "
            f"(x shape {_fmt(x.shape)}); lora_A must be [r, in]"
        )
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"lora_B has shape {_fmt(lora_B.shape)} but weight has out_features {N} and "
            f"lora_A has shape {_fmt(lora_A.shape)} (rank {r}); lora_B must be [out, r] = {_fmt((N, r))}"
        )
    if lora_A.dtype != lora_B.dtype:
        raise ValueError(
            f"lora_A has dtype {lora_A.dtype} (shape {_fmt(lora_A.shape)}) but lora_B has dtype "
            f"{lora_B.dtype} (shape {_fmt(lora_B.shape)}); they must match"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise ValueError(f"bias must be floating point, got dtype {bias.dtype} (shape {_fmt(bias.shape)})")
        if tuple(bias.shape) != (N,):
            raise ValueError(
                f"bias has shape {_fmt(bias.shape)} but weight has shape {_fmt((N, K))}; "
                f"bias must be ({N},)"
            )
    for name, t in (("weight", None), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        dev = wdev if name == "weight" else (None if t is None else t.device)
        if dev is not None and dev != x.device:
            raise ValueError(f"{name} is on {dev} but x is on {x.device}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    return N, K


def _check_nf4(wmeta, tensors, x: torch.Tensor):
    shape, blocksize, dtype = wmeta
    packed, code, absmax = tensors[:3]  # absmax: uint8 codes when nested, else fp32
    nested = tensors[3] is not None
    n = shape[0] * shape[1]
    if packed.dtype != torch.uint8 or packed.numel() < (n + 1) // 2:
        raise ValueError(
            f"NF4 weight of shape {_fmt(shape)} needs {(n + 1) // 2} packed uint8 bytes, "
            f"got packed of shape {_fmt(packed.shape)} and dtype {packed.dtype}"
        )
    nblocks = -(-n // blocksize) if blocksize > 0 else -1
    want = torch.uint8 if nested else torch.float32
    if blocksize <= 0 or absmax.numel() != nblocks or absmax.dtype != want:
        raise ValueError(
            f"NF4 weight of shape {_fmt(shape)} with blocksize {blocksize} needs "
            f"{nblocks} {str(want)[6:]} absmax values, got shape {_fmt(absmax.shape)} dtype {absmax.dtype}"
        )
    if code.numel() != 16 or code.dtype != torch.float32:
        raise ValueError(
            f"NF4 code table must be 16 float32 values, got shape {_fmt(code.shape)} dtype {code.dtype}"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"NF4 weight dtype must be floating point, got {dtype}")
    for t in tensors:
        if t is not None and t.device != x.device:
            raise ValueError(f"NF4 weight storage is on {t.device} but x is on {x.device}")


def _gemv_missing() -> Optional[str]:
    """Why the CUDA decode GEMV cannot run, or None."""
    from .. import _ext

    why = _ext.missing_reason(cuda=True)
    if why is None and not hasattr(_ext.load(), "nf4_gemv"):
        why = "fastlora._C has CUDA kernels but no nf4_gemv (built without csrc/nf4_gemv_cuda.cu)"
    return why


_CHOICES: dict = {}


def _choose_backends(device, M, dtype, backend):
    """(forward, backward) backends for the NF4 path. The choice depends only on the
    arguments below, the forced backend and what is installed, so it is made once per
    combination (a decode step asks for it in every layer)."""
    from ..backend import _forced

    key = (device, M <= GEMV_MAX_M, dtype, backend, _forced.get())
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _CHOICES[key] = _choose_backends_uncached(device, M, dtype, backend)
    return hit


def _choose_backends_uncached(device, M, dtype, backend):
    if device.type == "cuda":
        gpu_ok = dtype in _TRITON_DTYPES
        if not gpu_ok and Backend.parse(backend) in (None, Backend.AUTO):
            from .. import _ext

            _ext.warn_once(
                f"lora_linear:gpu-dtype:{dtype}",
                f"fastlora: lora_linear has no GPU kernel for {dtype} (it has {list(_TRITON_DTYPES)}); "
                "it runs the pure-torch reference",
            )
        prefs = [Backend.TRITON]
        if M <= GEMV_MAX_M and dtype != torch.float32:
            why = _gemv_missing()
            if why is None:
                prefs = [Backend.CUDA, Backend.TRITON]
            else:
                from .. import _ext

                _ext.warn_once(
                    "lora_linear:gemv",
                    f"fastlora: lora_linear runs decode shapes (M <= {GEMV_MAX_M}) with the "
                    f"Triton GEMM instead of the CUDA GEMV: {why}",
                )
        fwd = select("lora_linear", device, prefs if gpu_ok else [], backend)
        if fwd is Backend.CUDA:
            # the GEMV serves x·Wᵀ only; dy·W is a GEMM over the same decode in Triton
            bwd = select("lora_linear.backward", device, [Backend.TRITON], Backend.AUTO)
        else:
            bwd = fwd
        return fwd, bwd
    prefs = [Backend.CPP]
    req = Backend.parse(backend)
    if req is Backend.TRITON:  # the interpreter, for tests
        prefs = [Backend.TRITON] + prefs
    fwd = select("lora_linear", device, prefs, backend)
    if fwd is Backend.TRITON and dtype not in _TRITON_DTYPES:
        raise ValueError(f"lora_linear: the triton backend supports {list(_TRITON_DTYPES)}, x has dtype {dtype}")
    return fwd, fwd


def lora_linear(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    *,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """``x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias``, differentiable in x, A, B, bias.

    Args:
        x: ``(..., in)``, any leading dims, any strides.
        weight: frozen ``NF4Weight`` or tensor ``(out, in)`` (same dtype as x).
        lora_A: ``(r, in)``; lora_B: ``(out, r)`` (PEFT layout, same dtype as each other).
        scaling: LoRA's ``alpha / r``.
        bias: ``(out,)`` or None (cast to x.dtype, as bitsandbytes does).
        dropout: drop probability of the LoRA input, as ``F.dropout(training=True)``;
            pass 0.0 in eval.
        backend: force a backend (see :mod:`fastlora.backend`); default AUTO.

    Returns:
        ``(..., out)`` in x.dtype.
    """
    N, K = _check(x, weight, lora_A, lora_B, scaling, bias, dropout)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)  # (M, K); a view when x's strides allow
    M = x2d.shape[0]
    if isinstance(weight, torch.Tensor):
        dense, wt = weight, ()
        wmeta = ((N, K), 0, weight.dtype)
        fwd_b = bwd_b = Backend.REFERENCE  # dense matmuls are torch's (cuBLAS / MKL)
        req = Backend.parse(backend)  # a misspelled name still raises
        if req not in (None, Backend.AUTO, Backend.REFERENCE):
            from .. import _ext

            _ext.warn_once(
                f"lora_linear:dense:{req.value}",
                f"fastlora: lora_linear with a plain (unquantized) weight runs torch's matmuls; "
                f"backend={req.value!r} applies to NF4 weights only",
            )
    else:
        wt, wmeta = _nf4_storage(weight)
        if not _is_nf4weight(weight):  # an NF4Weight checked all of this when it was built
            _check_nf4(wmeta, wt, x)
        dense = None
        fwd_b, bwd_b = _choose_backends(x.device, M, x.dtype, backend)
        # -- decode on CPU (issue 12): a few rows and no autograd -> the NF4 GEMV, which
        #    reads W packed instead of dequantizing it (fastlora/ops/nf4_gemv.py)
        if fwd_b is Backend.CPP:
            from . import nf4_gemv

            if nf4_gemv.applies(x2d, lora_A, lora_B, bias, dropout):
                y = nf4_gemv.lora_gemv_cpu(x2d, weight, lora_A, lora_B, float(scaling), bias)
                return y.reshape(*lead, N)  # (..., N)
    meta = (float(scaling), float(dropout), wmeta, fwd_b, bwd_b)
    if torch.is_grad_enabled() and (
        x2d.requires_grad or lora_A.requires_grad or lora_B.requires_grad or (bias is not None and bias.requires_grad)
    ):
        y = LoRALinearFunction.apply(x2d, dense, lora_A, lora_B, bias, meta, *wt)
    else:
        y = _forward(x2d, dense, lora_A, lora_B, bias, meta, wt)[0]
    return y.reshape(*lead, N)  # (..., N)
