"""``patch`` and ``unpatch``: walk a model, give each module kind to its handler.

Handlers are keyed by module kind (see ``HANDLERS``): a PEFT LoRA layer (``lora.py``),
the causal-LM head and loss (``head.py``). A new fused block (RMSNorm, RoPE, SwiGLU
with its LoRA projections) would be one more entry: a predicate on the module type, a
reason function, and a forward bound with ``_bind.bind``. None is built yet: they need
a GPU profile to show they pay.
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings

from torch import nn

from ..backend import Backend, backend_info
from . import _bind, head, lora, prefix
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
    n_lora = 0
    other = False  # another PEFT method trains this model (its layers run their own forward)
    for name, m in model.named_modules():
        if lora.is_lora_layer(m):
            n_lora += 1
            st = _bind.state(m)
            if st is not None:  # patched by an earlier call
                if _bind.is_ours(m, st.attr):
                    report.add_patched(st.kind)
                else:
                    report.add_fallback(name, "lora", f"a forward installed after fastlora's "
                                        f"({_bind.foreign_forward(m)}) wraps it")
                continue
            foreign = _bind.foreign_forward(m)
            why = why_ops or lora.unsupported_reason(m) or (
                foreign and f"another library installed its own forward on this layer ({foreign}); "
                "fastlora does not wrap a forward whose contract it does not know")
            if why is not None:
                report.add_fallback(name, "lora", why)
                continue
            report.add_patched(lora.patch_layer(m, backend))
        elif _is_other_tuner_layer(m):
            other = True
            report.add_kept(f"PEFT {type(m).__name__}", "not a LoRA layer: PEFT's own forward runs "
                            "(fastlora fuses LoRA only)")
        elif getattr(type(m), "fastlora_kept_reason", None):  # e.g. fastlora's bottleneck adapter
            other = True
            report.add_kept(type(m).__name__, type(m).fastlora_kept_reason)
        elif linear4bit is not None and isinstance(m, linear4bit) and id(m) not in wrapped:
            report.add_kept(
                "bnb Linear4bit without LoRA",
                "bitsandbytes forward kept (frozen layer: dequantize + matmul, as fastlora would)",
            )
    peft_cfg = getattr(model, "active_peft_config", None)
    if getattr(peft_cfg, "is_prompt_learning", False):
        other = True
        report.add_kept(f"PEFT {peft_cfg.peft_type.value.lower()}", "virtual tokens / key-value prefixes added "
                        "by PeftModel's own forward (nothing to fuse; the frozen layers run as before)")
    if "_fastlora_peft" in model.__dict__:  # BitFit's biases: trained inside the frozen layers' forward
        other = True
        report.add_kept("BitFit biases", "trained in place; the layers holding them run their own forward")
    if n_lora == 0 and not other:
        msg = ("no PEFT LoRA layer found: nothing to fuse yet. If LoRA is added later (get_peft_model, "
               "or a TRL trainer's peft_config), call fastlora.patch(model) again after that, e.g. "
               "fastlora.patch(trainer.model) once the trainer is built")
        if report.kept.get("bnb Linear4bit without LoRA", (0, ""))[0]:
            # a 4-bit base before LoRA is added: the QLoRA layers are not accelerated
            report.add_fallback("", "lora", msg)
        else:
            report.notes.append(msg)


def _trl_reason(where: str) -> str:
    if "add_fused_lm_head" in where:
        return ("TRL's fused LM head (trl add_fused_lm_head) computes the loss and per-token "
                "log-probs in chunks without the logits and returns outputs.log_probs; kept as is")
    return f"another library's forward ({where}) is installed on the model; kept as is"


def _patch_heads(model: nn.Module, report: PatchReport, backend, verify: bool) -> None:
    why_ops = _import_reason("fastlora.ops.linear_cross_entropy")
    for name, m in model.named_modules():
        if not head.is_causal_lm(m):
            continue
        st = _bind.state(m)
        if st is not None:  # patched by an earlier call
            if _bind.is_ours(m, st.attr):
                report.add_patched(st.kind)
            else:
                where = _bind.foreign_forward(m)
                report.add_kept("causal-LM head", _trl_reason(where) + "; it was installed over "
                                "fastlora's head, which now runs only when that forward delegates to it")
            return
        foreign = _bind.foreign_forward(m)
        if foreign is not None:
            report.add_kept("causal-LM head", _trl_reason(foreign) + "; fastlora's head is not installed")
            return
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


def _patch_prefix(model: nn.Module, report: PatchReport, verify: bool) -> None:
    found = prefix.decoders(model)
    if not found:
        report.add_kept(prefix.KIND, "no transformers decoder found")
    for name, dec in found:
        st = _bind.state(dec)
        if st is not None:  # patched by an earlier call
            if _bind.is_ours(dec, st.attr):
                report.add_patched(st.kind)
            else:
                report.add_kept(prefix.KIND, f"a forward installed after fastlora's ({_bind.foreign_forward(dec)}) "
                                "wraps the decoder")
            continue
        foreign = _bind.foreign_forward(dec)
        why = prefix.unsupported_reason(dec) or (
            foreign and f"another library installed its own forward on the decoder ({foreign})")
        if why:
            report.add_kept(prefix.KIND, why)
            continue
        prefix.patch_decoder(dec)
        why = prefix.verify(dec) if verify else None
        if why:
            _bind.restore(dec)
            report.add_fallback(name, "shared-prefix", why)
            continue
        report.add_patched(prefix.KIND)


def patch(
    model: nn.Module,
    *,
    lora: bool = True,
    loss: bool = True,
    share_prefix: bool = True,
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
    ``share_prefix``: run each token that rows of a batch share (same tokens from the
    row's start) once, with the same outputs and gradients (:mod:`fastlora.patch.prefix`);
    what cannot be shared exactly runs the plain batch, counted by reason in
    :func:`fastlora.shared_prefix_stats`.
    ``backend``: force the ops' backend (default: each op's AUTO choice).
    ``verify_head``: check the head spec and the shared-prefix plan, each against one
    tiny eval forward of the original model (recommended).

    bitsandbytes weights are always protected from CPU repacking (see
    :func:`protect_bnb_weights`).

    Any order works: before or after a trainer is built, before or after LoRA is added.
    Calling it again patches what was added since (LoRA layers PEFT or a TRL trainer
    added) and returns a report of the model as it is now (``already_patched`` set).
    A forward another library installed on the instance (TRL's fused LM head) is kept
    and reported, never wrapped. When nothing is accelerated the report says so
    (``report.ok`` is False) and a warning is issued.
    """
    b = Backend.parse(backend)
    report = PatchReport(backend=(b or Backend.AUTO).value, backend_info=backend_info())
    report.protected = lora_mod.protect_bnb_weights(model)
    previous = model.__dict__.get(_REPORT_ATTR)
    report.already_patched = previous is not None or any(_bind.state(m) is not None for m in model.modules())
    if report.already_patched and previous is not None:
        # the options of the first call stay in force (a module is patched once)
        b, lora, loss = Backend.parse(previous.backend), previous.options["lora"], previous.options["loss"]
        share_prefix = previous.options.get("share_prefix", share_prefix)
        report.backend = previous.backend
    report.options = {"lora": lora, "loss": loss, "share_prefix": share_prefix}
    fwd_backend = None if b in (None, Backend.AUTO) else b
    # A second call patches what was added since (LoRA layers added after the first call)
    # and describes the model as it is now (e.g. a head another library installed since).
    if loss:
        _patch_heads(model, report, fwd_backend, verify_head)
    if lora:
        _patch_lora_layers(model, report, fwd_backend)
    if share_prefix:
        _patch_prefix(model, report, verify_head)
    model.__dict__[_REPORT_ATTR] = report
    if report.nothing_accelerated or any(f.kind == "lora" and not f.name for f in report.fallbacks):
        what = "nothing" if report.nothing_accelerated else "no LoRA layer"
        warnings.warn(f"fastlora.patch accelerated {what} on {type(model).__name__}:\n{report}", stacklevel=2)
    report.log()
    return report


def unpatch(model: nn.Module) -> int:
    """Restore every forward ``patch`` replaced; returns how many modules changed.

    Each module gets back exactly the forward it had before ``patch`` (its class
    forward, or an instance forward another library had installed). Where another
    library installed its forward after ``patch``, wrapping ours, theirs stays and ours,
    which they call, runs what ran before ``patch``.

    The bitsandbytes repack guard stays on: turning it off again would re-expose the
    model to the in-place CPU repack that breaks training.
    """
    n = sum(_bind.restore(m) for m in model.modules())
    model.__dict__.pop(_REPORT_ATTR, None)
    return n
