"""``patch`` and ``unpatch``: walk a model, give each module kind to its handler.

Handlers are keyed by module kind (see ``HANDLERS``): a PEFT LoRA layer (``lora.py``),
the causal-LM head and loss (``head.py``). A new fused block (RMSNorm, RoPE, SwiGLU
with its LoRA projections) would be one more entry: a predicate on the module type, a
reason function, and a forward bound with ``_bind.bind``. None is built yet: they need
a GPU profile to show they pay.
"""
from __future__ import annotations

import copy
import importlib
import logging
import sys

from torch import nn

from ..backend import Backend, backend_info
from . import _bind, head, lora
from . import lora as lora_mod  # `patch` has an argument named lora
from .report import PatchReport

logger = logging.getLogger("fastlora")
_REPORT_ATTR = "_fastlora_report"


def _import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # an op not built or broken: report it, do not crash patch()
        return f"{module} is unavailable ({type(e).__name__}: {e})"
    return None


def _is_other_tuner_layer(m: nn.Module) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(m, BaseTunerLayer) and not lora.is_lora_layer(m)


def _patch_lora_layers(model: nn.Module, report: PatchReport, backend) -> None:
    why_ops = _import_reason("fastlora.ops.lora_linear") or _import_reason("fastlora.nf4")
    linear4bit = lora._bnb_linear4bit_type()
    wrapped = set()  # base layers owned by a LoRA layer
    for name, m in model.named_modules():
        if lora.is_lora_layer(m):
            wrapped.add(id(m.get_base_layer()))
    for name, m in model.named_modules():
        if lora.is_lora_layer(m):
            why = why_ops or lora.unsupported_reason(m)
            if why is not None:
                report.add_fallback(name, "lora", why)
                continue
            report.add_patched(lora.patch_layer(m, backend))
        elif _is_other_tuner_layer(m):
            report.add_fallback(name, "peft", f"PEFT tuner layer {type(m).__name__} is not a LoRA layer")
        elif linear4bit is not None and isinstance(m, linear4bit) and id(m) not in wrapped:
            report.add_kept(
                "bnb Linear4bit without LoRA",
                "bitsandbytes forward kept (frozen layer: dequantize + matmul, as fastlora would)",
            )


def _patch_heads(model: nn.Module, report: PatchReport, backend, verify: bool) -> None:
    why_ops = _import_reason("fastlora.ops.linear_cross_entropy")
    for name, m in model.named_modules():
        if not head.is_causal_lm(m):
            continue
        if why_ops:
            report.add_fallback(name, "head", why_ops)
            return
        spec, why = head.build_spec(m, getattr(m, _bind._forward_attr(m)), verify=verify)
        if spec is None:
            report.add_fallback(name, "head", why)
        else:
            spec.backend = backend
            head.patch_lm(m, spec)
            report.add_patched(head.KIND)
        return  # the outermost causal LM only
    report.add_kept("causal-LM head", "no transformers *ForCausalLM module found")


def patch(
    model: nn.Module,
    *,
    lora: bool = True,
    loss: bool = True,
    backend: Backend | str | None = None,
    verify_head: bool = True,
) -> PatchReport:
    """Run ``model``'s QLoRA hot paths on fastlora ops, in place; returns a report.

    ``model``: a PEFT-wrapped (or plain) transformers causal LM. Only this instance
    changes: each handled module gets a new forward bound on itself; classes and
    other models are untouched, and :func:`unpatch` restores the originals.

    ``lora``: fuse PEFT LoRA layers over bnb NF4 ``Linear4bit`` or ``nn.Linear``.
    ``loss``: in training mode with ``labels``, compute transformers' causal-LM loss
    with ``linear_cross_entropy`` and return ``logits=None`` (never materialized);
    eval mode and calls without labels return the original logits.
    ``backend``: force the ops' backend (default: each op's AUTO choice).
    ``verify_head``: check the head spec against one tiny eval forward (recommended).

    bitsandbytes weights are always protected from CPU repacking (see
    :func:`protect_bnb_weights`). Patching a patched model is a no-op, reported as such.
    """
    b = Backend.parse(backend)
    report = PatchReport(backend=(b or Backend.AUTO).value, backend_info=backend_info())
    report.protected = lora_mod.protect_bnb_weights(model)
    previous = model.__dict__.get(_REPORT_ATTR)
    if previous is not None or any(_bind.state(m) is not None for m in model.modules()):
        if previous is not None:
            report = copy.copy(previous)
            report.protected = lora_mod.protect_bnb_weights(model)
        report.already_patched = True
        logger.info("fastlora.patch: model already patched; nothing done")
        return report
    fwd_backend = None if b in (None, Backend.AUTO) else b
    if loss:
        _patch_heads(model, report, fwd_backend, verify_head)
    if lora:
        _patch_lora_layers(model, report, fwd_backend)
    model.__dict__[_REPORT_ATTR] = report
    report.log()
    return report


def unpatch(model: nn.Module) -> int:
    """Restore every forward ``patch`` replaced; returns how many modules changed.

    The bitsandbytes repack guard stays on: turning it off again would re-expose the
    model to the in-place CPU repack that breaks training.
    """
    n = sum(_bind.restore(m) for m in model.modules())
    model.__dict__.pop(_REPORT_ATTR, None)
    return n
