"""Triton NF4 kernels: the in-register decode helper shared by every GEMM kernel,
and the dequantize / quantize kernels with their launchers.

Imported only when dispatch has chosen the Triton backend.
"""
import triton
import triton.language as tl


@triton.jit
def nf4_decode(packed_ptr, absmax_ptr, code_ptr, idx, mask, BLOCKSIZE: tl.constexpr):
    """fp32 values of the NF4 weight at flat row-major indices ``idx`` (int64 tensor of
    any shape); 0 where ``mask`` is False.

    bnb packs element 2i in the high nibble of byte i; blocks are runs of BLOCKSIZE
    elements of the flattened [N, K] weight (a block may span two rows). The product is
    code * absmax in fp32, as every bnb backend computes it; the caller rounds it to the
    weight's dtype.
    """
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where((idx % 2) == 0, byte >> 4, byte & 0xF)
    scale = tl.load(absmax_ptr + idx // BLOCKSIZE, mask=mask, other=0.0)
    value = tl.load(code_ptr + nib, mask=mask, other=0.0)
    return value * scale
