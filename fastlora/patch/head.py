"""Handler for the causal-LM head and loss.

When a patched causal LM is called in training mode with ``labels``, it runs its
decoder (``getattr(model, model.base_model_prefix)``, transformers' convention), then
``fastlora.linear_cross_entropy`` on the hidden states and the output embedding, so
the (tokens, vocab) logits never exist. It returns a ``CausalLMOutputWithPast`` whose
``loss`` is what transformers' ``ForCausalLMLoss`` would give and whose ``logits`` is
None. In eval mode, without labels, with ``logits_to_keep``, or with anything we
cannot reproduce, the original forward runs and returns the usual logits.

The head is described by a :class:`HeadSpec` built from the config (final logit
softcapping, ``logit_scale``, ``logits_scaling``) and checked at patch time: one tiny
eval forward of the original model is compared with the spec's logits, so a family
whose head does something the config does not say is left alone and reported, rather
than trained on a wrong loss.

Labels follow transformers: pad with ``ignore_index`` on the right and shift by one
(or take ``shift_labels`` as given); with ``num_items_in_batch`` the loss is the sum
over tokens divided by it (gradient accumulation), else the mean over kept tokens.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types

import torch
from torch import nn

from .._ext import warn_once
from . import _bind, prefix
from .lora import is_lora_layer, _peft_lora_types

KIND = "causal-lm head+loss"


@dataclasses.dataclass
class HeadSpec:
    logit_scale: float = 1.0
    softcap: float | None = None
    signature: inspect.Signature | None = None
    decoder_kwargs: bool = True  # the decoder's forward takes **kwargs
    decoder_params: frozenset = frozenset()
    backend: object = None  # passed to linear_cross_entropy when set


def is_causal_lm(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    return (
        isinstance(module, transformers.PreTrainedModel)
        and type(module).__name__.endswith("ForCausalLM")
        and not getattr(module.config, "is_encoder_decoder", False)
    )


def _decoder(lm: nn.Module) -> nn.Module | None:
    dec = getattr(lm, getattr(lm, "base_model_prefix", "") or "", None)
    return dec if isinstance(dec, nn.Module) and dec is not lm else None


def _text_config(lm):
    cfg = lm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def head_weights(lm: nn.Module, training: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """(weight, bias, None) of the output projection, LoRA folded in; or (None, None, reason).

    A LoRA adapter on the head is folded exactly as W + s·B·A (the adapter's gradient
    flows through the fold); its dropout cannot be folded, so p > 0 in training is refused.
    """
    head = _unwrap_modules_to_save(lm.get_output_embeddings())
    if head is None:
        return None, None, "the model has no output embeddings"
    if _bind.module_type(head) is nn.Linear:  # also when fully_shard made it an FSDPLinear
        return head.weight, head.bias, None
    if is_lora_layer(head):
        if _bind.module_type(head) not in _peft_lora_types() or _bind.module_type(head.get_base_layer()) is not nn.Linear:
            return None, None, f"lm_head is {type(head).__name__} over {type(head.get_base_layer()).__name__}"
        if getattr(head, "fan_in_fan_out", False):
            return None, None, "lm_head LoRA has fan_in_fan_out=True"
        base = head.get_base_layer()
        w = base.weight
        if head.disable_adapters or head.merged:
            return w, base.bias, None
        for a in head.active_adapters:
            if a not in head.lora_A:
                continue
            if a in getattr(head, "lora_variant", {}) or head.lora_bias.get(a, False):
                return None, None, f"lm_head adapter {a!r} uses a LoRA variant or lora_bias"
            drop = head.lora_dropout[a]
            if type(drop) is nn.Dropout and drop.p > 0 and training and drop.training:
                return None, None, f"lm_head adapter {a!r} has dropout {drop.p} (not foldable into the weight)"
            if type(drop) not in (nn.Dropout, nn.Identity):
                return None, None, f"lm_head adapter {a!r} has dropout module {type(drop).__name__}"
            A, B = head.lora_A[a].weight, head.lora_B[a].weight
            w = w + (head.scaling[a] * (B.to(w.dtype) @ A.to(w.dtype)))  # (V, H)
        return w, base.bias, None
    return None, None, f"lm_head type {type(head).__module__}.{type(head).__name__} is not fused"


def _unwrap_modules_to_save(head):
    """The module a PEFT ``modules_to_save`` wrapper would run now (PEFT's own rule)."""
    other = sys.modules.get("peft.utils.other")
    wrapper = getattr(other, "ModulesToSaveWrapper", None)
    if wrapper is None or type(head) is not wrapper:
        return head
    active = list(head.active_adapters)
    if head.disable_adapters or not active or any(a not in head.modules_to_save for a in active):
        return head.original_module
    return head.modules_to_save[active[0]]


def _loss_reason(lm: nn.Module) -> str | None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    if lm.loss_function is not ForCausalLMLoss:
        return f"custom loss_function {getattr(lm.loss_function, '__name__', lm.loss_function)!r}"
    cfg = _text_config(lm)
    if getattr(cfg, "output_router_logits", False):
        return "MoE router auxiliary loss (output_router_logits=True) is added by the original forward"
    return None


def _head_logits(h: torch.Tensor, w: torch.Tensor, b, spec: HeadSpec) -> torch.Tensor:
    logits = nn.functional.linear(h.to(w.dtype), w, b).float() * spec.logit_scale
    if spec.softcap is not None:
        logits = torch.tanh(logits / spec.softcap) * spec.softcap
    return logits


def _call_decoder(lm: nn.Module, spec: HeadSpec, arguments: dict):
    dec = _decoder(lm)
    if not spec.decoder_kwargs:
        arguments = {k: v for k, v in arguments.items() if k in spec.decoder_params}
    out = dec(**arguments)
    return out, (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])


def _candidate_scales(cfg) -> list[float]:
    s = getattr(cfg, "logit_scale", None)
    base = float(s) if isinstance(s, (int, float)) and s else 1.0
    ls = getattr(cfg, "logits_scaling", None)
    if isinstance(ls, (int, float)) and ls and ls != 1:
        # transformers families disagree on whether logits_scaling divides or multiplies.
        return [base / ls, base * ls]
    return [base]


def build_spec(lm: nn.Module, original, *, verify: bool = True) -> tuple[HeadSpec | None, str | None]:
    """The head spec of ``lm``, checked against its original forward; or (None, reason)."""
    dec = _decoder(lm)
    if dec is None:
        return None, f"no decoder at model.{getattr(lm, 'base_model_prefix', None)}"
    why = _loss_reason(lm)
    if why:
        return None, why
    w, b, why = head_weights(lm, training=False)
    if why:
        return None, why
    cfg = _text_config(lm)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    try:
        sig = inspect.signature(original)
        dsig = inspect.signature(dec.forward)
    except (TypeError, ValueError) as e:
        return None, f"cannot read the forward signature: {e}"
    if "labels" not in sig.parameters:
        return None, "forward takes no labels argument"
    dec_kwargs = any(p.kind is p.VAR_KEYWORD for p in dsig.parameters.values())
    spec = HeadSpec(
        softcap=float(softcap) if softcap else None,
        signature=sig,
        decoder_kwargs=dec_kwargs,
        decoder_params=frozenset(dsig.parameters),
    )
    candidates = _candidate_scales(cfg)
    if not verify:
        if len(candidates) > 1:
            return None, "ambiguous logits_scaling and verify=False"
        spec.logit_scale = candidates[0]
        return spec, None
    return _verify(lm, original, spec, candidates)


def _verify(lm, original, spec: HeadSpec, candidates) -> tuple[HeadSpec | None, str | None]:
    emb = lm.get_input_embeddings()
    device = emb.weight.device if emb is not None and hasattr(emb, "weight") else None
    if device is None or device.type == "meta":
        return None, "cannot run the head self-check (no input embedding weights on a real device)"
    vocab = int(getattr(_text_config(lm), "vocab_size", 2) or 2)
    ids = (torch.arange(1, 6, device=device) * 7919 % vocab).unsqueeze(0)  # (1, 5)
    modes = [(m, m.training) for m in lm.modules()]
    lm.eval()  # no dropout, so both paths see the same decoder output
    try:
        with torch.no_grad():
            ref = original(input_ids=ids, use_cache=False).logits.float()
            _, h = _call_decoder(lm, spec, {"input_ids": ids, "use_cache": False})
            w, b, why = head_weights(lm, training=False)
            if why:
                return None, why
            tol = 1e-4 if h.dtype == torch.float32 and w.dtype == torch.float32 else 2e-2
            errs = []
            for s in candidates:
                spec.logit_scale = s
                got = _head_logits(h, w, b, spec)
                err = ((got - ref).abs().max() / (ref.abs().max() + 1.0)).item()
                if got.shape == ref.shape and err <= tol:
                    return spec, None
                errs.append(f"scale {s:g}: {err:.2e}")
    except Exception as e:  # an unusual model: leave it alone and say why
        return None, f"head self-check could not run: {type(e).__name__}: {e}"
    finally:
        for m, t in modes:
            m.training = t
    return None, (
        "head self-check failed: the model's logits differ from hidden·Wᵀ with the config's "
        f"softcap/scale ({'; '.join(errs)} relative error)"
    )


def _flatten_arguments(sig: inspect.Signature, args, kwargs) -> dict | None:
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


def causal_lm_forward(self: nn.Module, *args, **kwargs):
    """The forward bound on a patched causal LM (see the module docstring)."""
    st = _bind.state(self)
    spec: HeadSpec = st.extra
    if not self.training:  # eval and generation: the original logits, unchanged
        return st.original(*args, **kwargs)
    arguments = _flatten_arguments(spec.signature, args, kwargs)
    if arguments is None or arguments.get("labels") is None:
        return st.original(*args, **kwargs)
    fused = _fused(self, spec, arguments)
    if fused is None:
        return st.original(*args, **kwargs)
    out, loss, return_dict = fused

    from transformers.modeling_outputs import CausalLMOutputWithPast

    result = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
    return result if return_dict is not False else result.to_tuple()


def fused_loss(lm: nn.Module, **arguments) -> tuple[torch.Tensor, object] | None:
    """``(loss, decoder output)`` of a patched causal LM called with ``arguments`` (its
    forward's keywords, ``labels`` included) through the decoder and the fused linear
    cross-entropy, in eval mode too; None when ``lm`` is not patched or its loss cannot
    run fused now: the caller then calls ``lm`` itself.

    The bound forward fuses in training only, because in eval mode its callers
    (transformers' Trainer, metrics) expect the logits. An evaluation that wants only
    the loss calls this: the (tokens, vocab) logits never exist, and the head runs on
    the trained tokens only (``linear_cross_entropy`` drops ignored rows first)."""
    st = _bind.state(lm)
    if st is None or st.kind != KIND or arguments.get("labels") is None:
        return None
    fused = _fused(lm, st.extra, dict(arguments))
    return None if fused is None else (fused[1], fused[0])


def _fused(lm: nn.Module, spec: HeadSpec, arguments: dict):
    """(decoder output, loss, return_dict) by the fused head, or None (then the original forward)."""
    keep = arguments.get("logits_to_keep", 0)
    if not (keep is None or (isinstance(keep, int) and keep == 0)):
        return None
    if arguments.get("output_router_logits"):
        warn_once("head-runtime:router", "fastlora: output_router_logits=True: the MoE auxiliary "
                  "loss needs the original forward, which materializes the logits")
        return None
    why = _loss_reason(lm)
    sharded = _fsdp_head(lm)
    if sharded is None:
        w, b, why2 = head_weights(lm, training=lm.training) if why is None else (None, None, why)
    else:  # its weight is a shard until its own forward gathers it: read it only in there
        w, b, why2 = None, None, why
    if why2 is not None:
        warn_once(f"head-runtime:{why2}", f"fastlora: the causal-LM loss runs unfused: {why2}")
        return None

    labels = arguments.pop("labels")
    arguments.pop("logits_to_keep", None)
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(lm.config, "return_dict", True)
    if prefix.label_from_padding(labels, arguments.get("attention_mask"),
                                 ignore_index=arguments.get("ignore_index", -100),
                                 shift_labels=arguments.get("shift_labels")):
        with prefix.plain_batch("a trained label predicted from a padding position"):
            out, hidden = _call_decoder(lm, spec, arguments)
    else:
        out, hidden = _call_decoder(lm, spec, arguments)
    if sharded is None:
        loss = causal_lm_loss(hidden, w, b, labels, spec, **arguments)
    else:
        loss = _sharded_head_loss(lm, sharded, hidden, labels, spec, arguments)
        if loss is None:  # the gathered head turned out not fusable
            return None
    return out, loss, return_dict


_FSDP_LOSS = "_fastlora_head_loss"


def _fsdp_head(lm: nn.Module) -> nn.Module | None:
    """The output embedding when it is its own FSDP2 unit (``fully_shard(lm_head)``), else None.

    Then, outside the head's own forward, ``lm_head.weight`` is the local shard (a DTensor):
    reading it by attribute, as a fused loss naturally would, gives a wrong or failing loss
    (the bug Liger-Kernel hit). Inside the root unit's forward, an unsharded-with-the-root
    head is already gathered and needs nothing."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    head = lm.get_output_embeddings()
    if fsdp is None or head is None or not isinstance(head, fsdp.FSDPModule):
        return None
    return head


def _run_in_head(head: nn.Module, hidden: torch.Tensor, fn):
    # hidden goes through FSDP's pre-forward, which hooks the head's gradient reduction on it
    return fn(hidden)


def _sharded_head_loss(lm, head, hidden, labels, spec, arguments):
    """The loss computed inside the head's FSDP forward hooks: the head's method
    ``_fastlora_head_loss`` is registered with ``register_fsdp_forward_method``, so FSDP
    all-gathers the weight before it, frees it after, and gathers it again for backward."""
    if _FSDP_LOSS not in head.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        head.__dict__[_FSDP_LOSS] = types.MethodType(_run_in_head, head)
        register_fsdp_forward_method(head, _FSDP_LOSS)

    def loss(hidden):
        w, b, why = head_weights(lm, training=True)
        if why is not None:
            warn_once(f"head-runtime:{why}", f"fastlora: the causal-LM loss runs unfused: {why}")
            return None
        return causal_lm_loss(hidden, w, b, labels, spec, **arguments)

    return getattr(head, _FSDP_LOSS)(hidden, loss)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias,
    labels: torch.Tensor,
    spec: HeadSpec,
    *,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **_,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss on ``hidden`` (B, T, H) without logits."""
    from ..ops.linear_cross_entropy import linear_cross_entropy

    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    # With a multi-device device_map the head may live elsewhere (accelerate's hook on
    # lm_head would move the input there in the original forward).
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)  # (B*T, H)
    y = shift_labels.reshape(-1).to(h.device)  # (B*T,)
    if y.shape[0] != h.shape[0]:
        raise ValueError(
            f"labels {tuple(shift_labels.shape)} do not match the hidden states {tuple(hidden.shape[:-1])}"
        )
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
    if num_items_in_batch is not None and torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(h.device)
    extra = {} if spec.backend is None else {"backend": spec.backend}
    with torch.autocast(h.device.type, enabled=False):
        return linear_cross_entropy(
            h.to(dtype),
            weight.to(dtype),
            y,
            bias=None if bias is None else bias.to(dtype),
            ignore_index=ignore_index,
            softcap=spec.softcap,
            logit_scale=spec.logit_scale,
            num_items_in_batch=num_items_in_batch,
            **extra,
        )


def patch_lm(lm: nn.Module, spec: HeadSpec) -> None:
    _bind.bind(lm, KIND, causal_lm_forward, extra=spec)

