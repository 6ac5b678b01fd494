"""Masked statistics over the valid tokens of a (batch, length) tensor.

Placeholder with the signatures of the shared-base branch (i13), which owns this file;
its version replaces this one on merge.
"""
from __future__ import annotations

import torch

__all__ = ["masked_mean", "whiten"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (0 when there are none)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the valid tokens of the whole batch; 0 outside the mask."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
