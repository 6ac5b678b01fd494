"""The decode loop: one prefill, then one forward per new token over a KV cache.

Rows arrive left-padded (the caller normalizes any padding). Positions follow
transformers' ``generate``: ``cumsum(attention_mask) - 1`` over the prompt, then +1 per
step, and the prefill keeps only the last position's logits (``logits_to_keep=1``, as
``generate`` does), so greedy tokens are the same as ``generate``'s.

A row leaves the batch as soon as it finishes (stop token, stop string, its token
budget): its cache rows are dropped (``Cache.batch_select_indices``) and later steps
run on the remaining rows only.

Prompt-learning PEFT adapters (prompt tuning, p-tuning, prefix tuning) put ``n`` virtual
positions before every row; PEFT adds them in ``PeftModel.forward``, which the decode
loop does not call (it drives the causal LM inside, with its own cache). The
:class:`Runner` adds them instead, as :class:`VirtualPrefix` describes: every cache it
makes starts with the virtual positions' keys and values, and every call it makes
prepends ``n`` ones to the attention mask and shifts the positions by ``n``. Callers
keep counting only real tokens.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .sampling import SamplingConfig, choose


def causal_lm(model):
    """The transformers causal LM inside ``model`` (a PeftModel runs its injected layers
    either way; calling the inner model skips PEFT's per-call wrapper, whose only work
    for a prompt-learning adapter :class:`VirtualPrefix` does instead)."""
    inner = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    return inner


# PEFT types whose virtual tokens are input embeddings (PeftModelForCausalLM.forward
# concatenates get_prompt() before the token embeddings), and whose are key/value vectors
# (it passes get_prompt() as the cache).
EMBEDDING_PROMPTS = ("PROMPT_TUNING", "P_TUNING")
KV_PROMPTS = ("PREFIX_TUNING",)


def _peft_type(config) -> str:
    t = getattr(config, "peft_type", None)
    return str(getattr(t, "value", t))


def unsupported_adapter(model) -> str | None:
    """Why running the causal LM inside ``model`` (what every fastlora generation and
    scoring path does) would not give ``model``'s own answers, or None when it does."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not callable(getattr(model, "get_base_model", None)):
        return None  # not a PeftModel (the bottleneck adapter and BitFit live in the model itself)
    t = _peft_type(config)
    if getattr(config, "is_prompt_learning", False):
        if t in EMBEDDING_PROMPTS + KV_PROMPTS:
            return None
        return (f"PEFT {t} adds its virtual tokens in PeftModel.forward in its own way "
                f"(supported prompt-learning methods: prompt tuning, p-tuning, prefix tuning)")
    if t == "POLY":
        return "PEFT POLY routes every forward by task_ids, which fastlora.generate does not take"
    if getattr(config, "alora_invocation_tokens", None):
        return "activated LoRA (alora_invocation_tokens) turns on per row at its invocation tokens in PEFT's forward"
    return None


class VirtualPrefix:
    """The virtual positions a prompt-learning PEFT adapter puts before every row, as
    PEFT 0.21's ``PeftModelForCausalLM.forward`` does it:

    - prompt tuning / p-tuning: ``get_prompt()`` embeddings (the same for every row) are
      concatenated before the token embeddings, their mask is ones, and the positions
      count from 0 over them (``position_ids`` are dropped: the model counts them from the
      cache, so the first real token is at position ``n``);
    - prefix tuning: ``get_prompt()`` is the cache the model starts from (per-layer keys
      and values of ``n`` positions), the mask gets ``n`` ones, positions are shifted by
      ``n`` (``_adjust_prompt_learning_kwargs``).

    Both are a prefix shared by every row, so their keys and values are made once, for
    one row (:meth:`layers`), and copied into each new cache. Unlike ``PeftModel.generate``
    with left-padded rows (which drops the positions for prompt tuning, so a padded row's
    positions count its pads), each row gets the positions it has alone, as in PEFT's
    training forward. (PEFT 0.21's ``generate`` on transformers 5 also loses the prefix of
    prefix tuning, and re-adds the virtual tokens at every decode step of prompt tuning:
    its ``prepare_inputs_for_generation`` looks for ``past_key_values``, which
    transformers 5 passes as ``cache``. The reference for fidelity is therefore PEFT's
    forward, and ``PeftModel.generate(..., use_cache=False)``, which runs it.)
    """

    def __init__(self, model, lm, kind: str, n: int):
        self.model, self.lm, self.kind, self.n = model, lm, kind, n
        self._layers: list | None = None

    @classmethod
    def of(cls, model, lm) -> "VirtualPrefix | None":
        why = unsupported_adapter(model)
        if why is not None:
            raise ValueError(f"fastlora cannot generate with this adapter: {why}. Running the model without it "
                             "would answer as the base model; merge it, or use PeftModel.generate")
        config = getattr(model, "active_peft_config", None)
        if not getattr(config, "is_prompt_learning", False) or getattr(model, "_adapters_disabled", False):
            # ``_adapters_disabled``: PEFT's ``disable_adapter()`` for prompt learning swaps
            # the instance's forward and sets only this flag; the base model's answer is asked
            return None
        kind = "embeddings" if _peft_type(config) in EMBEDDING_PROMPTS else "kv"
        return cls(model, lm, kind, int(config.num_virtual_tokens))

    def layers(self, runner: "Runner") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) ``(1, heads, n, head_dim)`` of the virtual positions."""
        if self._layers is None:
            if self.kind == "kv":
                cache = self.model.get_prompt(batch_size=1)
            else:
                emb = self.model.get_prompt(batch_size=1)  # (1, n, hidden)
                emb = emb.to(self.lm.get_input_embeddings().weight.dtype)
                cache = runner.empty_cache()
                mask = torch.ones((1, self.n), dtype=torch.long, device=emb.device)
                kw = {"inputs_embeds": emb, "attention_mask": mask, "position_ids": prompt_positions(mask),
                      runner.cache_kw: cache, "use_cache": True}
                if runner.keep_kw is not None:
                    kw[runner.keep_kw] = 1
                self.lm(**kw)
            got = [(layer.keys, layer.values) for layer in getattr(cache, "layers", None) or []]
            if not got or any(k is None or k.dim() != 4 or k.shape[-2] != self.n for k, _ in got):
                raise ValueError(f"prompt learning on model_type {getattr(self.lm.config, 'model_type', None)!r}: "
                                 "its virtual positions do not come back as one (keys, values) of "
                                 f"{self.n} positions per layer, which fastlora's cache needs")
            self._layers = [(k.detach().clone(), v.detach().clone()) for k, v in got]
        return self._layers


class Runner:
    """Calls the causal LM for generation: builds the cache, names its keywords right for
    the installed transformers (``cache=`` in 5.x, ``past_key_values=`` before), and adds
    a prompt-learning adapter's virtual positions (:class:`VirtualPrefix`)."""

    def __init__(self, model):
        self.model = model
        self.lm = causal_lm(model)
        params = inspect.signature(type(self.lm).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.config = self.lm.config
        self.device = next(p.device for p in self.lm.parameters())
        self.virtual = VirtualPrefix.of(model, self.lm)
        # positions before every row's first token (a prompt-learning adapter's virtual tokens)
        self.offset = 0 if self.virtual is None else self.virtual.n
        # shared prefixes already run in this call: tokens -> per-layer (keys, values) of one row
        self.prefix_memo: dict[tuple, list] = {}

    def empty_cache(self):
        """transformers' DynamicCache, its plain growing layers swapped for :func:`growing_layer_class`'s."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.config)
        except TypeError:  # older transformers
            cache = DynamicCache()
        growing, plain = growing_layer_class(), _dynamic_layer_class()
        if growing is not None:
            layers = getattr(cache, "layers", None) or []
            for i, layer in enumerate(layers):
                if type(layer) is plain and not getattr(layer, "is_initialized", False):
                    layers[i] = growing()
            if getattr(cache, "layer_class_to_replicate", None) is plain:
                cache.layer_class_to_replicate = growing
        return cache

    def new_cache(self, rows: int = 1):
        """A cache for ``rows`` rows holding what comes before every row's tokens: nothing,
        or a prompt-learning adapter's virtual positions."""
        cache = self.empty_cache()
        if self.virtual is not None:
            seed_cache(cache, self.virtual.layers(self), rows)
        return cache

    def inputs(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache) -> dict:
        """The causal LM's keyword arguments for ``ids`` ``(B, t)`` with the caller's mask
        (over real tokens, ``(B, cached + t)``) and positions (real tokens from 0)."""
        if self.offset:
            attn = torch.cat([attn.new_ones((attn.shape[0], self.offset)), attn], dim=1)
            pos = pos + self.offset
        return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, self.cache_kw: cache,
                "use_cache": True}

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, cache, keep: int = 1):
        """Logits ``(B, keep, V)`` of the last ``keep`` positions of ``ids`` ``(B, t)``."""
        kw = self.inputs(ids, attn, pos, cache)
        if self.keep_kw is not None:
            kw[self.keep_kw] = keep
        out = self.lm(**kw)
        return out.logits[:, -keep:, :]

    def context_length(self) -> int | None:
        """Real tokens a row may hold (the model's context less the virtual positions)."""
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        n = getattr(cfg, "max_position_embeddings", None)
        return int(n) - self.offset if isinstance(n, int) and n > 0 else None


def seed_cache(cache, layers: list, rows: int) -> None:
    """Append per-layer (keys, values) of one row to an empty ``cache``, for ``rows`` rows."""
    for i, (k, v) in enumerate(layers):
        cache.update(k.expand(rows, *k.shape[1:]).contiguous(), v.expand(rows, *v.shape[1:]).contiguous(), i)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, T - len(r):] = 1
    return ids.to(device), attn.to(device)


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


# Rows sharing at least this many leading tokens (a system prompt, a chat template's
# header) run that prefix once: below it the extra forward costs more than it saves.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Leading tokens common to every row, leaving each row at least one token of its own
    (the prefill's last position must be the row's own last token)."""
    if len(rows) < 2:
        return 0
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def prefill(runner: Runner, rows: list[list[int]], pad_id: int, share_prefix: bool = True, keep: int = 1):
    """(cache, attention mask ``(B, T)``, next positions ``(B, 1)``, logits of the last
    ``keep`` positions ``(B, keep, V)``) (``keep`` <= the tokens each row has of its own).

    Without a shared prefix the rows are left-padded, as transformers' ``generate`` does.
    With one (``P`` tokens), the prefix is run once for a single row, its cache repeated
    for every row, and the rest of each row follows it left-padded: ``[prefix | pad |
    own tokens]``. Positions still count real tokens only (``cumsum(mask) - 1``), so each
    row sees exactly the tokens and positions it would see alone; only the order of some
    float sums differs (a batch of 1 instead of B in the prefix's matmuls). The mask and
    positions returned count real tokens only; the cache also holds the virtual positions
    of a prompt-learning adapter before them (``runner.offset``).
    """
    dev = runner.device
    B = len(rows)
    P = shared_prefix_length(rows) if share_prefix else 0
    P = min(P, min(len(r) for r in rows) - keep)
    if P < MIN_SHARED_PREFIX:
        cache = runner.new_cache(B)
        ids, attn = left_pad(rows, pad_id, dev)
        pos = prompt_positions(attn)
        logits = runner(ids, attn, pos, cache, keep=keep)
        return cache, attn, pos[:, -1:] + 1, logits
    cache = prefix_cache(runner, rows[0][:P], B)
    head_mask = torch.ones((1, P), dtype=torch.long, device=dev)
    ids, tail_mask = left_pad([r[P:] for r in rows], pad_id, dev)  # (B, S)
    attn = torch.cat([head_mask.expand(B, -1), tail_mask], dim=1)  # (B, P + S)
    pos = prompt_positions(attn)[:, P:]
    logits = runner(ids, attn, pos, cache, keep=keep)
    return cache, attn, pos[:, -1:] + 1, logits


def prefix_cache(runner: Runner, prefix: list[int], rows: int):
    """A new cache holding ``prefix`` (positions 0..P-1, no padding) for each of ``rows``
    rows. The prefix runs once for one row; the runner remembers its keys and values, so
    the next batch of the same call that shares it (every batch of an evaluation shares
    its system prompt) copies them instead of running it again."""
    key = tuple(prefix)
    saved = runner.prefix_memo.get(key)
    if saved is None:
        cache = runner.new_cache(1)
        head = torch.tensor([prefix], dtype=torch.long, device=runner.device)
        mask = torch.ones_like(head)
        runner(head, mask, prompt_positions(mask), cache, keep=1)
        layers = _plain_layers(cache)
        if layers is not None:  # (with the virtual positions before the prefix, if any)
            runner.prefix_memo[key] = [(layer.keys.clone(), layer.values.clone()) for layer in layers]
    else:
        cache = runner.empty_cache()
        seed_cache(cache, saved, 1)
    cache.batch_repeat_interleave(rows)
    return cache


def _plain_layers(cache) -> list | None:
    """The cache's layers when every one is a plain growing layer holding tensors (each row
    keeps every position, so rows and positions can be copied out), else None (sliding
    windows keep a suffix)."""
    layers = getattr(cache, "layers", None)
    plain = (_dynamic_layer_class(), growing_layer_class())
    if not layers or any(type(layer) not in plain or getattr(layer, "keys", None) is None for layer in layers):
        return None
    return layers


def _dynamic_layer_class():
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None
    return DynamicLayer


_GROWING: list = []


def growing_layer_class():
    """A ``DynamicLayer`` that appends in place: its keys and values are views of buffers
    with room to grow (by half again), so a decode step writes one position instead of copying
    the whole cache with ``torch.cat`` as transformers' layer does (measured on SmolLM2,
    CPU, batch 32 at ~70 cached tokens: the cat was 23 ms of a 124 ms step). The values
    are the same tensors' copies, so the outputs do not change. Operations that rebuild
    the tensors (selecting or repeating rows, cropping) drop the buffers, and the next
    append allocates new ones. None when transformers has no ``DynamicLayer``."""
    if _GROWING:
        return _GROWING[0]
    DynamicLayer = _dynamic_layer_class()
    if DynamicLayer is None:
        return None

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n = self.get_seq_length() if getattr(self, "is_initialized", False) else 0
            t = key_states.shape[-2]
            kb = getattr(self, "_kbuf", None)
            if n == 0 or kb is None or n + t > kb.shape[-2] or kb.shape[:-2] != key_states.shape[:-2]:
                # the parent appends (and initializes the layer its own way, which changed
                # across transformers versions); then the result moves into roomier buffers
                keys, values = super().update(key_states, value_states, *args, **kwargs)
                cap = n + t + max(64, (n + t) // 2)  # amortized: a reallocation per half again
                self._kbuf = keys.new_empty(keys.shape[:-2] + (cap, keys.shape[-1]))
                self._vbuf = values.new_empty(values.shape[:-2] + (cap, values.shape[-1]))
                self._kbuf[..., : n + t, :] = keys
                self._vbuf[..., : n + t, :] = values
            else:
                self._kbuf[..., n: n + t, :] = key_states
                self._vbuf[..., n: n + t, :] = value_states
            self.keys, self.values = self._kbuf[..., : n + t, :], self._vbuf[..., : n + t, :]
            return self.keys, self.values

        def _drop(self):
            self._kbuf = self._vbuf = None

        def reset(self):
            self._drop()
            super().reset()

        def crop(self, tokens_to_remove):
            super().crop(tokens_to_remove)
            self._drop()

        def batch_repeat_interleave(self, repeats):
            super().batch_repeat_interleave(repeats)
            self._drop()

        def batch_select_indices(self, indices):
            super().batch_select_indices(indices)
            self._drop()

    _GROWING.append(GrowingLayer)
    return GrowingLayer


def fork_cache(runner: Runner, cache, rows: torch.Tensor, length: int):
    """A new cache with ``rows`` of ``cache`` and their first ``length`` real positions
    (copies; the virtual positions before them come along), or None when its layers are
    not plain growing layers (sliding windows keep a suffix)."""
    layers = _plain_layers(cache)
    if layers is None:
        return None
    length += runner.offset
    new = runner.empty_cache()
    for i, layer in enumerate(layers):
        new.update(layer.keys[rows, :, :length].contiguous(), layer.values[rows, :, :length].contiguous(), i)
    return new


def decode(runner: Runner, rows: list[list[int]], *, limits: list[int], sampling: SamplingConfig,
           generator: torch.Generator | None, stop_ids: frozenset, stop_strings: tuple, tokenizer,
           need_logprobs: bool, pad_id: int, share_prefix: bool = True, static: str | None = None,
           start: tuple | None = None) -> Decoded:
    """Generate after each of ``rows`` (prompt token ids); row ``b`` makes at most
    ``limits[b]`` (>= 1) tokens. ``static``: None (a dynamic cache, finished rows leave
    the batch), ``"eager"`` or ``"graph"`` (:class:`fastlora.generate.static.StaticDecoder`,
    a fixed batch; ``"graph"`` replays a CUDA graph per step). ``start``: the rows'
    prefill already done, as :func:`prefill` returns it (cache, attention mask, next
    positions, last logits ``(B, V)``); dynamic cache only."""
    B = len(rows)
    dev = runner.device
    steps_max = max(limits)
    tokens = torch.full((B, steps_max), pad_id, dtype=torch.long, device=dev)
    lp = torch.zeros((B, steps_max), dtype=torch.float32, device=dev) if need_logprobs else None
    slp = torch.zeros((B, steps_max), dtype=torch.float32, device=dev) if need_logprobs else None
    lengths = [0] * B
    reasons = [""] * B
    texts_ids: list[list[int]] = [[] for _ in range(B)]

    fixed = None
    if static is not None:
        from .static import StaticDecoder

        fixed = StaticDecoder(runner, rows, pad_id, steps_max, use_graph=static == "graph")
        logits = fixed.prefill_logits
        feed = torch.full((B,), pad_id, dtype=torch.long, device=dev)  # finished rows read a pad
    elif start is not None:
        cache, attn, next_pos, logits = start
    else:
        cache, attn, next_pos, logits = prefill(runner, rows, pad_id, share_prefix)
        logits = logits[:, -1]  # (B, V)
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
        if fixed is not None:  # a fixed batch: every row runs, finished ones on a pad
            feed.fill_(pad_id)
            feed[active_t] = tok
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=dev)
                active_t = active_t[idx]
                active = [active[i] for i in keep]
            logits = fixed.step(feed)[active_t]
            continue
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
