"""Triton GEMM with the NF4 weight decoded in registers, and the LoRA and bias terms
fused in its epilogue. Both orientations of the fused QLoRA linear share one kernel:

    forward   y  = x ·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias     x (M, K), W (N, K) → y (M, N)
    backward  dx = dy·W  +   (s·dy·B)·A           dy (M, N)          → dx (M, K)

Written as ``out (M, P) = X (M, Q) · V (Q, P) + s·L (M, R) · Rt (R, P) + bias (P,)`` where
``V`` is a strided view of the flat NF4 weight: element (q, p) sits at flat index
``q·stride_wq + p·stride_wp`` (forward: Wᵀ, strides (1, K); backward: W, strides (K, 1)).
Each (BLOCK_Q, BLOCK_P) tile of V is decoded by ``nf4_decode`` from the packed bytes
inside the main loop, rounded to the weight's dtype (RNE, as bitsandbytes' dequantize
does) and then to the activation dtype: the dense W never exists in global memory.
Flat-index decode handles K, N that are not multiples of the tile or of the NF4
blocksize, including quantization blocks that span two rows.

Imported only after dispatch chose Triton. CPU tensors (the interpreter, for tests)
get one small fixed config; CUDA tensors are autotuned, keyed on bucketed M.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_triton import nf4_decode

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


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
    # strides
    stride_xm, stride_xq, stride_om, stride_op, stride_wq, stride_wp,
    stride_lm, stride_lr, stride_rr, stride_rp,
    # scalars
    scaling,
    # NF4 format and dtypes
    BLOCKSIZE: tl.constexpr, W_DTYPE: tl.constexpr, BF16_RNE_BY_BITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    # flags (from heuristics)
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, EVEN_Q: tl.constexpr,
    # tiling (from the autotuner or the fixed CPU config)
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    # Grouped ordering: GROUP_SIZE_M row tiles sweep the same column tiles, so the
    # decoded weight columns they share stay in L2.
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
    # int64: M·stride and N·K flat indices overflow int32 at training sizes
    rows = offs_m.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_q[None, :].to(tl.int64) * stride_xq
    w_idx = offs_q[:, None].to(tl.int64) * stride_wq + offs_p[None, :].to(tl.int64) * stride_wp

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, tl.cdiv(Q, BLOCK_Q)):
        if EVEN_Q:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w_mask = mask_p[None, :] & (offs_q[:, None] >= 0)
        else:
            q_left = Q - q0 * BLOCK_Q
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_q[None, :] < q_left), other=0.0)
            w_mask = (offs_q[:, None] < q_left) & mask_p[None, :]
        w = nf4_decode(packed_ptr, absmax_ptr, code_ptr, w_idx, w_mask, BLOCKSIZE)  # (BQ, BP) fp32
        # bitsandbytes rounds code·absmax to the weight dtype, then casts to x.dtype
        if BF16_RNE_BY_BITS:
            w = _round_to_bf16(w)
        else:
            w = w.to(W_DTYPE)
        w = w.to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_Q * stride_xq
        w_idx += BLOCK_Q * stride_wq

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
                right_ptr + offs_r[:, None] * stride_rr + offs_p[None, :].to(tl.int64) * stride_rp,
                mask=mask_r[:, None] & mask_p[None, :], other=0.0,
            )
            lora = tl.dot(lt, rt, lora, input_precision=LORA_PRECISION)
        acc += lora * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_p[None, :].to(tl.int64) * stride_op
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


_nf4_matmul = triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
        "HAS_LORA": lambda a: a["left_ptr"] is not None,
        "EVEN_Q": lambda a: a["Q"] % a["BLOCK_Q"] == 0,
    }
)(_nf4_matmul_kernel)


def _configs():
    """GPU tilings: small-M tiles for rollouts and short batches, large for training."""
    out = []
    for bm, bp, bq, warps, stages in (
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    ):
        out.append(triton.Config(
            {"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_Q": bq, "GROUP_SIZE_M": 8},
            num_warps=warps, num_stages=stages,
        ))
    return out


def _prune(configs, named_args, **kwargs):
    # Row tiles far above the bucket waste the tensor cores on masked rows.
    cap = max(16, named_args["M_BUCKET"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs[:1]


_nf4_matmul_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "P", "Q", "R", "BLOCKSIZE", "W_DTYPE"],
    prune_configs_by={"early_config_prune": _prune},
)(_nf4_matmul)

# The interpreter runs every program in numpy: small tiles, no autotuning.
_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_P": 32, "BLOCK_Q": 32, "GROUP_SIZE_M": 4}


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
    if transpose_w:
        Q, P, stride_wq, stride_wp = K, N, 1, K
    else:
        Q, P, stride_wq, stride_wp = N, K, K, 1
    if x.shape[1] != Q:
        raise ValueError(f"nf4_matmul: x has shape {tuple(x.shape)}, expected (M, {Q})")
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
    args = (
        x, packed, absmax, code, out, lora_left, lora_right, bias,
        M, P, Q, R, _bucket(M),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), stride_wq, stride_wp,
        s_lm, s_lr, s_rr, s_rp,
        float(scaling),
    )
    meta = dict(
        BLOCKSIZE=blocksize, W_DTYPE=_TL_DTYPE[weight_dtype],
        BF16_RNE_BY_BITS=weight_dtype == torch.bfloat16 and x.device.type != "cuda",
        DOT_PRECISION=_precision(x.dtype), LORA_PRECISION=_precision(lora_dtype),
        BLOCK_R=min(64, max(16, triton.next_power_of_2(max(R, 1)))),
    )
    if x.device.type == "cuda":
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(P, c["BLOCK_P"]),)  # noqa: E731
        with torch.cuda.device(x.device):
            _nf4_matmul_tuned[grid](*args, **meta)
    else:
        c = _CPU_CONFIG
        grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(P, c["BLOCK_P"]),)
        _nf4_matmul[grid](*args, **meta, **c)
    return out
