"""Choosing the next token: greedy, temperature, top-k, top-p, and the log-probs PPO needs.

All math runs in fp32 on the last position's logits ``(rows, vocab)``.

- ``logprobs``: the chosen token's log-prob under the model's full, untempered
  distribution (``log_softmax(logits)``): PPO's "old" log-probs, from the same forward.
- ``sampling_logprobs``: its log-prob under the distribution actually sampled from
  (temperature, then top-k, then top-p, renormalized); 0 for greedy (a point mass).

Sampling is by inverse CDF with one uniform number per *original* row and step, drawn
from a dedicated ``torch.Generator``: a row's tokens depend on the seed and its own
logits only, not on which other rows have finished (finished rows leave the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(temperature, top_k, top_p) -> SamplingConfig:
    """Validated sampling settings; bad values raise with the offending value."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0.0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return SamplingConfig(float(temperature), top_k, None if top_p is None else float(top_p))


def filtered_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The sampling distribution's logits ``(rows, V)``: tempered, then top-k and top-p
    applied by setting removed tokens to -inf. top-p keeps the smallest set of most
    likely tokens whose mass reaches ``top_p`` (at least one token)."""
    z = logits / cfg.temperature
    V = z.shape[-1]
    if cfg.top_k is not None and cfg.top_k < V:
        kth = torch.topk(z, cfg.top_k, dim=-1).values[:, -1:]  # (rows, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= cfg.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def choose(logits: torch.Tensor, cfg: SamplingConfig, uniform: torch.Tensor | None, need_logprobs: bool):
    """(tokens ``(rows,)``, logprobs or None, sampling_logprobs or None) for fp32 ``logits``.

    ``uniform``: one U[0, 1) number per row (sampling only)."""
    logits = logits.float()
    if cfg.greedy:
        tok = torch.argmax(logits, dim=-1)
        samp = torch.zeros(tok.shape, dtype=torch.float32, device=tok.device) if need_logprobs else None
    else:
        z = filtered_logits(logits, cfg)
        probs = torch.softmax(z, dim=-1)
        cdf = torch.cumsum(probs, dim=-1)  # (rows, V)
        target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
        # fp32 rounding can land on a removed token at the very end of the CDF
        zero = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1) <= 0
        if bool(zero.any()):
            tok = torch.where(zero, probs.argmax(-1), tok)
        samp = torch.log_softmax(z, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1) if need_logprobs else None
    full = torch.log_softmax(logits, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1) if need_logprobs else None
    return tok, full, samp
