"""The NF4 decode GEMV on CPU: ``y = x·Wᵀ (+ bias)`` for a few rows of x, W never materialized.

Contract
--------
x ``(M, K)`` float, W a frozen :class:`fastlora.NF4Weight` ``[N, K]`` on CPU, bias ``(N,)``
or None. The result is what ``F.linear(x, W.dequantize().to(x.dtype), bias.to(x.dtype))``
gives, up to the order of the fp32 sums: each weight is decoded as in the reference
(``code·absmax`` in fp32, rounded to the weight's dtype), products accumulate in fp32,
and the sum is rounded once to x's dtype. No gradient: the decode path runs without
autograd (``lora_linear`` sends only such calls here).

Why: a decode step multiplies every weight of the model by a handful of rows.
Dequantize-then-matmul writes and re-reads 4 bytes per weight; the kernel
(``csrc/nf4_gemv_cpu.cpp``: AVX-512 / AVX2 / scalar chosen at run time, threads over
output features) reads the ~0.5 byte of packed NF4 once.

Layout: the reference (the spec and the test oracle), the ``torch.library`` op with its
fake, the launcher, and :func:`lora_gemv_cpu` (the op plus the LoRA term) that
``fastlora.ops.lora_linear`` calls for small no-grad CPU calls.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["nf4_gemv_reference", "nf4_gemv", "lora_gemv_cpu", "applies", "CPU_GEMV_MAX_M", "ISA"]

# Largest row count sent to the CPU GEMV. Above it dequantize + MKL GEMM wins: the
# decoded weights are reused across enough rows to pay for writing them. Measured on the
# 2-core dev machine with SmolLM2 shapes (scripts/measure_generation.py): at 32 rows (the
# SFT evaluation's batch) a whole greedy evaluation still took ~14% less CPU time with
# the GEMV than with dequantize + GEMM.
CPU_GEMV_MAX_M = 32

# Instruction-set codes of csrc/nf4_gemv_cpu.cpp
ISA = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2}

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------


def nf4_gemv_reference(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The spec: dequantize (bit-exact with bitsandbytes) then ``F.linear`` in x's dtype."""
    w = weight.dequantize(backend="reference").to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------
# torch.library op
# ---------------------------------------------------------------------------------------


def _impl(x, packed, code, absmax, state2_absmax, state2_code, offset, out_features, blocksize,
          state2_blocksize, weight_dtype, bias, isa):
    from .. import _ext

    ext = _ext.require("the CPU NF4 GEMV")
    M, K = x.shape
    N = out_features
    xf = x if x.dtype == torch.float32 else x.float()
    if xf.stride(1) != 1:
        xf = xf.contiguous()
    y = torch.empty((M, N), dtype=torch.float32)
    b = None
    if bias is not None:
        b = bias.to(x.dtype).float().contiguous()  # F.linear adds bias.to(x.dtype)
    nested = state2_absmax is not None
    ext.nf4_gemv_cpu(
        xf.data_ptr(), xf.stride(0), M, packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
        state2_absmax.data_ptr() if nested else 0, state2_code.data_ptr() if nested else 0,
        float(offset) if nested else 0.0, nested, state2_blocksize, N, K, blocksize,
        _DTYPE_CODE[weight_dtype], _DTYPE_CODE[x.dtype], 0 if b is None else b.data_ptr(), y.data_ptr(), N, isa,
        torch.get_num_threads(),
    )
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@torch.library.custom_op("fastlora::nf4_gemv_cpu", mutates_args=())
def _nf4_gemv_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    state2_absmax: Optional[torch.Tensor],
    state2_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    out_features: int,
    blocksize: int,
    state2_blocksize: int,
    weight_dtype: torch.dtype,
    bias: Optional[torch.Tensor],
    isa: int,
) -> torch.Tensor:
    """``x·Wᵀ + bias`` in x.dtype; x ``(M, K)`` on CPU, W's NF4 storage as stored."""
    return _impl(x, packed, code, absmax, state2_absmax, state2_code, offset, out_features, blocksize,
                 state2_blocksize, weight_dtype, bias, isa)


@_nf4_gemv_op.register_fake
def _(x, packed, code, absmax, state2_absmax, state2_code, offset, out_features, blocksize,
      state2_blocksize, weight_dtype, bias, isa):
    return x.new_empty((x.shape[0], out_features))


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


def _storage(weight):
    w = weight
    packed = w.packed if w.packed.is_contiguous() else w.packed.contiguous()
    return (packed, w.code.contiguous(), w.absmax.contiguous(),
            None if not w.nested else w.state2_absmax.contiguous(),
            None if not w.nested else w.state2_code.contiguous(),
            None if not w.nested else w.offset)


def nf4_gemv(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None, *, isa: str = "auto") -> torch.Tensor:
    """``x·Wᵀ + bias`` by the CPU kernel. x ``(M, K)`` float on CPU; weight an NF4Weight
    ``[N, K]`` on CPU; bias ``(N,)`` or None. Returns ``(M, N)`` in x.dtype.

    ``isa`` forces a code path (``"scalar"``, ``"avx2"``, ``"avx512"``; tests) or lets the
    kernel pick the best one the CPU has (``"auto"``)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"nf4_gemv: x must be a 2-D float tensor (M, K), got "
                         f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}")
    if x.dtype not in _DTYPE_CODE:
        raise ValueError(f"nf4_gemv: x dtype {x.dtype} is not one of {list(_DTYPE_CODE)}")
    N, K = int(weight.shape[0]), int(weight.shape[1])
    if x.shape[1] != K:
        raise ValueError(f"nf4_gemv: x has shape {tuple(x.shape)} but the weight has shape {(N, K)}")
    if x.device.type != "cpu" or weight.packed.device.type != "cpu":
        raise ValueError(f"nf4_gemv: the CPU kernel needs CPU tensors, got x on {x.device} and the "
                         f"weight on {weight.packed.device}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"nf4_gemv: bias has shape {tuple(bias.shape)}, expected ({N},)")
    if isa not in ISA:
        raise ValueError(f"nf4_gemv: isa {isa!r} is not one of {list(ISA)}")
    if weight.blocksize % 2:
        raise ValueError(f"nf4_gemv: blocksize {weight.blocksize} must be even")
    code = ISA[isa]
    if code >= 0:
        from .. import _ext

        if not _ext.require("the CPU NF4 GEMV").nf4_gemv_cpu_isa_available(code):
            raise RuntimeError(f"nf4_gemv: this CPU has no {isa} instructions")
    args = (x, *_storage(weight), N, weight.blocksize, weight.state2_blocksize, weight.dtype, bias, code)
    if torch.compiler.is_compiling():
        return _nf4_gemv_op(*args)
    # Eager calls skip the op's dispatcher round trip (~10 µs): a decode step makes
    # 7 of these per layer, and at M=1 the kernel itself takes tens of µs.
    return _impl(*args)


# ---------------------------------------------------------------------------------------
# The decode branch of lora_linear
# ---------------------------------------------------------------------------------------


def applies(x2d: torch.Tensor, lora_A, lora_B, bias, dropout: float) -> bool:
    """Whether a ``lora_linear`` call is a CPU decode call this kernel serves: few rows,
    no autograd to record, no dropout, and a built kernel."""
    if x2d.shape[0] > CPU_GEMV_MAX_M or x2d.device.type != "cpu" or dropout > 0.0:
        return False
    if x2d.dtype not in _DTYPE_CODE or x2d.shape[0] == 0:
        return False
    # Only under no_grad / inference_mode (generation, evaluation). A training forward that
    # records nothing for this call (a frozen first layer, fastlora.patch's split path that
    # reproduces PEFT's rounding) keeps bitsandbytes' dequantize + matmul numerics: the
    # kernel's fp32 summation order differs in the last bits, which bf16 then magnifies.
    if torch.is_grad_enabled():
        return False
    return _kernel_built()


def _kernel_built() -> bool:
    from .. import _ext

    mod = _ext.load()
    return mod is not None and hasattr(mod, "nf4_gemv_cpu")


def lora_gemv_cpu(x2d: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  scaling: float, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x·Wᵀ + bias + scaling·(x·Aᵀ)·Bᵀ`` with the LoRA product in the adapter's dtype
    and cast back, exactly as ``LoRALinearFunction.forward`` orders it; ``(M, N)``."""
    # lora_linear has checked every argument: straight to the kernel
    y = _impl(x2d, *_storage(weight), int(weight.shape[0]), weight.blocksize, weight.state2_blocksize,
              weight.dtype, bias, ISA["auto"])
    xa = x2d.to(lora_A.dtype) @ lora_A.t()  # (M, r)
    return y + ((xa @ lora_B.t()) * scaling).to(y.dtype)
