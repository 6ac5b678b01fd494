"""Triton row kernel for cross-entropy on logits: online logsumexp over vocab blocks,
loss, optional entropy / argmax, and dLoss/dlogits written (optionally in place).

One program per row. Pass 1 streams the row once in BLOCK_V blocks with an online
max / sum-of-exp (plus the row sum for label smoothing, and sum p*x for entropy), so
any vocab size works in O(BLOCK_V) registers; the last block is masked, V need not
be a power of two. Pass 2 (only when a gradient is asked) streams the row again and
writes, for x = softcap(scale*y)*inv_temp, p = softmax(x), g = upstream row gradient:

    dL/dx_j = g * (p_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == label])
              - g_ent * p_j * (x_j - E_p[x])                       (entropy term)
    dL/dy_j = dL/dx_j * inv_temp * (1 - tanh(scale*y_j/softcap)**2) * scale

Pass 2 reads each block before writing it, so the gradient may overwrite y in place.
Row offsets are int64: rows x vocab exceeds 2**31 at Llama-3 sizes. All arithmetic is
fp32 whatever the storage dtype. Contract identical to ``ce_rows_torch`` in
``fastlora/ops/cross_entropy.py``; the launcher trusts the checks done there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest vocab block per program; a module constant so tests can shrink it to force
# several blocks (and a partial last block) at small V.
MAX_BLOCK_V = 4096


@triton.jit
def _transform(y, scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """x = softcap(scale * y) * inv_temp, and t = tanh(scale*y/softcap) (1 if no cap)."""
    z = y.to(tl.float32) * scale
    if HAS_SOFTCAP:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits +-1 for large |u|, no tl.tanh needed
        t = 1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0)
        z = softcap * t
    else:
        t = z * 0.0 + 1.0
    return z * inv_temp, t


@triton.jit
def _ce_rows_kernel(
    # pointers
    y_ptr, labels_ptr, loss_ptr, lse_ptr, ent_ptr, argmax_ptr, g_loss_ptr, g_ent_ptr, grad_ptr,
    # shapes
    V,
    # strides (rows; columns are contiguous)
    stride_y, stride_grad,
    # scalars
    ignore_index, label_smoothing, z_loss, softcap, scale, inv_temp,
    # meta
    BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    LSE_GIVEN: tl.constexpr,  # backward: lse (and ent) are loaded, pass 1 is skipped
    WANT_ENTROPY: tl.constexpr,
    WANT_ARGMAX: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * stride_y
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    cols0 = tl.arange(0, BLOCK_V)

    if LSE_GIVEN:
        lse = tl.load(lse_ptr + row).to(tl.float32)
        if HAS_G_ENT:
            ent = tl.load(ent_ptr + row).to(tl.float32)
    else:
        m = float("-inf")
        s = 0.0
        sum_x = 0.0
        sum_ex = 0.0
        best = float("-inf")
        best_idx = 0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            x, _t = _transform(tl.load(y_row + cols, mask=mask, other=0.0), scale, softcap, inv_temp, HAS_SOFTCAP)
            xm = tl.where(mask, x, float("-inf"))
            bmax = tl.max(xm, 0)
            m_new = tl.maximum(m, bmax)
            alpha = tl.exp(m - m_new)
            e = tl.exp(xm - m_new)  # 0 on masked lanes
            s = s * alpha + tl.sum(e, 0)
            x0 = tl.where(mask, x, 0.0)
            sum_x += tl.sum(x0, 0)
            if WANT_ENTROPY:
                sum_ex = sum_ex * alpha + tl.sum(e * x0, 0)
            if WANT_ARGMAX:
                bidx = tl.argmax(xm, 0)
                # strict '>' keeps the first index of a tie across blocks, as torch.argmax
                best_idx = tl.where(bmax > best, v0 + bidx, best_idx)
                best = tl.maximum(best, bmax)
            m = m_new
        lse = m + tl.log(s)
        safe = tl.where(valid, label, 0)
        x_t, _t = _transform(tl.load(y_row + safe), scale, softcap, inv_temp, HAS_SOFTCAP)
        loss = lse - x_t
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / V)
        loss += z_loss * lse * lse
        loss = tl.where(valid, loss, 0.0)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if WANT_ENTROPY:
            ent = lse - sum_ex / s
            tl.store(ent_ptr + row, ent)
        if WANT_ARGMAX:
            tl.store(argmax_ptr + row, best_idx.to(tl.int64))

    if COMPUTE_GRAD:
        g = tl.load(g_loss_ptr + row).to(tl.float32)
        g = tl.where(valid, g, 0.0)
        coef = g * (1.0 + 2.0 * z_loss * lse)
        smooth = g * label_smoothing / V
        hit = g * (1.0 - label_smoothing)
        if HAS_G_ENT:
            g_ent = tl.load(g_ent_ptr + row).to(tl.float32)
            mean_x = lse - ent
        grad_row = grad_ptr + row * stride_grad
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            x, t = _transform(tl.load(y_row + cols, mask=mask, other=0.0), scale, softcap, inv_temp, HAS_SOFTCAP)
            p = tl.exp(x - lse)
            d = p * coef - smooth - tl.where(cols == label, hit, 0.0)
            if HAS_G_ENT:
                d -= g_ent * p * (x - mean_x)
            d = d * inv_temp
            if HAS_SOFTCAP:
                d = d * (1.0 - t * t)
            d = d * scale
            tl.store(grad_row + cols, d.to(grad_ptr.dtype.element_ty), mask=mask)


def ce_rows(
    y,
    labels,
    *,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    scale=1.0,
    inv_temp=1.0,
    lse=None,
    g_loss=None,
    g_ent=None,
    ent=None,
    grad_out=None,
    want_entropy=False,
    want_argmax=False,
):
    """Launcher with the contract of ``fastlora.ops.cross_entropy.ce_rows_torch``:
    returns (loss, lse, entropy or None, argmax or None), fp32; writes the gradient
    into ``grad_out`` (may be ``y``) when ``g_loss`` is given."""
    if y.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton cross-entropy kernel takes fp32/fp16/bf16 logits, got {y.dtype}")
    n, V = y.shape
    # checks that survive ``python -O``: a wrong stride here is an out-of-bounds read
    if y.stride(1) != 1 or not labels.is_contiguous() or labels.shape != (n,):
        raise ValueError(
            f"ce_rows: logits (n, V) must have unit column stride and labels must be a contiguous (n,); "
            f"got logits {tuple(y.shape)} strides {y.stride()}, labels {tuple(labels.shape)} "
            f"strides {labels.stride()}"
        )
    dev = y.device
    f32 = torch.float32
    block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    lse_given = lse is not None
    compute_grad = g_loss is not None
    if compute_grad and (grad_out is None or grad_out.shape != y.shape or grad_out.stride(1) != 1):
        raise ValueError(
            f"ce_rows: a gradient needs grad_out of shape {tuple(y.shape)} with unit column stride, got "
            f"{None if grad_out is None else (tuple(grad_out.shape), grad_out.stride())}"
        )
    has_g_ent = g_ent is not None
    if has_g_ent and lse_given and ent is None:
        raise ValueError("ce_rows: the entropy gradient in backward needs the forward's entropy (ent)")
    if has_g_ent and not lse_given:
        want_entropy = True  # the entropy gradient needs E_p[x] = lse - ent
    # Unused pointer arguments get a real n-element buffer rather than an empty tensor:
    # an empty CUDA tensor has a null data_ptr, which Triton's launcher rejects.
    lse_t = lse.to(f32).contiguous() if lse_given else torch.empty(n, dtype=f32, device=dev)
    ph = lse_t  # placeholder
    loss = ph if lse_given else torch.empty(n, dtype=f32, device=dev)
    if lse_given:
        ent_t = ent.to(f32).contiguous() if has_g_ent else ph
    else:
        ent_t = torch.empty(n, dtype=f32, device=dev) if want_entropy else ph
    am = torch.empty(n, dtype=torch.int64, device=dev) if want_argmax and not lse_given else ph
    dummy = ph
    if n:
        _ce_rows_kernel[(n,)](
            y, labels, loss, lse_t, ent_t, am,
            g_loss.to(f32).contiguous() if compute_grad else dummy,
            g_ent.to(f32).contiguous() if has_g_ent else dummy,
            grad_out if compute_grad else y,
            V,
            y.stride(0), grad_out.stride(0) if compute_grad else 0,
            ignore_index, float(label_smoothing), float(z_loss),
            float(softcap) if softcap is not None else 1.0, float(scale), float(inv_temp),
            BLOCK_V=block,
            HAS_SOFTCAP=softcap is not None,
            LSE_GIVEN=lse_given,
            WANT_ENTROPY=want_entropy and not lse_given,
            WANT_ARGMAX=want_argmax and not lse_given,
            COMPUTE_GRAD=compute_grad,
            HAS_G_ENT=has_g_ent,
            num_warps=8 if block >= 2048 else 4,
        )
    if lse_given:
        return None, lse, None, None
    return (loss, lse_t, ent_t if want_entropy else None, am if want_argmax else None)
