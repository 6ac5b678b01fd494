"""The decode loop: one prefill, then one forward per new token over a KV cache.

Rows arrive left-padded (the caller normalizes any padding). Positions follow
transformers' ``generate``: ``cumsum(attention_mask) - 1`` over the prompt, then +1 per
step, and the prefill keeps only the last position's logits (``logits_to_keep=1``, as
``generate`` does), so greedy tokens are the same as ``generate``'s.

A row leaves the batch as soon as it finishes (stop token, stop string, its token
budget): its cache rows are dropped (``Cache.batch_select_indices``) and later steps
run on the remaining rows only.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .sampling import SamplingConfig, choose


def causal_lm(model):
    """The transformers causal LM inside ``model`` (a PeftModel runs its injected LoRA
    layers either way; calling the inner model skips PEFT's per-call wrapper)."""
    inner = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    return inner


class Runner:
    """Calls the causal LM for generation: builds the cache, names its keywords right for
    the installed transformers (``cache=`` in 5.x, ``past_key_values=`` before)."""

    def __init__(self, model):
        self.model = model
        self.lm = causal_lm(model)
        params = inspect.signature(type(self.lm).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.config = self.lm.config
        self.device = next(p.device for p in self.lm.parameters())

    def new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache, keep: int = 1):
        """Logits ``(B, keep, V)`` of the last ``keep`` positions of ``ids`` ``(B, t)``."""
        kw = {"input_ids": ids, "attention_mask": attn, "position_ids": pos, self.cache_kw: cache,
              "use_cache": True}
        if self.keep_kw is not None:
            kw[self.keep_kw] = keep
        out = self.lm(**kw)
        return out.logits[:, -keep:, :]

    def context_length(self) -> int | None:
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        n = getattr(cfg, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None


def prompt_positions(attn: torch.Tensor) -> torch.Tensor:
    """transformers' ``generate`` positions for a (left-padded) prompt mask."""
    pos = attn.long().cumsum(-1) - 1
    return pos.masked_fill(attn == 0, 0)


@dataclass
class Decoded:
    tokens: torch.Tensor  # (B, steps) new ids (pad after a row's end)
    lengths: list[int]
    reasons: list[str]
    logprobs: torch.Tensor | None = None  # (B, steps) fp32
    sampling_logprobs: torch.Tensor | None = None
    steps: int = 0
    extra: dict = field(default_factory=dict)


def decode(runner: Runner, ids: torch.Tensor, attn: torch.Tensor, *, limits: list[int], sampling: SamplingConfig,
           generator: torch.Generator | None, stop_ids: frozenset, stop_strings: tuple, tokenizer,
           need_logprobs: bool, pad_id: int) -> Decoded:
    """Generate for left-padded ``ids`` / ``attn`` ``(B, T)``; row ``b`` makes at most
    ``limits[b]`` (>= 1) tokens."""
    B = ids.shape[0]
    dev = ids.device
    steps_max = max(limits)
    tokens = torch.full((B, steps_max), pad_id, dtype=torch.long, device=dev)
    lp = torch.zeros((B, steps_max), dtype=torch.float32, device=dev) if need_logprobs else None
    slp = torch.zeros((B, steps_max), dtype=torch.float32, device=dev) if need_logprobs else None
    lengths = [0] * B
    reasons = [""] * B
    texts_ids: list[list[int]] = [[] for _ in range(B)]

    cache = runner.new_cache()
    pos = prompt_positions(attn)
    logits = runner(ids, attn, pos, cache, keep=1)[:, -1]  # (B, V)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    active = list(range(B))  # original row of each batch row
    active_t = torch.arange(B, device=dev)
    step = 0
    while True:
        u = None
        if not sampling.greedy:
            # one number per original row and step: a row's draw ignores who else is left
            u = torch.rand(B, generator=generator, device=dev)[active_t]
        tok, full, samp = choose(logits, sampling, u, need_logprobs)
        tokens[active_t, step] = tok
        if need_logprobs:
            lp[active_t, step] = full
            slp[active_t, step] = samp
        keep = []
        for i, (r, t) in enumerate(zip(active, tok.tolist())):
            lengths[r] = step + 1
            reason = ""
            if t in stop_ids:
                reason = "stop_token"
            elif stop_strings:
                texts_ids[r].append(t)
                text = tokenizer.decode(texts_ids[r], skip_special_tokens=True)
                if any(s in text for s in stop_strings):
                    reason = "stop_string"
            if not reason and step + 1 >= limits[r]:
                reason = "length"
            if reason:
                reasons[r] = reason
            else:
                keep.append(i)
        step += 1
        if not keep:
            break
        if len(keep) < len(active):  # finished rows stop costing compute
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            attn, tok, next_pos, active_t = attn[idx], tok[idx], next_pos[idx], active_t[idx]
            active = [active[i] for i in keep]
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        logits = runner(tok.unsqueeze(1), attn, next_pos, cache, keep=1)[:, -1]
        next_pos = next_pos + 1
    return Decoded(tokens[:, :step], lengths, reasons, None if lp is None else lp[:, :step],
                   None if slp is None else slp[:, :step], step)
