"""Per-token log-probabilities (and entropy) of sampled tokens without the (N, V) logits.

logits = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature
logp[i] = logits[i, tokens[i]] - logsumexp(logits[i])
entropy[i] = logsumexp(logits[i]) - sum_j p_ij logits[i, j]

PPO calls this for the policy, the reference and the old policy; TRL instead keeps the
whole [batch, length, vocab] logits. It shares the chunk loop and row kernels of
``fastlora/ops/linear_cross_entropy.py`` (logp is minus the unsmoothed cross-entropy).
The upstream gradient differs per token (advantages, KL terms), so backward recomputes
each chunk's logits from the saved (N,) lse rather than precomputing in forward.

Gradients (x = tempered logits, g, h = upstream grads of logp and entropy)::

    dlogp_i/dx_ij = [j == token_i] - p_ij
    dH_i/dx_ij    = -p_ij (x_ij - E_p[x_i])
"""
from __future__ import annotations

import math

import torch

from ..backend import Backend, select
from .cross_entropy import check_labels, check_positive
from .linear_cross_entropy import (
    autocast_inputs,
    check_linear_inputs,
    linear_ce_backward,
    linear_ce_forward,
)

__all__ = ["token_logprobs"]


# --------------------------------------------------------------------------- reference
def _reference(hidden, weight, tokens, *, bias=None, temperature=1.0, logit_scale=1.0,
               softcap=None, return_entropy=False):
    """The spec on full logits, plain torch (tests run it in float64)."""
    x = torch.nn.functional.linear(hidden, weight, bias) * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    x = x / temperature
    logp_all = torch.log_softmax(x, -1)
    logp = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


# --------------------------------------------------------------------------- autograd
class TokenLogprobsFunction(torch.autograd.Function):
    """hidden (n, H), weight (V, H), bias (V,) or None, tokens (n,) -> (logp (n,),
    entropy (n,) or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, opts, want_entropy, chunk_size, backend):
        scale, softcap, inv_temp = opts
        loss, lse, ent, _, _, _, _ = linear_ce_forward(
            hidden, weight, bias, tokens, scale, softcap, inv_temp, 0.0, 0.0, chunk_size,
            False, False, False, want_entropy, False, backend.value,
        )
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, ent if want_entropy else None)
        ctx.args = (scale, softcap, inv_temp, 0.0, 0.0, chunk_size)
        ctx.backend = backend.value
        ctx.want_entropy = want_entropy
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return -loss, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
        need_gh, need_gw, need_gb = ctx.needs_input_grad[:3]
        if not (need_gh or need_gw or need_gb):
            return (None,) * 8
        g_ent = g_ent.contiguous() if ctx.want_entropy and g_ent is not None else None
        gh, gw, gb = linear_ce_backward(
            hidden, weight, bias, tokens, lse, ent if g_ent is not None else None,
            (-g_logp).contiguous(), g_ent, *ctx.args, need_gh, need_gw, need_gb, ctx.backend,
        )
        wdt, bdt = ctx.dtypes
        return (gh if need_gh else None, gw.to(wdt) if need_gw else None,
                gb.to(bdt) if need_gb else None, None, None, None, None, None)


# --------------------------------------------------------------------------- functional
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend=None,
):
    """log p(tokens) under softmax(softcap(logit_scale * (hidden @ weight.T + bias)) / temperature).

    hidden: (..., H); weight: (V, H), same dtype; tokens: (...) integers in [0, V);
    bias: (V,) or None. Returns logp of shape tokens.shape (float32; float64 for
    float64 inputs), and the entropy of the same shape when ``return_entropy``.
    Both are differentiable w.r.t. hidden, weight and bias when they require grad.
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_linear_inputs(hidden, weight, tokens, bias, what="tokens")
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, allow_none=True)
    if not math.isfinite(float(logit_scale)):
        raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    V, H = weight.shape
    check_labels(tokens, V, None, what="tokens")
    be = select("token_logprobs", hidden.device, [Backend.TRITON], backend)
    logp, ent = TokenLogprobsFunction.apply(
        hidden.reshape(-1, H).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), tokens.reshape(-1).long(),
        (float(logit_scale), None if softcap is None else float(softcap), 1.0 / float(temperature)),
        bool(return_entropy), int(chunk_size or 0), be,
    )
    logp = logp.reshape(tokens.shape)
    if return_entropy:
        return logp, ent.reshape(tokens.shape)
    return logp
