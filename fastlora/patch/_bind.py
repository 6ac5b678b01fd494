"""Binding and restoring forwards on module instances.

A patched module gets a new forward set on the instance (a :class:`BoundForward`);
its class and every other instance are untouched. What ran before is kept in a
``_PatchState`` in the instance ``__dict__``, so ``unpatch`` can put it back exactly
(deleting our instance attribute when the class forward was in use).

accelerate's hooks (``device_map=...``) replace ``module.forward`` with a wrapper that
calls ``module._old_forward``; in that case we patch ``_old_forward`` so the hook keeps
moving tensors between devices around our forward.

Patched forwards are module-level functions that find the original through ``self``
rather than closures over it: ``copy.deepcopy`` rebinds bound methods to the copy,
so a deep-copied patched model keeps calling its own originals.

Another library may install its own instance forward after ours, wrapping it (TRL's
``add_fused_lm_head`` keeps the forward it found and calls it when ``fused_lm_head`` is
off). Removing our attribute then would remove theirs, so :func:`restore` leaves theirs
in place and *detaches* ours: the forward they hold keeps working and runs exactly what
ran before us. Conversely we never wrap an instance forward someone else installed
(:func:`foreign_forward`): we do not know its output contract.
"""
from __future__ import annotations

import dataclasses
import sys
import inspect
from typing import Any, Callable

import torch

STATE_ATTR = "_fastlora_patch"
DETACHED_ATTR = "_fastlora_detached"  # state of a forward unpatched while another library wraps it


@dataclasses.dataclass
class PatchState:
    kind: str
    attr: str  # "forward", or "_old_forward" under an accelerate hook
    had_own: bool  # the instance had its own attribute before us
    previous: Any  # that attribute (only meaningful when had_own)
    original: Callable  # what ran before us, bound to the module
    extra: Any = None  # handler data (e.g. the head spec)
    fn: Callable | None = None  # our forward, fn(self, *args, **kwargs)


def state(module: torch.nn.Module) -> PatchState | None:
    return module.__dict__.get(STATE_ATTR)


def _forward_attr(module: torch.nn.Module) -> str:
    if getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def _entry(self: torch.nn.Module, *args, **kwargs):
    # Runs the handler while patched, and what ran before us once detached by unpatch
    # (see the module docstring).
    st = self.__dict__.get(STATE_ATTR)
    if st is not None:
        return st.fn(self, *args, **kwargs)
    return self.__dict__[DETACHED_ATTR].original(*args, **kwargs)


class BoundForward:
    """The forward of a patched instance: calls :func:`_entry` on its module.

    It carries the signature of the forward it replaced: transformers' ``generate``
    validates its keyword arguments against ``inspect.signature(model.forward)``, and
    PEFT's prompt tuning passes ``input_ids`` beside ``inputs_embeds`` there.
    ``copy.deepcopy`` of the module copies this object with it, pointing at the copy.
    """

    def __init__(self, module: torch.nn.Module, signature: inspect.Signature | None):
        self.module = module
        if signature is not None:
            self.__signature__ = signature

    def __call__(self, *args, **kwargs):
        return _entry(self.module, *args, **kwargs)


def is_ours(module: torch.nn.Module, attr: str | None = None) -> bool:
    """True when ``module``'s effective forward is the one we bound (not wrapped since)."""
    v = module.__dict__.get(attr or _forward_attr(module))
    return isinstance(v, BoundForward) and v.module is module


def foreign_forward(module: torch.nn.Module) -> str | None:
    """Where another library's instance forward comes from, or None.

    None for the class forward, for our own, and for accelerate's hook (its
    ``_old_forward`` is the class forward, bound)."""
    attr = _forward_attr(module)
    v = module.__dict__.get(attr)
    if v is None or is_ours(module, attr):
        return None
    fn = getattr(v, "__func__", v)
    cls_fn = getattr(type(module), "forward", None)
    if fn is cls_fn:
        return None
    # functools.wraps copies the wrapped forward's name onto a wrapper (TRL's does): the
    # code object and the globals still say where the function was written.
    code = getattr(fn, "__code__", None)
    name = getattr(code, "co_qualname", None) or getattr(fn, "__qualname__", None) or type(fn).__name__
    mod = getattr(fn, "__globals__", {}).get("__name__") or getattr(fn, "__module__", None)
    return f"{mod}.{name}" if mod else name


def bind(module: torch.nn.Module, kind: str, fn: Callable, extra: Any = None) -> None:
    """Make ``fn(self, *args, **kwargs)`` the forward of this instance only."""
    if state(module) is not None:
        raise RuntimeError(f"{type(module).__name__} is already patched by fastlora")
    attr = _forward_attr(module)
    had_own = attr in module.__dict__
    st = PatchState(
        kind=kind,
        attr=attr,
        had_own=had_own,
        previous=module.__dict__.get(attr),
        original=getattr(module, attr),
        extra=extra,
        fn=fn,
    )
    try:
        signature = inspect.signature(st.original)
    except (TypeError, ValueError):  # a callable without a readable signature
        signature = None
    module.__dict__.pop(DETACHED_ATTR, None)
    module.__dict__[STATE_ATTR] = st
    module.__dict__[attr] = BoundForward(module, signature)


def restore(module: torch.nn.Module) -> bool:
    """Put back what ran before :func:`bind`; False when the module was not patched.

    When another forward was installed over ours since, it stays, and ours is detached:
    it then runs what ran before :func:`bind`."""
    st = state(module)
    if st is None:
        return False
    del module.__dict__[STATE_ATTR]
    if not is_ours(module, st.attr):
        module.__dict__[DETACHED_ATTR] = st
        return True
    if st.had_own:
        module.__dict__[st.attr] = st.previous
    else:
        module.__dict__.pop(st.attr, None)
    return True


def module_type(module: torch.nn.Module) -> type:
    """The module's class as its author wrote it. FSDP2's ``fully_shard`` swaps an instance's
    class for a generated ``FSDP<Class>(FSDPModule, Class)``; handlers that match exact types
    must see ``Class`` through it."""
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and issubclass(cls, fsdp.FSDPModule):
        return next(b for b in cls.__bases__ if b is not fsdp.FSDPModule)
    return cls
