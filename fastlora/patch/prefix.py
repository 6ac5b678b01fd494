"""Shared-prefix execution: every token that rows of a batch share runs once.

``fastlora.patch(model)`` (``share_prefix=True``, the default) binds this forward on each
transformers decoder (``LlamaModel``, ``Qwen2Model``, ...: the module a ``*ForCausalLM``
or ``*ForSequenceClassification`` keeps at ``base_model_prefix``). Every caller of the
model, fastlora's trainers, TRL's trainers and user code, goes through it unchanged.

A call is planned (:mod:`fastlora.patch.prefix_plan`): the batch becomes a prefix tree
laid out as a few packed sequences. The decoder's own forward then runs on those, with

* ``position_ids`` = each node's depth in its rows (the RoPE position it has in every
  row that holds it; RoPE is relative, so left padding's offset changes nothing);
* a tree mask: each node attends to exactly the earlier tokens of its own rows, and
  under a sliding window only to those less than ``sliding_window`` back. It is a 4D
  tensor for eager (additive) and SDPA (bool) attention, one per layer type where the
  config has ``layer_types`` (Gemma2, Qwen2, ...: their forward takes the dict), and a
  FlexAttention ``BlockMask`` for ``flex_attention``, which then skips the blocks no node
  attends to instead of materializing a dense ``T x T`` mask.

The hidden states (and ``output_hidden_states``) are gathered back to ``(B, L, H)``
before anything else sees them, so the head, fused cross-entropy, ``token_logprobs``,
value and reward heads see what they always see; the gather's backward sums the
gradients of the positions that share a node. Padding positions read zeros.

Why a packed tree rather than a differentiable shared KV cache: the cache needs one
forward per tree level, each padded to its longest member, and a cache object whose
layout differs across transformers versions; the packed tree is one forward of the
model's own code with only standard inputs (ids, positions, a mask), at any depth of
sharing, and it also drops the batch's padding.

Never silently different: these calls run the plain batch and count the reason in
:func:`shared_prefix_stats` (``fallbacks``): a cache passed or ``use_cache=True``; a 4D
or dict mask of the caller's, or packed ``position_ids``; ``inputs_embeds``; attention
outputs; any argument this forward does not know; dropout active in training mode (one
mask for a shared token is not the distribution of one mask per row); an attention
backend without arbitrary masks (flash-attention kernels); a plan that saves too little.
Gradient checkpointing works: it re-runs the same layers on the same packed inputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import sys
from collections import Counter

import torch
from torch import nn

from . import _bind, tree_attention
from .prefix_plan import MIN_SAVING, CostModel, PrefixPlan, plan_batch

KIND = "shared prefix"
# attention backends that take an arbitrary mask; flash-attention kernels take none
_BACKENDS = ("eager", "sdpa", "flex_attention")
# keyword arguments the plan understands; anything else runs the plain batch. A causal
# LM hands its loss arguments on to the decoder, which ignores them.
_KNOWN = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds",
                    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "cache_position",
                    "num_items_in_batch", "shift_labels", "ignore_index"})


# Set by a caller that knows the plain batch is needed for a reason the decoder cannot see
# (the patched head: a trained label predicted from a padding position).
_PLAIN = contextvars.ContextVar("fastlora_prefix_plain", default=None)


@contextlib.contextmanager
def plain_batch(reason: str):
    """Inside the block, patched decoders run the plain batch and count ``reason``."""
    token = _PLAIN.set(reason)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def label_from_padding(labels: torch.Tensor, attention_mask, *, ignore_index: int = -100,
                       shift_labels: torch.Tensor | None = None) -> bool:
    """True when a trained target is predicted from a padding position (a left-padded
    row whose first real token is a label). The plain batch computes that loss term from
    the padding position's hidden state, which a packed tree does not run."""
    if attention_mask is None or not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
        return False
    if shift_labels is None:
        if labels is None or labels.shape != attention_mask.shape:
            return False
        shift_labels = labels[:, 1:]
        pad = attention_mask[:, :-1] == 0
    else:
        if shift_labels.shape != attention_mask.shape:
            return False
        pad = attention_mask == 0
    return bool((pad & (shift_labels.to(pad.device) != ignore_index)).any())


@dataclasses.dataclass
class PrefixState:
    """What a patched decoder keeps: its cost model, forward signature and counters."""

    cost: CostModel
    min_saving: float = MIN_SAVING
    signature: inspect.Signature | None = None
    calls: int = 0
    shared_calls: int = 0
    tokens_in: int = 0
    tokens_run: int = 0
    fallbacks: Counter = dataclasses.field(default_factory=Counter)

    def stats(self) -> dict:
        return {"calls": self.calls, "shared_calls": self.shared_calls, "tokens_in": self.tokens_in,
                "tokens_run": self.tokens_run, "fallbacks": dict(self.fallbacks)}


def text_config(module: nn.Module):
    cfg = module.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, decoder) of every transformers decoder that a head model in ``model`` runs:
    the module at a ``PreTrainedModel``'s ``base_model_prefix`` (``model.model`` of a
    ``LlamaForCausalLM``), each once."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    out, seen = [], set()
    for m in model.modules():
        if not isinstance(m, transformers.PreTrainedModel):
            continue
        dec = getattr(m, getattr(m, "base_model_prefix", "") or "", None)
        if isinstance(dec, nn.Module) and dec is not m and id(dec) not in seen and id(dec) in names:
            seen.add(id(dec))
            out.append((names[id(dec)], dec))
    return out


def unsupported_reason(dec: nn.Module) -> str | None:
    """Why ``dec`` cannot run a packed tree (None: it can)."""
    cfg = text_config(dec)
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if not isinstance(getattr(dec, "rotary_emb", None), nn.Module):
        return (f"{type(dec).__name__} has no rotary position embedding (rotary_emb): only RoPE decoders, "
                "whose attention depends on relative positions, are planned")
    types = getattr(cfg, "layer_types", None)
    if types is not None and not set(types) <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(set(types) - {'full_attention', 'sliding_attention'})} are not planned"
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in _BACKENDS:
        return f"attention backend {impl!r} takes no arbitrary mask"
    return None


def dropout_reason(dec: nn.Module) -> str | None:
    """A dropout that would draw one mask for a node where the plain batch draws one per
    row: any dropout module with p > 0 in training mode (LoRA's, embeddings', residual),
    or an attention module in training mode with ``attention_dropout`` > 0."""
    for m in dec.modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return "dropout > 0 in training mode"
        p = getattr(m, "attention_dropout", 0.0)
        if isinstance(p, float) and p > 0:
            return "attention dropout > 0 in training mode"
    return None


def _flatten(sig: inspect.Signature | None, args, kwargs) -> dict | None:
    if sig is None:
        return None if args else dict(kwargs)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            out[name] = value
    return out


def _call_reason(dec: nn.Module, a: dict) -> str | None:
    unknown = sorted(k for k, v in a.items() if k not in _KNOWN and v is not None)
    if any(k.startswith(("cu_seq_lens", "max_length_")) for k in unknown):
        return "packed sequences (cu_seq_lens)"
    if unknown:
        return f"argument {unknown[0]!r}"
    if a.get("cache") is not None or a.get("past_key_values") is not None:
        return "a cache is passed"
    if a.get("use_cache"):
        return "use_cache=True"
    if a.get("input_ids") is None:
        return "inputs_embeds instead of input_ids"
    cfg = text_config(dec)
    if a.get("output_attentions", getattr(cfg, "output_attentions", False)):
        return "output_attentions"
    mask = a.get("attention_mask")
    if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
        return "a 4D or prepared attention mask"
    ids = a["input_ids"]
    if ids.dim() != 2 or (mask is not None and mask.shape != ids.shape):
        return "input_ids / attention_mask shapes"
    cp = a.get("cache_position")
    if cp is not None and not torch.equal(cp.cpu(), torch.arange(ids.shape[1])):
        return "cache_position"
    return dropout_reason(dec) or unsupported_reason(dec)


def _positions_reason(position_ids: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Caller's position ids are fine when they count up by one over each row's real
    tokens (any offset: RoPE is relative); packed rows restart them mid-row."""
    pos = position_ids.expand(ids.shape[0], -1) if position_ids.shape[0] == 1 else position_ids
    if pos.shape != ids.shape:
        return "position_ids shape"
    step = pos[:, 1:] - pos[:, :-1]
    both = torch.ones_like(step, dtype=torch.bool) if mask is None else (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    return None if bool((step[both] == 1).all()) else "packed position_ids"


def _masks(dec: nn.Module, plan: PrefixPlan, dtype: torch.dtype):
    """The tree mask in the form the decoder's attention backend and layer types take."""
    cfg = text_config(dec)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    kinds = {t: (window if t == "sliding_attention" else None) for t in set(types)} if types is not None else None

    def one(w):
        if impl == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            return create_block_mask(plan.mask_mod(w), plan.n_bins, None, plan.cap, plan.cap,
                                     device=plan.ids.device)
        ok = plan.allowed(w)[:, None]  # (n_bins, 1, C, C)
        if impl == "sdpa":
            return ok
        return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)

    if kinds is None:
        return one(window)
    built: dict = {}  # layer types with the same window share one mask
    for w in kinds.values():
        if w not in built:
            built[w] = one(w)
    return {t: built[w] for t, w in kinds.items()}


def _embed_dtype(dec: nn.Module) -> torch.dtype:
    emb = dec.get_input_embeddings() if hasattr(dec, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w.dtype if torch.is_tensor(w) and w.is_floating_point() else torch.float32


def run_packed(dec: nn.Module, original, a: dict, plan: PrefixPlan):
    """The decoder's own forward on the packed tree; outputs back in ``(B, L, ...)``."""
    kw = {k: v for k, v in a.items() if k not in ("cache", "past_key_values", "inputs_embeds", "cache_position")}
    return_dict = kw.pop("return_dict", None)
    kw.update(input_ids=plan.ids, attention_mask=_masks(dec, plan, _embed_dtype(dec)), position_ids=plan.positions,
              use_cache=False, return_dict=True)
    cfg = text_config(dec)
    lay = None
    # Not under gradient checkpointing: its recomputation in backward runs outside this call,
    # on plain SDPA, and must save the same tensors as the forward did.
    checkpointing = getattr(dec, "gradient_checkpointing", False) and dec.training and torch.is_grad_enabled()
    if (getattr(cfg, "_attn_implementation", None) == "sdpa" and plan.cap >= 2 * tree_attention.BLOCK
            and not checkpointing):
        lay = tree_attention.layout(plan.end)
    if lay is not None and lay.skipped >= tree_attention.MIN_SKIPPED:
        with tree_attention.active(cfg, lay):  # SDPA on the key blocks each query block sees
            out = original(**kw)
    else:
        out = original(**kw)
    out["last_hidden_state"] = plan.unpack(out["last_hidden_state"])
    if out.get("hidden_states") is not None:
        out["hidden_states"] = tuple(plan.unpack(h) for h in out["hidden_states"])
    return out.to_tuple() if return_dict is False else out


def shared_forward(self: nn.Module, *args, **kwargs):
    """The forward bound on a patched decoder (see the module docstring)."""
    st = _bind.state(self)
    ps: PrefixState = st.extra
    ps.calls += 1
    a = _flatten(ps.signature, args, kwargs)
    why = _PLAIN.get() or ("positional arguments" if a is None else _call_reason(self, a))
    ids = None if a is None else a.get("input_ids")
    if ids is not None and ids.dim() == 2:
        mask = a.get("attention_mask")
        real = int(ids.numel() if mask is None or mask.dim() != 2 else (mask != 0).sum())
        ps.tokens_in += real
        if why is None and a.get("position_ids") is not None:
            why = _positions_reason(a["position_ids"], ids, mask)
        if why is None:
            sparse = getattr(text_config(self), "_attn_implementation", None) in ("sdpa", "flex_attention")
            plan = plan_batch(ids, mask, dataclasses.replace(ps.cost, sparse=sparse), min_saving=ps.min_saving,
                              pad_id=int(getattr(text_config(self), "pad_token_id", None) or 0))
            if isinstance(plan, PrefixPlan):
                ps.shared_calls += 1
                ps.tokens_run += plan.tokens_run
                return run_packed(self, st.original, a, plan)
            why = plan
        ps.tokens_run += ids.numel()
    elif why is None:
        why = "input_ids shape"
    ps.fallbacks[why] += 1
    return st.original(*args, **kwargs)


def patch_decoder(dec: nn.Module, min_saving: float = MIN_SAVING) -> None:
    ps = PrefixState(cost=CostModel.from_config(text_config(dec)), min_saving=min_saving)
    _bind.bind(dec, KIND, shared_forward, extra=ps)
    try:
        ps.signature = inspect.signature(_bind.state(dec).original)
    except (TypeError, ValueError):  # no readable signature: keyword calls only
        ps.signature = None


def verify(dec: nn.Module) -> str | None:
    """Run a tiny batch with shared prefixes both ways (eval mode, no grad) and compare the
    hidden states at every real position: a family whose decoder does something the
    plan does not model is then left alone and reported. None when they agree."""
    st = _bind.state(dec)
    emb = dec.get_input_embeddings() if hasattr(dec, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if not torch.is_tensor(w) or w.device.type == "meta":
        return "cannot run the shared-prefix self-check (no input embedding weights on a real device)"
    vocab = int(getattr(text_config(dec), "vocab_size", 0) or w.shape[0])
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(3, max(4, vocab), (4, 12), generator=g)
    tok[1:3, :6] = tok[0, :6]  # three rows share 6 tokens, two of them 9
    tok[2, 6:9] = tok[1, 6:9]
    ids = tok.to(w.device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids[1] = torch.cat([ids[1, 10:], ids[1, :10]])  # row 1 shifted right by two
    mask[3, 9:] = 0  # right padding
    plan = plan_batch(ids, mask, CostModel(1.0, 0.0), min_saving=0.0)
    if not isinstance(plan, PrefixPlan):
        return f"shared-prefix self-check could not plan: {plan}"
    modes = [(m, m.training) for m in dec.modules()]
    dec.eval()
    real = mask != 0
    try:
        with torch.no_grad():
            got = run_packed(dec, st.original, {"input_ids": ids, "attention_mask": mask}, plan)["last_hidden_state"]
            # the reference: each row alone, unpadded (a padded plain batch is not always
            # a clean oracle: transformers' float64 eager mask turns left padding into NaN)
            ref = torch.cat([st.original(input_ids=ids[b][real[b]][None], use_cache=False)["last_hidden_state"][0]
                             for b in range(ids.shape[0])])
    except Exception as e:  # an unusual decoder: leave it alone and say why
        return f"shared-prefix self-check could not run: {type(e).__name__}: {e}"
    finally:
        for m, t in modes:
            m.training = t
    ref, got = ref.float(), got[real].float()
    err = ((got - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
    tol = 1e-4 if ref.dtype == torch.float32 and w.dtype == torch.float32 else 2e-2
    if not err <= tol:
        return f"shared-prefix self-check failed: hidden states differ from the plain batch ({err:.2e} relative)"
    return None


def shared_prefix_stats(model: nn.Module, *, reset: bool = False) -> dict:
    """Counters of the shared-prefix forwards of every patched decoder in ``model``,
    summed since the patch (or the last ``reset``): ``calls``, ``shared_calls``,
    ``tokens_in`` (real tokens of the batches), ``tokens_run`` (positions the decoder
    layers ran: padding included, shared tokens once), ``fallbacks`` (reason -> count)."""
    total = PrefixState(cost=CostModel(0.0, 0.0))
    for m in model.modules():
        st = _bind.state(m)
        if st is None or st.kind != KIND:
            continue
        ps: PrefixState = st.extra
        total.calls += ps.calls
        total.shared_calls += ps.shared_calls
        total.tokens_in += ps.tokens_in
        total.tokens_run += ps.tokens_run
        total.fallbacks.update(ps.fallbacks)
        if reset:
            ps.calls = ps.shared_calls = ps.tokens_in = ps.tokens_run = 0
            ps.fallbacks.clear()
    return total.stats()


def set_min_saving(model: nn.Module, min_saving: float) -> int:
    """Set the saving below which every patched decoder in ``model`` runs the plain batch
    (default :data:`~fastlora.patch.prefix_plan.MIN_SAVING`; ``float('-inf')`` plans every
    batch, as the exactness tests do). Returns the number of decoders changed."""
    n = 0
    for m in model.modules():
        st = _bind.state(m)
        if st is not None and st.kind == KIND:
            st.extra.min_saving = float(min_saving)
            n += 1
    return n


class PrefixMeter:
    """The shared-prefix counters of a trainer's own forwards (not of its evaluation):
    ``with meter.window() as w: <training forwards>`` leaves that window's ``tokens_in``
    / ``tokens_run`` in ``w`` and adds them to the meter's totals. It reads differences of
    :func:`shared_prefix_stats`, so the counters a user watches are never reset."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tokens_in = 0
        self.tokens_run = 0

    @contextlib.contextmanager
    def window(self):
        before = shared_prefix_stats(self.model)
        w: dict = {}
        yield w
        after = shared_prefix_stats(self.model)
        w["tokens_in"] = after["tokens_in"] - before["tokens_in"]
        w["tokens_run"] = after["tokens_run"] - before["tokens_run"]
        w["tokens_run_fraction"] = self.fraction(w["tokens_run"], w["tokens_in"])
        self.tokens_in += w["tokens_in"]
        self.tokens_run += w["tokens_run"]

    @property
    def total_fraction(self) -> float | None:
        return self.fraction(self.tokens_run, self.tokens_in)

    @staticmethod
    def fraction(run: int, tokens_in: int) -> float | None:
        """Positions the decoder layers ran per real token (None: nothing was counted, e.g.
        the model is not patched)."""
        return run / tokens_in if tokens_in else None
