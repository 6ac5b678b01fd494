"""Pure-torch RL math on ``[batch, length]`` tensors with a 0/1 mask of valid tokens.

These are the specs the trainers compose (reward model here; PPO adds its losses in
``fastlora/rl/ppo.py``). Every function:

- takes the mask as 0/1 of any dtype (bool, int, float) and broadcastable to ``x``;
- ignores the VALUES at masked positions (``torch.where``, not ``x * mask``): padding
  may hold anything, even inf/NaN (a log-prob of a pad token), without leaking into the
  result or its gradient;
- computes in float32 at least (float64 stays float64), so bf16 scores do not lose the
  small differences a preference loss is made of.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_mean", "masked_sum", "masked_var", "whiten", "reward_loss"]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # float64 stays float64 (the tests' precision); anything narrower computes in float32
    return x if x.dtype == torch.float64 else x.float()


def _valid(x: torch.Tensor, mask: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.is_tensor(x) or not torch.is_tensor(mask):
        raise TypeError(f"{what}: x and mask must be tensors, got {type(x).__name__} and {type(mask).__name__}")
    try:
        ok = torch.broadcast_shapes(x.shape, mask.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{what}: mask {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}")
    if mask.dtype != torch.bool:
        mask = mask != 0  # 0/1 ints or floats (an attention mask, a float loss mask)
    return mask.expand(x.shape)


def _zeroed(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x (as float) with 0 at masked positions. Done FIRST, before any arithmetic: a NaN kept
    under the mask would turn into NaN gradients (0 * NaN) in the steps after."""
    xf = _as_float(x)
    return torch.where(m, xf, torch.zeros((), dtype=xf.dtype, device=xf.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``x`` over the valid positions (over ``dim``, or over everything)."""
    m = _valid(x, mask, "masked_sum")
    z = _zeroed(x, m)
    return z.sum() if dim is None else z.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over the valid positions (over ``dim``, or over the whole batch).

    x: (B, L) (any shape); mask: 0/1, broadcastable to x. With no valid position the
    result is 0 (nothing contributes), not NaN: a row of a fully masked response adds
    nothing to a loss.
    """
    m = _valid(x, mask, "masked_mean")
    total = masked_sum(x, m, dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divide by n, not n-1) of ``x`` over all valid positions."""
    m = _valid(x, mask, "masked_var")
    xz = _zeroed(x, m)
    mean = masked_mean(xz, m)
    return masked_mean((xz - mean) ** 2, m)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and variance over the valid tokens of the
    WHOLE batch (not per row), as PPO whitens advantages.

    x: (B, L); mask: 0/1 (B, L). The variance is the population variance (divide by the
    number of valid tokens n): the whitened valid tokens then have exactly mean 0 and
    variance var/(var+eps). ``shift_mean=False`` keeps the mean (x - mean)/std + mean,
    the convention for rewards. Masked positions come out as 0.
    Returns float32 (float64 for float64 input), shape of x.
    """
    m = _valid(x, mask, "whiten")
    if eps < 0:
        raise ValueError(f"whiten: eps must be >= 0, got {eps}")
    xz = _zeroed(x, m)
    mean = masked_mean(xz, m)
    var = masked_mean((xz - mean) ** 2, m)
    out = (xz - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                center: float = 0.0) -> torch.Tensor:
    """Bradley–Terry preference loss, mean over pairs, in float32 (float64 stays float64):

        mean_i[ -log σ(r_chosen_i - r_rejected_i - margin_i) ] + center · mean_i[(r_chosen_i + r_rejected_i)²]

    r_chosen, r_rejected: (B,) scores of each pair's chosen and rejected response;
    margin: None, a float, or (B,) (the preferred response must win by at least that);
    center: the weight of the centering term, which keeps scores near 0 so that a PPO
    reward built on them has a stable scale (0 = off). -log σ(z) is computed as
    softplus(-z), exact for large |z|.
    """
    if not torch.is_tensor(r_chosen) or not torch.is_tensor(r_rejected):
        raise TypeError("reward_loss: r_chosen and r_rejected must be tensors")
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"reward_loss: r_chosen {tuple(r_chosen.shape)} and r_rejected "
                         f"{tuple(r_rejected.shape)} must have the same shape")
    if r_chosen.numel() == 0:
        raise ValueError("reward_loss: no pairs (empty tensors)")
    if center < 0:
        raise ValueError(f"reward_loss: center must be >= 0, got {center}")
    dtype = torch.float64 if torch.float64 in (r_chosen.dtype, r_rejected.dtype) else torch.float32
    rc, rr = r_chosen.to(dtype), r_rejected.to(dtype)
    z = rc - rr
    if margin is not None:
        if torch.is_tensor(margin):
            if margin.dim() and margin.shape != r_chosen.shape:
                raise ValueError(f"reward_loss: margin {tuple(margin.shape)} must be a scalar or have the pairs' "
                                 f"shape {tuple(r_chosen.shape)}")
            margin = margin.to(dtype)
        z = z - margin
    loss = F.softplus(-z).mean()
    if center:
        loss = loss + center * ((rc + rr) ** 2).mean()
    return loss
