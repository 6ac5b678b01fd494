"""Triton NF4 kernels: dequantize and quantize, with their launchers. (The fused GEMM
decodes NF4 in its own K loop, two weights per byte: fastlora/kernels/lora_linear_triton.py.)

Every kernel is bit-exact with the pure-torch reference in ``fastlora/nf4.py``:
* products that are followed by an add (the double-quant statistics,
  ``code2[q] * absmax2 + offset``) use a multiply with an explicit rounding mode, which
  PTX never contracts into an FMA;
* divisions and reciprocals are correctly rounded (``div_rn``), as torch's are on CPU;
* casts to fp16/bf16 round to nearest even.

Imported only when dispatch has chosen the Triton backend. The launchers trust their
arguments: ``fastlora/nf4.py`` has validated them.
"""
import triton
import triton.language as tl


@triton.jit
def _mul_rn(a, b, EXACT_ASM: tl.constexpr):
    # An explicitly rounded multiply is never fused with a following add into an FMA.
    # The interpreter (CPU, numpy) has no PTX and never fuses, so it uses a plain multiply.
    if EXACT_ASM:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a * b


@triton.jit
def _block_scale(absmax_ptr, s2_absmax_ptr, s2_code_ptr, offset_ptr, blk, mask,
                 NESTED: tl.constexpr, S2_BLOCKSIZE: tl.constexpr, EXACT_ASM: tl.constexpr):
    """float32 scales of NF4 blocks ``blk``; nested statistics decoded in place as
    code2[q] * absmax2[blk // 256], then + offset (two roundings, as bitsandbytes)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(s2_code_ptr + q, mask=mask, other=0.0)
        a2 = tl.load(s2_absmax_ptr + blk // S2_BLOCKSIZE, mask=mask, other=0.0)
        return _mul_rn(c2, a2, EXACT_ASM) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


# ----------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------
@triton.jit
def _nf4_dequantize_kernel(
    # pointers
    packed_ptr, absmax_ptr, code_ptr, s2_absmax_ptr, s2_code_ptr, offset_ptr, out_ptr,
    # sizes
    n_bytes, n,
    # meta
    BLOCKSIZE: tl.constexpr, S2_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BYTES: tl.constexpr, EXACT_ASM: tl.constexpr,
):
    """Each program expands BYTES packed bytes into 2*BYTES outputs. BLOCKSIZE is even, so
    both nibbles of a byte share one block scale."""
    pid = tl.program_id(0).to(tl.int64)
    byte_idx = pid * BYTES + tl.arange(0, BYTES)  # (BYTES,) int64
    bmask = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=bmask, other=0).to(tl.int32)
    scale = _block_scale(absmax_ptr, s2_absmax_ptr, s2_code_ptr, offset_ptr, (byte_idx * 2) // BLOCKSIZE,
                         bmask, NESTED, S2_BLOCKSIZE, EXACT_ASM)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    vals = tl.reshape(tl.join(hi, lo), (2 * BYTES,))  # element 2i = high nibble of byte i
    elem = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the same integer ops on a GPU and under the
        # interpreter (whose own fp32 -> bf16 cast truncates), so the tests run this code.
        u = vals.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        out = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = vals.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + elem, out, mask=elem < n)


# packed bytes per program of the dequantize kernel (1024 outputs)
DEQUANT_BYTES = 512


def nf4_dequantize_triton(packed, absmax, code, state2_absmax, state2_code, offset, blocksize, out):
    """Fill ``out`` (any float dtype, numel n) with the NF4 weight's values."""
    n = out.numel()
    n_bytes = (n + 1) // 2
    nested = state2_absmax is not None
    BYTES = DEQUANT_BYTES
    grid = (triton.cdiv(n_bytes, BYTES),)
    dummy = absmax  # unused pointer arguments when not nested
    _nf4_dequantize_kernel[grid](
        packed, absmax, code,
        state2_absmax if nested else dummy, state2_code if nested else dummy, offset if nested else dummy,
        out, n_bytes, n,
        BLOCKSIZE=blocksize, S2_BLOCKSIZE=256, NESTED=nested, BYTES=BYTES, EXACT_ASM=out.is_cuda,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------
# Quantize
# ----------------------------------------------------------------------------------------
@triton.jit
def _nf4_quantize_kernel(
    # pointers
    x_ptr, mid_ptr, packed_ptr, absmax_ptr,
    # sizes
    n,
    # meta
    BLOCKSIZE: tl.constexpr,
):
    """One program per NF4 block, bit-exact with bitsandbytes 0.50's default/CPU path:
    full blocks multiply by the correctly rounded reciprocal of max(absmax, 1e-38) and
    store the unclamped absmax; a trailing partial block divides by its clamped absmax and
    stores that. Then code = #{k : v > mid[k]}; two codes per byte, first one high."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=0)
    amc = tl.maximum(am, 1e-38)
    is_full = (pid + 1) * BLOCKSIZE <= n
    recip = tl.math.div_rn(tl.full((BLOCKSIZE,), 1.0, tl.float32), amc)
    v = tl.where(is_full, x * recip, tl.math.div_rn(x, tl.full((BLOCKSIZE,), 1.0, tl.float32) * amc))
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    q = tl.zeros((BLOCKSIZE,), dtype=tl.int32)
    for k in tl.static_range(15):
        q += (v > tl.load(mid_ptr + k)).to(tl.int32)
    # Masked elements are 0.0, code 7: exactly bitsandbytes' pad nibble for odd n.
    hi, lo = tl.split(tl.reshape(q, (BLOCKSIZE // 2, 2)))
    byte_idx = pid * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)
    tl.store(packed_ptr + byte_idx, ((hi << 4) | lo).to(tl.uint8), mask=byte_idx < (n + 1) // 2)
    tl.store(absmax_ptr + pid, tl.where(is_full, am, amc))


def nf4_quantize_triton(weight, blocksize, midpoints, packed, absmax):
    n = weight.numel()
    _nf4_quantize_kernel[(triton.cdiv(n, blocksize),)](weight, midpoints, packed, absmax, n, BLOCKSIZE=blocksize)
    return packed, absmax


@triton.jit
def _nf4_quantize_stats_kernel(
    # pointers
    x_ptr, thr_ptr, q_ptr, absmax_ptr,
    # sizes
    n,
    # meta
    BLOCKSIZE: tl.constexpr,
):
    """Double-quant statistics, one program per block: v = x * (1/absmax), index =
    #{k : v >= T[k]} over bitsandbytes' 255 sorted CPU thresholds, found by an 8-step
    branch-free binary search. An all-zero block gives v = NaN, index 0."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    am = tl.max(tl.abs(x), axis=0)
    v = x * tl.math.div_rn(tl.full((BLOCKSIZE,), 1.0, tl.float32), am)
    idx = tl.zeros((BLOCKSIZE,), dtype=tl.int32)
    for s in tl.static_range(8):
        # 128 >> s folds to a constant per unrolled step; binding it to a constexpr name
        # would reassign that name on the second step, which compiled Triton rejects
        # (the interpreter does not: tests/test_aot_compile.py catches it).
        cand = idx + (128 >> s)
        t = tl.load(thr_ptr + (cand - 1), mask=cand <= 255, other=float("inf"))
        idx = tl.where(v >= t, cand, idx)
    tl.store(q_ptr + offs, idx.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + pid, am)


def nf4_quantize_stats_triton(x, thresholds, blocksize, q, absmax):
    n = x.numel()
    _nf4_quantize_stats_kernel[(triton.cdiv(n, blocksize),)](x, thresholds, q, absmax, n, BLOCKSIZE=blocksize)
    return q, absmax
