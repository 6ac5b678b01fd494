"""PPO's per-token math, pure torch, on ``[batch, length]`` tensors with a 0/1 mask.

Every function takes the response tokens' quantities as ``(B, L)`` tensors and ``mask``
``(B, L)`` (1 = a valid response token). Masked positions contribute nothing to any
mean, get advantage/return/reward 0, and a value past the last valid token bootstraps
as 0 (the episode ends there). Means are over the valid tokens of the whole batch
(token-level, as in the PPO-for-LMs literature), never a mean of per-row means.

Formulas (ε = clip, ρ = exp(logp − old_logp), d = logp − ref_logp)::

    kl k1  = d                          (unbiased, can be negative per token)
    kl k3  = (r − 1) − log r, r = exp(−d)   (Schulman's low-variance estimator, ≥ 0)
    kl abs = |d|,  mse = ½ d²
    δ_t    = r_t + γ·V_{t+1}·m_{t+1} − V_t
    A_t    = δ_t + γλ·m_{t+1}·A_{t+1},  returns = A + V          (GAE, Schulman et al. 2016)
    policy = mean_valid max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))
    value  = ½·mean_valid max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)
    reward = −β·kl_t at every valid token, + score at the last valid token

The entropy bonus needs no function here: ``fastlora.token_logprobs(...,
return_entropy=True)`` returns each token's entropy from the chunked log-sum-exp with
its gradient, and :func:`entropy_bonus` averages it over valid tokens.
"""
from __future__ import annotations

import math

import torch

from .base import last_token_index
from .math import masked_mean

__all__ = [
    "KL_KINDS",
    "kl_penalty",
    "gae",
    "policy_loss",
    "value_loss",
    "entropy_bonus",
    "token_rewards",
    "group_advantages",
    "AdaptiveKLController",
    "FixedKLController",
]

KL_KINDS = ("k1", "k3", "abs", "mse")


def _check_pair(name_a, a, name_b, b):
    if not torch.is_tensor(a) or not torch.is_tensor(b):
        raise TypeError(f"{name_a} and {name_b} must be tensors, got {type(a).__name__}, {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} != {name_b} shape {tuple(b.shape)}")


def _check_bl(mask, **tensors):
    """Every tensor is (B, L) like mask; mask is 0/1."""
    if not torch.is_tensor(mask) or mask.dim() != 2:
        raise ValueError(f"mask must be a (batch, length) tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != mask.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != mask shape {tuple(mask.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 and 1")


# ------------------------------------------------------------------------------ KL
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, from the sampled
    tokens' log-probs (any matching shapes). ``kind``: k1 | k3 | abs | mse (see the module
    docstring). Differentiable in both inputs."""
    _check_pair("logp", logp, "ref_logp", ref_logp)
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k3":
        # (r - 1) - log r with log r = -d; expm1 keeps it exact for small |d|
        return torch.expm1(-d) + d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d * d
    raise ValueError(f"kl kind {kind!r} is not one of {list(KL_KINDS)}")


# --------------------------------------------------------------------------- rewards
def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  beta: float, kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, L): −β·kl at every valid token plus ``scores`` (B,) at the
    last valid token. Returns (rewards, kl), kl masked to 0 outside the mask. Computed
    without grad (rewards are targets)."""
    _check_bl(mask, logp=logp, ref_logp=ref_logp)
    if not torch.is_tensor(scores) or scores.shape != (mask.shape[0],):
        raise ValueError(f"scores must be a ({mask.shape[0]},) tensor, got {getattr(scores, 'shape', scores)}")
    if not math.isfinite(float(beta)):
        raise ValueError(f"beta must be finite, got {beta!r}")
    with torch.no_grad():
        kl = torch.where(mask != 0, kl_penalty(logp, ref_logp, kind), 0.0)
        rewards = -float(beta) * kl
        empty = (mask == 0).all(1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(f"response length 0 in row(s) {rows[:10]}: every row needs at least one valid token")
        last = last_token_index(mask)
        rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, kl


# ------------------------------------------------------------------------------ GAE
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the valid tokens of each row.

    A masked position ends the episode: the value after it is 0 and no advantage flows
    back across it. Returns (advantages, returns), both (B, L), 0 outside the mask,
    returns = advantages + values. No grad (they are targets)."""
    _check_bl(mask, rewards=rewards, values=values)
    with torch.no_grad():
        m = mask.to(values.dtype)
        r = torch.where(mask != 0, rewards, 0.0)
        v = torch.where(mask != 0, values, 0.0)
        B, L = m.shape
        adv = torch.zeros_like(v)
        # v and adv are 0 at masked positions, so a masked t+1 bootstraps with 0 and passes no advantage back
        next_adv = torch.zeros(B, dtype=v.dtype, device=v.device)
        next_v = torch.zeros_like(next_adv)
        for t in range(L - 1, -1, -1):  # L is a response length: a loop over it is cheap
            delta = r[:, t] + gamma * next_v - v[:, t]
            next_adv = (delta + gamma * lam * next_adv) * m[:, t]
            adv[:, t] = next_adv
            next_v = v[:, t]
        return adv, (adv + v) * m


# ---------------------------------------------------------------------------- losses
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean over valid tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)).

    Gradient flows through ``logp`` only. Stats (floats, no grad): ``clip_frac`` (share of
    valid tokens where the clipped branch is taken), ``approx_kl`` = ½·mean((logp −
    old_logp)²), ``ratio`` = mean ρ."""
    _check_bl(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    m = mask.to(logp.dtype)
    valid = mask != 0
    # torch.where, not "* m": whatever sits outside the mask (-inf, NaN) never reaches exp or a mean
    diff = torch.where(valid, logp - old_logp.detach(), 0.0)
    ratio = torch.exp(diff)
    adv = torch.where(valid, advantages.detach(), 0.0)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), m)
    with torch.no_grad():
        stats = {
            "clip_frac": float(masked_mean((pg2 > pg1).to(m.dtype), m)),
            "approx_kl": float(0.5 * masked_mean(diff * diff, m)),
            "ratio": float(masked_mean(ratio, m)),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """½ · mean over valid tokens of max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²).

    Gradient flows through ``values`` only. Stats: ``vf_clip_frac`` (share of valid tokens
    where the clipped error is the larger), ``value_error`` = mean (V − R)²."""
    _check_bl(mask, values=values, old_values=old_values, returns=returns)
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    m = mask.to(values.dtype)
    valid = mask != 0
    values = torch.where(valid, values, 0.0)
    old = torch.where(valid, old_values.detach(), 0.0)
    ret = torch.where(valid, returns.detach(), 0.0)
    clipped = old + (values - old).clamp(-clip, clip)
    e1 = (values - ret) ** 2
    e2 = (clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(e1, e2), m)
    with torch.no_grad():
        stats = {"vf_clip_frac": float(masked_mean((e2 > e1).to(m.dtype), m)),
                 "value_error": float(masked_mean(e1, m))}
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy over valid tokens (differentiable); the loss subtracts coef × this."""
    _check_bl(mask, entropy=entropy)
    return masked_mean(torch.where(mask != 0, entropy, 0.0), mask.to(entropy.dtype))


# ------------------------------------------------------------------------------ GRPO
def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each score's z-score within its group of ``group_size`` consecutive rows
    (the k samples of one prompt), (s − mean) / (std + eps), std unbiased (n − 1).
    Returns (B,); broadcast it over a row's valid tokens (``adv[:, None] * mask``).
    A group whose scores are all equal gets advantage 0 (nothing to learn from it)."""
    if not torch.is_tensor(scores) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (the std of one sample is undefined), got {group_size}")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not divide into groups of {group_size}")
    with torch.no_grad():
        g = scores.reshape(-1, group_size)
        mean = g.mean(1, keepdim=True)
        std = g.std(1, keepdim=True)
        return ((g - mean) / (std + eps)).reshape(-1)


# ---------------------------------------------------------------------- KL controllers
class FixedKLController:
    """A constant β."""

    def __init__(self, beta: float = 0.05):
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"kl beta must be finite and >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon),
    steering the measured KL (per sequence) towards ``target``."""

    def __init__(self, init_beta: float, target: float, horizon: float):
        if not (math.isfinite(init_beta) and init_beta >= 0):
            raise ValueError(f"kl beta must be finite and >= 0, got {init_beta}")
        if not target > 0 or not horizon > 0:
            raise ValueError(f"kl target and horizon must be > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_beta), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
