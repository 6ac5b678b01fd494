"""``fastlora.generate``: batched generation on a (patched) 4-bit model, for evaluation,
PPO rollouts and label-restricted prediction.

The model is called as it is at call time: whatever PEFT adapter is active (or none,
under ``disable_adapter()``) is what generates, prompt-learning adapters included (their
virtual tokens or prefix come before every row: ``decode.VirtualPrefix``); an adapter kind
that the engine cannot run faithfully is refused with its name, never run as the base
model (``decode.unsupported_adapter``). The model is put in eval mode and run without grad
for the call; then every module gets back the train/eval flag it had. bitsandbytes'
in-place CPU repack (triggered by eval-mode, no-grad forwards of a ``Linear4bit`` on
AVX512-BF16 CPUs) is closed first with
``fastlora.patch.protect_bnb_weights``: generating never changes the weights a later
training step reads.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .decode import Runner, decode
from .sampling import check_sampling


@dataclass
class GenerationResult:
    """Per row (in the order of the input):

    - ``sequences``: the new token ids, a 1-D LongTensor on the model's device, the stop
      token included and nothing after it;
    - ``lengths``: ``(rows,)`` LongTensor, each row's number of new tokens;
    - ``texts``: the decoded new tokens (special tokens skipped) when a tokenizer is known;
    - ``finish_reasons``: ``"stop_token"``, ``"stop_string"``, ``"length"`` or ``"choice"``;
    - ``logprobs`` (``return_logprobs=True``): fp32 log-prob of each new token under the
      model's full untempered distribution, from the forward that chose it (PPO's old
      log-probs); ``sampling_logprobs``: under the distribution actually sampled from
      (0 for greedy).
    - with ``choices``: ``choices`` (the strings), ``choice_probs`` ``(rows, C)`` each
      choice's probability among the choices (rows sum to 1), ``choice_logprobs``
      ``(rows, C)`` its log-probability under the model (unrestricted), ``predictions``
      (the most probable choice) and ``confidences`` (its probability); with
      ``with_greedy=True``, ``greedy``: the unrestricted greedy answers (a result of
      their own), read off the same forwards.
    """

    sequences: list[torch.Tensor]
    lengths: torch.Tensor
    finish_reasons: list[str]
    texts: list[str] | None = None
    logprobs: list[torch.Tensor] | None = None
    sampling_logprobs: list[torch.Tensor] | None = None
    choices: list[str] | None = None
    choice_probs: torch.Tensor | None = None
    choice_logprobs: torch.Tensor | None = None
    predictions: list[str] | None = None
    confidences: list[float] | None = None
    info: dict = field(default_factory=dict)
    greedy: "GenerationResult | None" = None

    def __len__(self) -> int:
        return len(self.sequences)

    def padded(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` ``(rows, max_len)``: the sequences right-padded with ``pad_id``."""
        n = max((len(s) for s in self.sequences), default=0)
        dev = self.sequences[0].device if self.sequences else None
        ids = torch.full((len(self.sequences), n), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(self.sequences), n), dtype=torch.long, device=dev)
        for i, s in enumerate(self.sequences):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return ids, mask

    def padded_logprobs(self, sampling: bool = False) -> torch.Tensor:
        """``(rows, max_len)`` fp32 log-probs, 0 after each row's end."""
        src = self.sampling_logprobs if sampling else self.logprobs
        if src is None:
            raise ValueError("this result has no log-probs: call generate(..., return_logprobs=True)")
        n = max((len(s) for s in src), default=0)
        out = torch.zeros((len(src), n), dtype=torch.float32, device=src[0].device if src else None)
        for i, s in enumerate(src):
            out[i, : len(s)] = s
        return out


@contextlib.contextmanager
def _generation_mode(model) -> Iterator[None]:
    from ..patch import protect_bnb_weights

    protect_bnb_weights(model)  # before any eval-mode no-grad forward (see module docstring)
    # Each module's own flag, not the wrapper's: a PEFT wrapper reads True while the model
    # inside is in eval mode, and model.train(True) would then switch every dropout on
    # for whoever calls the model next (PPO's scoring passes did).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    hook = _contiguous_head_input(model)
    try:
        with torch.no_grad():
            yield
    finally:
        if hook is not None:
            hook.remove()
        for m, training in modes:
            m.training = training


def _contiguous_head_input(model):
    """transformers hands the output projection a strided view, the last positions of the
    hidden states (``logits_to_keep``). On CPU, ``F.linear`` on a strided 3-D input runs as
    a batched matmul over a broadcast weight, 3.7x slower than a matmul of a contiguous
    copy (measured: SmolLM2's head, (32, 5, 576) rows, 247 ms against 66 ms). For the
    call, a pre-hook on the head copies such an input; the values are the same."""
    from .decode import causal_lm

    get_head = getattr(causal_lm(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module):
        return None

    def contiguous(_module, args):
        if args and torch.is_tensor(args[0]) and not args[0].is_contiguous():
            return (args[0].contiguous(),) + tuple(args[1:])
        return None

    return head.register_forward_pre_hook(contiguous)


def _find_tokenizer(model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    return getattr(model, "tokenizer", None)


def _stop_ids(model, tokenizer, stop_token_ids) -> frozenset:
    if stop_token_ids is not None:
        ids = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative token ids, got {t!r}")
        return frozenset(ids)
    # generate's default: the generation config's eos (an int or a list), else the tokenizer's
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _tokenize(tokenizer, prompts, add_special_tokens: bool) -> list[list[int]]:
    if tokenizer is None:
        raise ValueError("prompts given as text need a tokenizer: pass tokenizer=... (or input_ids=...)")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        ids = list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
        if not ids:
            raise ValueError(f"prompts[{i}] is empty after tokenization ({p!r}): nothing to continue")
        out.append(ids)
    return out


def _rows_from_ids(input_ids, attention_mask) -> list[list[int]]:
    """The real tokens of each row of a left- or right-padded batch."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D LongTensor (batch, length), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                         f"{tuple(input_ids.shape)}")
    ids, mask = input_ids.tolist(), attention_mask.bool().tolist()
    rows = []
    for i, (r, m) in enumerate(zip(ids, mask)):
        real = [t for t, k in zip(r, m) if k]
        if not real:
            raise ValueError(f"row {i} of input_ids has no token (its attention_mask is all zero)")
        rows.append(real)
    return rows


def generate(
    model,
    prompts: Sequence[str] | None = None,
    *,
    tokenizer=None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    return_logprobs: bool = False,
    choices: Sequence[str] | None = None,
    batch_size: int | None = None,
    add_special_tokens: bool = True,
    share_prefix: bool = True,
    decoder: str = "auto",
    with_greedy: bool = False,
) -> GenerationResult:
    """Generate continuations of ``prompts`` (with ``tokenizer``) or of ``input_ids``
    ``(B, T)`` (left- or right-padded, with ``attention_mask``) on ``model``.

    Args:
        model: a causal LM (transformers), PEFT-wrapped or not, patched or not.
        max_new_tokens: at most this many new tokens per row (>= 1); a row also stops at
            a token of ``stop_token_ids`` (default: the generation config's eos) or once its
            text contains one of ``stop_strings``.
        temperature: 0 for greedy (token-for-token what transformers' ``generate`` picks),
            else sampling at this temperature, after ``top_k`` / ``top_p`` filtering.
        seed: makes sampling reproducible (default: drawn from torch's global RNG).
        return_logprobs: also return per-token log-probs (see :class:`GenerationResult`).
        choices: restrict the answer to exactly one of these strings (a token trie); the
            result gives each choice's probability. See :mod:`fastlora.generate.choices`.
        batch_size: rows per forward (default: all at once); rows are grouped by length.
        add_special_tokens: passed to the tokenizer for text prompts.
        share_prefix: run the leading tokens all rows of a batch share (a system prompt)
            once; False lays rows out exactly as transformers' ``generate`` does.
        decoder: ``"dynamic"`` (a growing KV cache; finished rows leave the batch),
            ``"static"`` (a preallocated cache, fixed batch), ``"cuda_graph"`` (static,
            each decode step replayed as a CUDA graph; CUDA only) or ``"auto"``
            (``cuda_graph`` on CUDA where the model allows it, else ``dynamic``).
        with_greedy: with ``choices``, also the unrestricted greedy answer of each row (up
            to ``max_new_tokens``, stopping at ``stop_token_ids``) in ``result.greedy``,
            from the forwards that score the choices: an evaluation that wants both the
            free answer and the label-restricted one runs each prompt once, and a row whose
            greedy answer is a choice then a stop token needs no decode step.
    """
    tokenizer = _find_tokenizer(model, tokenizer)
    if (prompts is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompts (with a tokenizer) or input_ids")
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: nothing to generate")
        rows = _tokenize(tokenizer, prompts, add_special_tokens)
    else:
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids has no rows (batch size 0): nothing to generate")
        rows = _rows_from_ids(input_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    sampling = check_sampling(temperature, top_k, top_p)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = tuple(stop_strings or ())
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")

    if decoder not in ("auto", "dynamic", "static", "cuda_graph"):
        raise ValueError(f"decoder must be 'auto', 'dynamic', 'static' or 'cuda_graph', got {decoder!r}")
    runner = Runner(model)
    static = _static_mode(runner, decoder)
    stop_ids = _stop_ids(runner.lm, tokenizer, stop_token_ids)
    ctx = runner.context_length()
    limits = []
    for i, r in enumerate(rows):
        if ctx is not None and len(r) >= ctx:
            room = "" if not runner.offset else f", less the adapter's {runner.offset} virtual tokens"
            raise ValueError(f"prompt {i} has {len(r)} tokens but the model's context is {ctx} tokens "
                             f"(max_position_embeddings{room}): no room to generate")
        limits.append(max_new_tokens if ctx is None else min(max_new_tokens, ctx - len(r)))
    pad_id = _pad_id(runner, tokenizer)

    if with_greedy:
        if choices is None:
            raise ValueError("with_greedy=True reads the greedy answer off the choice scoring: pass choices=")
        if not sampling.greedy:
            raise ValueError(f"with_greedy=True is greedy decoding; it cannot sample (temperature={temperature})")
        if stop_strings:
            raise ValueError("with_greedy=True stops at stop_token_ids only, not at stop_strings")
    if choices is not None:
        from .choices import score_choices

        with _generation_mode(model):
            return score_choices(runner, rows, choices, tokenizer=tokenizer, stop_ids=stop_ids, pad_id=pad_id,
                                 batch_size=batch_size, ctx=ctx, prompt_texts=prompts,
                                 add_special_tokens=add_special_tokens,
                                 greedy_limits=limits if with_greedy else None, share_prefix=share_prefix)

    generator = None
    if not sampling.greedy:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device=runner.device).manual_seed(int(seed))

    B = len(rows)
    bs = batch_size or B
    # Similar lengths together when batching (less padding); one batch keeps the order.
    order = list(range(B)) if bs >= B else sorted(range(B), key=lambda i: len(rows[i]))
    seqs: list = [None] * B
    lps: list = [None] * B
    slps: list = [None] * B
    reasons: list = [None] * B
    with _generation_mode(model):
        for s in range(0, B, bs):
            idx = order[s: s + bs]
            d = decode(runner, [rows[i] for i in idx], limits=[limits[i] for i in idx], sampling=sampling,
                       generator=generator, stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer,
                       need_logprobs=return_logprobs, pad_id=pad_id, share_prefix=share_prefix,
                       static=static)
            for j, i in enumerate(idx):
                n = d.lengths[j]
                seqs[i] = d.tokens[j, :n]
                reasons[i] = d.reasons[j]
                if return_logprobs:
                    lps[i] = d.logprobs[j, :n]
                    slps[i] = d.sampling_logprobs[j, :n]
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(s.tolist(), skip_special_tokens=True) for s in seqs]
    return GenerationResult(
        sequences=seqs, lengths=torch.tensor([len(s) for s in seqs], dtype=torch.long), finish_reasons=reasons,
        texts=texts, logprobs=lps if return_logprobs else None,
        sampling_logprobs=slps if return_logprobs else None,
        info={"seed": seed, "prompt_lengths": [len(r) for r in rows]},
    )


def _pad_id(runner: Runner, tokenizer) -> int:
    for src in (tokenizer, runner.config, getattr(runner.lm, "generation_config", None)):
        v = getattr(src, "pad_token_id", None) if src is not None else None
        if isinstance(v, int):
            return v
    return 0


def _static_mode(runner: Runner, decoder: str) -> str | None:
    """None (dynamic), "eager" or "graph", for ``decode``."""
    if decoder == "dynamic":
        return None
    from .static import supports_static

    why = supports_static(runner)
    on_cuda = runner.device.type == "cuda"
    if decoder == "auto":
        return "graph" if on_cuda and why is None else None
    if why is not None:
        raise ValueError(f"decoder={decoder!r} is not available for this model: {why}")
    if decoder == "cuda_graph":
        if not on_cuda:
            raise ValueError(f"decoder='cuda_graph' needs the model on a CUDA device, it is on {runner.device}")
        return "graph"
    return "eager"
