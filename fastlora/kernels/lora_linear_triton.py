"""Triton GEMM with the NF4 weight decoded in registers, and the LoRA and bias terms
fused in its epilogue. Both orientations of the fused QLoRA linear share one kernel:

    forward   y  = x ·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias     x (M, K), W (N, K) → y (M, N)
    backward  dx = dy·W  +   (s·dy·B)·A           dy (M, N)          → dx (M, K)

Written as ``out (M, P) = X (M, Q) · V (Q, P) + s·L (M, R) · Rt (R, P) + bias (P,)`` where
``V`` is a strided view of the flat NF4 weight: element (q, p) sits at flat index
``p·K + q`` (forward, TRANS_W: Wᵀ) or ``q·K + p`` (backward: W). Each (BLOCK_Q, BLOCK_P)
tile of V is decoded from the packed bytes inside the main loop, two weights per byte, rounded to the weight's dtype (RNE, as bitsandbytes' dequantize
does) and then to the activation dtype: the dense W never exists in global memory.
Flat-index decode handles K, N that are not multiples of the tile or of the NF4
blocksize, including quantization blocks that span two rows; K must be even (a byte
never straddles two rows), which lora_linear's dispatch guarantees.

Imported only after dispatch chose Triton. CPU tensors (the interpreter, for tests)
get one small fixed config; CUDA tensors are autotuned, keyed on bucketed M.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Activation dtypes the GPU dispatch sends to this kernel (as Triton names). fp32 x runs
# the dequantize + cuBLAS path on GPU: tf32 tensor-core dots of a decoded fp32 tile do
# not fit the register budget, and fp32 training on a GPU is the rare case.
GPU_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _round_to_bf16(v):
    """fp32 → nearest bf16 value (ties to even), kept in fp32. Triton 3.9's interpreter
    truncates on ``.to(tl.bfloat16)`` (even with fp_downcast_rounding="rtne"), which would
    not match bitsandbytes; compiled kernels use the native RNE cast instead. The inputs
    are finite (code·absmax), so NaN handling is not needed."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nf4_matmul_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, left_ptr, right_ptr, bias_ptr,
    # shapes (M_BUCKET only keys the autotuner)
    M, P, Q, R, M_BUCKET,
    # strides (row_stride: K, the weight's elements per row)
    stride_xm, stride_xq, stride_om, stride_op,
    stride_lm, stride_lr, stride_rr, stride_rp, row_stride,
    # scalars
    scaling,
    # NF4 format and dtypes
    BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr, BF16_RNE_BY_BITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    # flags (TRANS_W: forward, V = Wᵀ; else backward dx, V = W)
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, EVEN_Q: tl.constexpr, TRANS_W: tl.constexpr,
    ONE_SCALE: tl.constexpr,
    # tiling (from the autotuner, the single-config mode or the fixed CPU config)
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    # Grouped ordering: GROUP_SIZE_M row tiles sweep the same column tiles, so the
    # packed weight columns they share stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    num_pid_in_group = GROUP_SIZE_M * num_pid_p
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_p = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_m = offs_m < M
    mask_p = offs_p < P
    # int64 only where it must be (M·stride and N·K flat indices overflow int32 at
    # training sizes), and only in 1-D vectors kept across the loop: the 2-D indices are
    # rebuilt per tile, so no (BLOCK_Q, BLOCK_P) int64 tensor lives beside the
    # accumulator (that is what made every config spill).
    rows = offs_m.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_q[None, :] * stride_xq

    # Decode two weights per packed byte (K is even, so a byte never straddles rows):
    # both nibbles share one block scale and one address computation.
    if TRANS_W:
        # V[q, p] = W[p, q]: a tile's bytes run along q. The high nibbles are the even
        # q, the low ones the odd q: x's tile is split the same way and the K step is
        # two dots of BLOCK_Q/2, so no register shuffle interleaves the weights.
        half = tl.arange(0, BLOCK_Q // 2)
        w_row = offs_p.to(tl.int64) * row_stride  # (BP,) flat index of W[p, 0]
    else:
        # V[q, p] = W[q, p]: bytes run along p; the nibble pair joins into adjacent
        # columns.
        half = pid_p * (BLOCK_P // 2) + tl.arange(0, BLOCK_P // 2)  # byte column
        mask_half = 2 * half < P

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, tl.cdiv(Q, BLOCK_Q)):
        if EVEN_Q:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_q[None, :] < Q - q0 * BLOCK_Q), other=0.0)
        if TRANS_W:
            q_even = q0 * BLOCK_Q + 2 * half  # (BQ/2,)
            flat = w_row[None, :] + q_even[:, None]  # (BQ/2, BP)
            w_mask = mask_p[None, :] if EVEN_Q else (mask_p[None, :] & (q_even[:, None] < Q))
        else:
            q_rows = (q0 * BLOCK_Q + offs_q).to(tl.int64) * row_stride  # (BQ,)
            flat = q_rows[:, None] + 2 * half[None, :]  # (BQ, BP/2)
            w_mask = mask_half[None, :] if EVEN_Q else (mask_half[None, :] & (offs_q[:, None] < Q - q0 * BLOCK_Q))
        byte = tl.load(packed_ptr + flat // 2, mask=w_mask, other=0).to(tl.int32)
        if ONE_SCALE:
            # the tile's extent along the weight row fits in one NF4 block: one scale per
            # weight row, a 1-D load instead of a gather per byte
            if TRANS_W:
                scale = tl.load(absmax_ptr + (w_row + q0 * BLOCK_Q) // BLOCKSIZE, mask=mask_p, other=0.0)[None, :]
            else:
                scale = tl.load(absmax_ptr + (q_rows + pid_p * BLOCK_P) // BLOCKSIZE,
                                mask=offs_q < Q - q0 * BLOCK_Q, other=0.0)[:, None]
        else:
            scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=w_mask, other=0.0)
        hi = _to_operand(tl.load(code_ptr + (byte >> 4)) * scale, W_DTYPE, BF16_RNE_BY_BITS, a.dtype)
        lo = _to_operand(tl.load(code_ptr + (byte & 0xF)) * scale, W_DTYPE, BF16_RNE_BY_BITS, a.dtype)
        if TRANS_W:
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_Q // 2, 2)))
            acc = tl.dot(a_even, hi, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(a_odd, lo, acc, input_precision=DOT_PRECISION)
        else:
            w = tl.reshape(tl.join(hi, lo), (BLOCK_Q, BLOCK_P))  # column 2j high, 2j+1 low
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_Q * stride_xq

    if HAS_LORA:
        # the rank-r product L·Rt per output tile: no (M, P) LoRA buffer round trip
        lora = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for r0 in range(0, tl.cdiv(R, BLOCK_R)):
            offs_r = r0 * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            lt = tl.load(
                left_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0,
            )
            rt = tl.load(
                right_ptr + offs_r[:, None] * stride_rr + offs_p[None, :] * stride_rp,
                mask=mask_r[:, None] & mask_p[None, :], other=0.0,
            )
            lora = tl.dot(lt, rt, lora, input_precision=LORA_PRECISION)
        acc += lora * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_p[None, :] * stride_op
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


@triton.jit
def _to_operand(w, W_DTYPE: tl.constexpr, BF16_RNE_BY_BITS: tl.constexpr, A_DTYPE: tl.constexpr):
    # bitsandbytes rounds code·absmax to the weight dtype, then casts to x.dtype
    if BF16_RNE_BY_BITS:
        w = _round_to_bf16(w)
    else:
        w = w.to(W_DTYPE)
    return w.to(A_DTYPE)


_nf4_matmul = triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
        "HAS_LORA": lambda a: a["left_ptr"] is not None,
        "EVEN_Q": lambda a: a["Q"] % a["BLOCK_Q"] == 0,
        # rows are whole NF4 blocks (K % BLOCKSIZE == 0) and the tile's extent along a
        # row (BLOCK_Q forward, BLOCK_P backward) divides the blocksize
        "ONE_SCALE": lambda a: a["row_stride"] % a["BLOCKSIZE"] == 0
        and (a["BLOCK_Q"] if a["TRANS_W"] else a["BLOCK_P"]) <= a["BLOCKSIZE"],
    }
)(_nf4_matmul_kernel)


# GPU tilings. Each compiles for sm_80 and sm_90, fp16 and bf16, both orientations,
# without a register spill (tests/test_aot_compile.py): of the ten tilings this kernel
# had, and of the BLOCK_M 16..64 candidates after the decode redesign, these are the
# ones spill-free everywhere (2026-12-01). Row tiles stop at 64: from DENSE_MIN_M rows up
# (fastlora/ops/lora_linear.py) dispatch takes the dequantize-into-a-buffer + cuBLAS
# path, so this kernel serves the small and medium M of rollouts and short batches.
_CONFIG_TABLE = (
    # BLOCK_M, BLOCK_P, BLOCK_Q, warps, stages
    (16, 128, 64, 4, 3), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
)


def dispatch_configs() -> list:
    """Every config the GPU dispatch can choose (the autotuner's candidates)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_Q": bq, "GROUP_SIZE_M": 8},
                      num_warps=warps, num_stages=stages)
        for bm, bp, bq, warps, stages in _CONFIG_TABLE
    ]


def _prune(configs, named_args, **kwargs):
    # Row tiles far above the bucket waste the tensor cores on masked rows.
    cap = max(16, named_args["M_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs[:1]


_nf4_matmul_tuned = triton.autotune(
    configs=dispatch_configs(),
    key=["M_BUCKET", "P", "Q", "R", "BLOCKSIZE", "W_DTYPE", "TRANS_W"],
    prune_configs_by={"early_config_prune": _prune},
)(_nf4_matmul)

# The interpreter runs every program in numpy: small tiles, no autotuning.
_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_SIZE_M": 4}

_autotune = True


def set_autotune(enabled: bool) -> bool:
    """Autotune the fused GEMM over :func:`dispatch_configs` (default), or run one fixed
    config per M bucket (:func:`single_config`): what the GPU test run uses, so that its
    time goes to testing rather than to timing candidates. Returns the previous setting."""
    global _autotune
    prev, _autotune = _autotune, bool(enabled)
    return prev


def single_config(m_bucket: int):
    """The config used when autotuning is off: the largest row tile the bucket fills."""
    kept = _prune(dispatch_configs(), {"M_BUCKET": m_bucket})
    return max(kept, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_P"]))


def _bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, so fp32 results agree with torch's
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    N: int,
    K: int,
    blocksize: int,
    weight_dtype: torch.dtype,
    *,
    transpose_w: bool,
    lora_left: torch.Tensor | None,
    lora_right: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x·Wᵀ + s·L·Bᵀ + bias`` (transpose_w, x (M, K), L (M, r), B (N, r)) or
    ``x·W + s·L·A`` (not transpose_w, x (M, N), L (M, r), A (r, K)); W is the NF4 weight
    (N, K). Shapes are checked by fastlora.ops.lora_linear before this is called.
    Returns (M, N) or (M, K) in x.dtype."""
    if x.dtype not in _TL_DTYPE or weight_dtype not in _TL_DTYPE:
        raise ValueError(f"triton nf4_matmul supports {list(_TL_DTYPE)}, got x {x.dtype}, weight {weight_dtype}")
    M = x.shape[0]
    Q, P = (K, N) if transpose_w else (N, K)
    if x.shape[1] != Q:
        raise ValueError(f"nf4_matmul: x has shape {tuple(x.shape)}, expected (M, {Q})")
    if K % 2:
        raise ValueError(f"nf4_matmul: in_features {K} is odd; the fused kernel decodes whole bytes "
                         "(lora_linear sends odd K to the dequantize + matmul path)")
    out = torch.empty((M, P), dtype=x.dtype, device=x.device)
    if M == 0 or P == 0:
        return out
    R, s_lm, s_lr, s_rr, s_rp = 0, 0, 0, 0, 0
    if lora_left is not None:
        R = lora_left.shape[1]
        s_lm, s_lr = lora_left.stride()
        if transpose_w:  # Rt[r, p] = B[p, r]
            s_rp, s_rr = lora_right.stride()
        else:  # Rt[r, p] = A[r, p]
            s_rr, s_rp = lora_right.stride()
        if lora_left.dtype != lora_right.dtype:
            raise ValueError(f"nf4_matmul: LoRA operands {lora_left.dtype} and {lora_right.dtype} differ")
    lora_dtype = lora_left.dtype if lora_left is not None else x.dtype
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    bucket = _bucket(M)
    args = (
        x, packed, absmax, code, out, lora_left, lora_right, bias,
        M, P, Q, R, bucket,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        s_lm, s_lr, s_rr, s_rp, K,
        float(scaling),
    )
    meta = dict(
        BLOCKSIZE=blocksize, W_DTYPE=_TL_DTYPE[weight_dtype],
        BF16_RNE_BY_BITS=weight_dtype == torch.bfloat16 and x.device.type != "cuda",
        DOT_PRECISION=_precision(x.dtype), LORA_PRECISION=_precision(lora_dtype),
        BLOCK_R=min(64, max(16, triton.next_power_of_2(max(R, 1)))), TRANS_W=bool(transpose_w),
    )
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            if _autotune:
                grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(P, c["BLOCK_P"]),)  # noqa: E731
                _nf4_matmul_tuned[grid](*args, **meta)
            else:
                c = single_config(bucket)
                grid = (triton.cdiv(M, c.kwargs["BLOCK_M"]) * triton.cdiv(P, c.kwargs["BLOCK_P"]),)
                _nf4_matmul[grid](*args, **meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        c = _CPU_CONFIG
        grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(P, c["BLOCK_P"]),)
        _nf4_matmul[grid](*args, **meta, **c)
    return out
