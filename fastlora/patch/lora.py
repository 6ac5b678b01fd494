"""Handler for PEFT LoRA layers, and the bitsandbytes repack guard.

A PEFT ``lora.Linear`` (base ``nn.Linear``) or ``lora.bnb.Linear4bit`` (base bnb
``Linear4bit`` holding NF4) gets a forward that runs ``fastlora.lora_linear``: the base
matmul (NF4 read in place through ``NF4Weight.from_bnb``), the first active adapter,
its dropout and the base bias in one op. Further active adapters are added as PEFT adds
them. PEFT's state is read at every call, so ``disable_adapter()``, ``merge_adapter()``,
``set_adapter`` and the train/eval switch behave as without the patch:

* adapters disabled, or merged into the base weight -> the original forward, which then
  runs the base layer only (exactly what PEFT does; nothing to fuse);
* ``adapter_names=`` (mixed-batch inference) or a variant kwarg -> the original forward;
* dropout p in training mode, none in eval mode (the module's own ``training`` flag).

Numerics follow PEFT + bitsandbytes: x is cast to the base layer's compute dtype (bnb's
``compute_dtype`` rule, or the autocast dtype under autocast), the LoRA product runs in
the adapter weights' dtype (fp32 adapters on a bf16 model stay fp32, as in PEFT; under
autocast they are cast to the autocast dtype, as F.linear would), and the output has
PEFT's dtype: x's dtype over bnb (which casts back), the autocast dtype over an
``nn.Linear`` under autocast. Under autocast with an x wider than the autocast dtype
(an fp32 model trained with bf16 autocast), PEFT rounds the base output and the LoRA
output separately and adds them in x's dtype; the patched layer then runs the NF4 base
alone and the LoRA terms as PEFT's modules, so a patched bf16 run is PEFT's bf16 run;
likewise for adapters narrower than the compute dtype (TRL's bf16 QLoRA adapters on an
fp32 model).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .._ext import warn_once
from . import _bind

KIND_NF4 = "lora/bnb-nf4"
KIND_LINEAR = "lora/linear"


def _bnb_linear4bit_type():
    bnb = sys.modules.get("bitsandbytes")  # a model holding bnb layers has imported it
    return None if bnb is None else bnb.nn.Linear4bit


def _peft_lora_types() -> tuple[type, ...]:
    """The exact PEFT classes whose forward we know (subclasses may change it)."""
    if "peft" not in sys.modules:
        return ()
    from peft.tuners.lora import layer

    types_ = [layer.Linear]
    bnb_mod = sys.modules.get("peft.tuners.lora.bnb")
    if bnb_mod is not None and hasattr(bnb_mod, "Linear4bit"):
        types_.append(bnb_mod.Linear4bit)
    return tuple(types_)


def is_lora_layer(module: nn.Module) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft.tuners.lora.layer import LoraLayer

    return isinstance(module, LoraLayer)


def is_packed_for_cpu(weight) -> bool:
    qs = getattr(weight, "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def protect_bnb_weights(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking NF4 weights in place on CPU; returns the count.

    bitsandbytes 0.50 rewrites a ``Linear4bit``'s ``weight.data`` into another layout
    the first time it runs on CPU in eval mode without grad (an evaluation before
    training). Training afterwards reads the repacked bytes as NF4 and diverges. The
    rewrite is gated on the instance attribute ``support_avx512bf16_for_cpu``; clearing
    it keeps bnb on its ordinary dequantize path, with the same results.
    """
    linear4bit = _bnb_linear4bit_type()
    if linear4bit is None:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quant_state(base: nn.Module):
    """The QuantState of a bnb 4-bit layer: on its weight, or, once FSDP has replaced the
    weight by a plain (sharded or all-gathered) parameter, the copy bitsandbytes keeps on
    the module for exactly that case."""
    qs = getattr(base.weight, "quant_state", None)
    return qs if qs is not None else getattr(base, "quant_state", None)


def base_kind(base: nn.Module) -> tuple[str | None, str | None]:
    """(kind, None) for a base layer we can fuse, else (None, reason)."""
    linear4bit = _bnb_linear4bit_type()
    if linear4bit is not None and isinstance(base, linear4bit):
        if type(base) is not linear4bit:
            return None, f"base layer is {type(base).__name__}, a subclass of bnb Linear4bit"
        qs = quant_state(base)
        qtype = getattr(qs, "quant_type", getattr(base.weight, "quant_type", None))
        if qtype != "nf4":
            return None, f"bnb 4-bit quant_type {qtype!r} (only nf4 is fused)"
        if qs is None:
            return None, "bnb weight is not quantized yet (no quant_state; move it to a device first)"
        if getattr(qs, "packing_format_for_cpu", False):
            return None, (
                "bnb already repacked this weight for CPU inference "
                "(quant_state.packing_format_for_cpu); its bytes are no longer NF4. "
                "Call fastlora.protect_bnb_weights(model) before any eval/no-grad forward"
            )
        return KIND_NF4, None
    if type(base) is nn.Linear:
        return KIND_LINEAR, None
    return None, f"base layer type {type(base).__module__}.{type(base).__name__} is not fused"


def _adapter_reason(module: nn.Module, adapters) -> str | None:
    for a in adapters:
        if a in getattr(module, "lora_variant", {}):
            variant = type(module.lora_variant[a]).__name__
            what = "DoRA (use_dora)" if module.use_dora.get(a, False) else variant
            return f"adapter {a!r} uses {what}, which has no exact fused path"
        if getattr(module, "lora_bias", {}).get(a, False):
            return f"adapter {a!r} has lora_bias=True"
        drop = module.lora_dropout[a]
        if type(drop) not in (nn.Dropout, nn.Identity):
            return f"adapter {a!r} has dropout module {type(drop).__name__}"
        if type(module.lora_A[a]) is not nn.Linear or type(module.lora_B[a]) is not nn.Linear:
            return f"adapter {a!r} has non-Linear lora_A/lora_B"
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why this LoRA layer keeps its original forward, or None if we can fuse it."""
    lora_types = _peft_lora_types()
    if type(module) not in lora_types:
        return f"PEFT layer type {type(module).__module__}.{type(module).__name__} has no fastlora handler"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weight)"
    kind, why = base_kind(module.get_base_layer())
    if kind is None:
        return why
    return _adapter_reason(module, list(module.lora_A.keys()))


def _compute_dtype(base: nn.Module, kind: str, x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if kind == KIND_NF4:
        # bnb's rule: the first call fixes compute_dtype from x when none was given.
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        return base.compute_dtype or x.dtype
    return base.weight.dtype


def _nf4_view(module: nn.Module, param, nf4_cls, qs=None):
    """The layer's NF4Weight view, built once and rebuilt when the weight changes.

    A decode step calls every layer once per token, so re-reading bnb's QuantState and
    re-validating the view each call is per-token overhead. What a change replaces is
    part of the key: PEFT's merge/unmerge and ``Params4bit`` moves install a new
    parameter or QuantState, ``weight.data = ...`` new bytes, a re-quantization a new
    absmax; any of them makes a new view."""
    qs = getattr(param, "quant_state", None) if qs is None else qs
    key = (id(param), id(qs), param.data_ptr(), None if qs is None else qs.absmax.data_ptr())
    cached = module.__dict__.get("_fastlora_nf4_view")
    if cached is not None and cached[0] == key:
        return cached[1]
    view = nf4_cls.from_bnb((param, qs))
    module.__dict__["_fastlora_nf4_view"] = (key, view)  # a plain attribute: not state
    return view


# ---------------------------------------------------------------------------------------
# CPU decode: the same computation with the per-call work done once per layer
# ---------------------------------------------------------------------------------------
# A decode step calls every LoRA layer once per token (210 calls for SmolLM2-135M). On the
# general path below, each call re-derives what cannot have changed since the last one
# (the base layer's kind, the adapter checks, the compute dtype, the NF4 view, the backend,
# the argument checks of lora_linear): measured at ~190 µs of Python per call around a
# ~100 µs kernel. Here that work is done once and kept with a key of everything a later
# call could have changed; a call whose key matches calls what the general path calls for
# this case (nf4_gemv.lora_gemv_cpu), so the result is the same, bit for bit.
_DECODE_ATTR = "_fastlora_cpu_decode"


def _decode_key(self: nn.Module, x: torch.Tensor):
    d = self.__dict__
    aa = d.get("_active_adapter")
    if not isinstance(aa, str):
        if aa is None or len(aa) != 1:
            return None  # several (or no) active adapters: the general path
        aa = aa[0]
    mods = d["_modules"]
    base = mods["base_layer"]
    w = base.__dict__["_parameters"].get("weight")
    qs = getattr(w, "quant_state", None)
    A = mods["lora_A"].__dict__["_modules"].get(aa)
    B = mods["lora_B"].__dict__["_modules"].get(aa)
    drop = mods["lora_dropout"].__dict__["_modules"].get(aa)
    if A is None or B is None or drop is None or qs is None:
        return None
    Aw, Bw = A.__dict__["_parameters"]["weight"], B.__dict__["_parameters"]["weight"]
    return (aa, d.get("_disable_adapters"), len(d.get("merged_adapters", ())),
            getattr(self, "cast_input_dtype_enabled", True), id(base), id(w), w.data_ptr(), id(qs),
            id(getattr(qs, "absmax", None)), id(Aw), Aw.data_ptr(), Aw.dtype, id(Bw), Bw.data_ptr(), Bw.dtype,
            d["scaling"].get(aa), drop.training, getattr(drop, "p", None), id(drop), base.__dict__.get("compute_dtype"),
            id(base.__dict__["_parameters"].get("bias")), x.dtype)


def _decode_plan(self: nn.Module, st, x: torch.Tensor):
    """What :func:`_cpu_decode` needs, or None when this call is not the plain CPU decode
    case (it then takes the general path, which handles everything)."""
    from ..ops import nf4_gemv

    if st.extra is not None or not nf4_gemv._kernel_built():
        return None
    if self.disable_adapters or self.merged or not getattr(self, "cast_input_dtype_enabled", True):
        return None
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if len(adapters) != 1:
        return None
    a = adapters[0]
    base = self.get_base_layer()
    if base is not self.base_layer:
        return None
    kind, why = base_kind(base)
    if kind != KIND_NF4 or _adapter_reason(self, adapters) is not None:
        return None
    drop = self.lora_dropout[a]
    if type(drop) is nn.Dropout and drop.training and drop.p > 0:
        return None
    cd = _compute_dtype(base, kind, x)
    lora_dtype = self.lora_A[a].weight.dtype
    if cd not in nf4_gemv._DTYPE_CODE or not lora_dtype.is_floating_point or lora_dtype.itemsize < cd.itemsize:
        return None  # the general path's split (PEFT-rounding) case, or a dtype the kernel lacks
    from ..nf4 import NF4Weight

    view = _nf4_view(self, base.weight, NF4Weight, quant_state(base))
    if view.blocksize % 2 or int(view.shape[1]) != x.shape[-1]:
        return None
    return cd, view, self.lora_A[a].weight, self.lora_B[a].weight, float(self.scaling[a]), base.bias


def _cpu_decode(self: nn.Module, st, x: torch.Tensor):
    """The layer's output for a CPU decode call (few rows, no grad), or None."""
    from ..backend import Backend
    from ..ops.lora_linear import _choose_backends
    from ..ops.nf4_gemv import CPU_GEMV_MAX_M, lora_gemv_cpu

    K = x.shape[-1]
    if K == 0 or x.dim() < 2 or x.numel() // K > CPU_GEMV_MAX_M or x.numel() == 0:
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    key = _decode_key(self, x)
    if key is None:
        return None
    cached = self.__dict__.get(_DECODE_ATTR)
    if cached is None or cached[0] != key:
        plan = _decode_plan(self, st, x)
        self.__dict__[_DECODE_ATTR] = cached = (key, plan)  # a plain attribute: not state
    plan = cached[1]
    if plan is None:
        return None
    cd, view, A, B, scaling, bias = plan
    # the backend the general path would pick (a forced backend, e.g. the reference, wins)
    if _choose_backends(x.device, x.numel() // K, cd, None)[0] is not Backend.CPP:
        return None
    x2d = x.to(cd).reshape(-1, K)
    if bias is not None:
        bias = bias.to(cd)
    y = lora_gemv_cpu(x2d, view, A, B, scaling, bias)  # what the general path calls here
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward bound on a patched PEFT LoRA layer."""
    st = _bind.state(self)
    if not args and not kwargs and x.device.type == "cpu" and not torch.is_grad_enabled():
        out = _cpu_decode(self, st, x)
        if out is not None:
            return out
    if (
        args
        or any(v is not None for v in kwargs.values())
        or self.disable_adapters
        or self.merged
        # peft.helpers.disable_input_dtype_casting: PEFT then feeds x to the adapters
        # uncast, which the fused op (it always casts) would not reproduce
        or not getattr(self, "cast_input_dtype_enabled", True)
    ):
        return st.original(x, *args, **kwargs)
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if not adapters:
        return st.original(x, *args, **kwargs)
    base = self.get_base_layer()
    kind, why = base_kind(base)
    why = why or _adapter_reason(self, adapters)
    if why is not None:
        # The layer changed after patching (a new DoRA adapter, a repacked weight...).
        warn_once(f"lora-runtime:{why}", f"fastlora: a LoRA layer runs its original forward: {why}")
        return st.original(x, *args, **kwargs)

    from ..ops.lora_linear import lora_linear

    cd = _compute_dtype(base, kind, x)
    if kind == KIND_NF4:
        from ..nf4 import NF4Weight

        # under FSDP: the all-gathered bytes with the QuantState bitsandbytes keeps on the module
        weight = _nf4_view(self, base.weight, NF4Weight, quant_state(base))
    else:
        weight = base.weight.to(cd)
        if weight.requires_grad:  # lora_linear treats W as frozen; PEFT freezes it
            warn_once("lora-runtime:trainable-base", "fastlora: a LoRA layer whose base weight "
                      "requires grad runs its original forward")
            return st.original(x, *args, **kwargs)
    bias = None if base.bias is None else base.bias.to(cd)
    xc = x.to(cd)

    first, rest = adapters[0], adapters[1:]
    autocast = torch.is_autocast_enabled(x.device.type)
    extra = {} if st.extra is None or kind != KIND_NF4 else {"backend": st.extra}
    # a plain base weight has one path (torch's matmuls): the backend choice is NF4's
    lora_dtype = self.lora_A[first].weight.dtype
    if (autocast and kind == KIND_NF4 and x.dtype != cd) or (
        not autocast and lora_dtype.is_floating_point and lora_dtype.itemsize < cd.itemsize
    ):
        # PEFT rounds the LoRA output to a narrower dtype than the base output here:
        # under autocast with a wider x (bnb rounds the base output to the autocast
        # dtype and casts it back to x's dtype, PEFT adds the LoRA output in the
        # autocast dtype), or with adapters narrower than the compute dtype (TRL casts
        # QLoRA adapters to bf16 on an fp32 model). Fusing the LoRA term would round
        # differently, and the narrower casts of its gradients turn the fused sum's
        # last-bit differences into bf16-sized ones. So the base runs alone (the NF4
        # read stays fused; scaling 0 adds nothing) and the LoRA terms run as PEFT's
        # own modules: the patched run is PEFT's run.
        with torch.autocast(x.device.type, enabled=False):
            out = lora_linear(
                xc, weight, self.lora_A[first].weight.detach().to(cd), self.lora_B[first].weight.detach().to(cd),
                scaling=0.0, bias=bias, dropout=0.0, **extra,
            )
        out = out.to(x.dtype)
        rest = adapters
    else:
        ad = cd if autocast else lora_dtype
        drop = self.lora_dropout[first]
        p = drop.p if (type(drop) is nn.Dropout and drop.training) else 0.0
        with torch.autocast(x.device.type, enabled=False):
            out = lora_linear(
                xc,
                weight,
                self.lora_A[first].weight.to(ad),
                self.lora_B[first].weight.to(ad),
                scaling=self.scaling[first],
                bias=bias,
                dropout=p,
                **extra,
            )
        # PEFT's dtype: bnb casts its output back to x's dtype; an nn.Linear under
        # autocast returns the autocast dtype, and PEFT adds the LoRA term in it.
        if not (autocast and kind == KIND_LINEAR):
            out = out.to(x.dtype)
    for a in rest:  # as PEFT adds each further adapter
        lora_A, lora_B = self.lora_A[a], self.lora_B[a]
        if autocast:  # PEFT does no casting under autocast: the linears cast, + promotes
            out = out + lora_B(lora_A(self.lora_dropout[a](x))) * self.scaling[a]
        else:
            xa = x.to(lora_A.weight.dtype)  # input casting is on (checked above)
            out = out + (lora_B(lora_A(self.lora_dropout[a](xa))) * self.scaling[a]).to(out.dtype)
    return out


def patch_layer(module: nn.Module, backend=None) -> str:
    kind, _ = base_kind(module.get_base_layer())
    _bind.bind(module, kind, lora_forward, extra=backend)
    return kind
