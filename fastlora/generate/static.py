"""Decode with a static KV cache; on CUDA the one-token step is captured in a CUDA graph.

At decode sizes a step of a small model is hundreds of small kernels: on a GPU the
Python and launch overhead per token exceeds the kernels' own time. With every tensor
of the step at a fixed address (transformers' ``StaticCache``, whose write position is
a device tensor it advances in place, plus our own input buffers and a 4-D attention
mask we fill in place), the whole step is recorded once as a CUDA graph and replayed
per token: one launch.

The batch is fixed for the whole decode (rows that finish keep running on a pad token;
their outputs are ignored) because a graph's shapes are. Models whose cache has
sliding-window layers (a cache of a different length per layer) use the dynamic path.

The same class runs eagerly (``use_graph=False``) on any device, which is how CPU-only
CI tests everything here except the capture itself.

A prompt-learning adapter's virtual positions (:class:`fastlora.generate.decode.VirtualPrefix`)
take the first ``n`` slots of every row: written once before the prefill, always visible.
"""
from __future__ import annotations

import torch

from .decode import Runner, left_pad, prompt_positions, seed_cache


def supports_static(runner: Runner) -> str | None:
    """Why this model cannot use the static decoder, or None."""
    cfg = runner.config.get_text_config() if hasattr(runner.config, "get_text_config") else runner.config
    types_ = getattr(cfg, "layer_types", None)
    if types_ is not None and any(t != "full_attention" for t in types_):
        return f"layer types {sorted(set(types_))} (sliding-window layers)"
    if types_ is None and getattr(cfg, "sliding_window", None):
        return f"sliding_window={cfg.sliding_window}"
    if runner.keep_kw is None:
        return "the model's forward has no logits_to_keep"
    return None


class StaticDecoder:
    """Prefill, then ``step(tokens)`` -> next logits ``(B, V)``, for a fixed batch."""

    def __init__(self, runner: Runner, rows: list[list[int]], pad_id: int, max_new_tokens: int,
                 use_graph: bool = False):
        from transformers import StaticCache

        why = supports_static(runner)
        if why is not None:
            raise ValueError(f"the static-cache decoder does not support this model: {why}")
        self.runner = runner
        dev = runner.device
        ids, attn = left_pad(rows, pad_id, dev)  # (B, T)
        B, T = ids.shape
        n = runner.offset  # virtual positions before every row (slots 0..n-1)
        self.B, self.T, self.n = B, T, n
        self.max_len = n + T + max_new_tokens
        self.cache = StaticCache(config=runner.config, max_cache_len=self.max_len)
        if runner.virtual is not None:
            seed_cache(self.cache, runner.virtual.layers(runner), B)
        dtype = next(p.dtype for p in runner.lm.parameters() if p.is_floating_point())
        self.dtype = dtype if dtype.is_floating_point else torch.float32
        # keep[b, j]: row b attends to cache slot j (the virtual positions, its real prompt
        # tokens, then its new ones)
        self.keep = torch.zeros((B, self.max_len), dtype=torch.bool, device=dev)
        self.keep[:, :n] = True
        self.keep[:, n: n + T] = attn.bool()
        pos = prompt_positions(attn) + n
        self.step_ids = torch.zeros((B, 1), dtype=torch.long, device=dev)
        self.step_pos = pos[:, -1:] + 1  # (B, 1), advanced in place
        self.slot = torch.tensor(n + T, device=dev)  # cache slot of the next token
        self.mask = torch.empty((B, 1, 1, self.max_len), dtype=self.dtype, device=dev)
        self.prefill_logits = self._forward(ids, self._prefill_mask(attn), pos)[:, -1]
        self.use_graph = use_graph and dev.type == "cuda"
        self.graph = None
        self.out = None

    # -- masks: additive 4-D, what eager and SDPA attention both accept as given -------------
    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def _prefill_mask(self, attn: torch.Tensor) -> torch.Tensor:
        B, T = attn.shape
        # prompt token t sits in slot n + t and sees slots 0..n+t
        causal = torch.ones((T, self.max_len), dtype=torch.bool, device=attn.device).tril(self.n)  # (T, L)
        allowed = causal[None] & self.keep[:, None, :]  # (B, T, L)
        return self._additive(allowed)[:, None]  # (B, 1, T, L)

    def _forward(self, ids, mask, pos):
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self.runner.cache_kw: self.cache,
              "use_cache": True, self.runner.keep_kw: 1}
        return self.runner.lm(**kw).logits

    # -- the step ------------------------------------------------------------------------------
    def _step_body(self) -> torch.Tensor:
        # slot `self.slot` becomes visible to every row, then the token is written there
        self.keep.index_fill_(1, self.slot.view(1), True)
        self.mask.copy_(self._additive(self.keep)[:, None, None, :])
        logits = self._forward(self.step_ids, self.mask, self.step_pos)[:, -1]
        self.step_pos.add_(1)
        self.slot.add_(1)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``(B,)`` (one per row), return the next logits ``(B, V)``."""
        self.step_ids.copy_(tokens.view(-1, 1))
        if not self.use_graph:
            return self._step_body()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out

    def _capture(self) -> None:
        # Warm up on a side stream (allocator pools, lazy inits, cuBLAS handles), then
        # record one step. The warm-up step is real: undo its in-place advances so the
        # recorded step starts where the caller is.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        state = (self.keep.clone(), self.step_pos.clone(), self.slot.clone(),
                 [layer.cumulative_length.clone() for layer in self.cache.layers])
        with torch.cuda.stream(stream):
            self._step_body()
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(state)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step_body()
        self._restore(state)  # capture does not execute; replay() runs the step

    def _restore(self, state) -> None:
        keep, pos, slot, lengths = state
        self.keep.copy_(keep)
        self.step_pos.copy_(pos)
        self.slot.copy_(slot)
        for layer, n in zip(self.cache.layers, lengths):
            layer.cumulative_length.copy_(n)
