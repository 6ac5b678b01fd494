"""Binding and restoring forwards on module instances.

A patched module gets a new forward bound on the instance with ``types.MethodType``;
its class and every other instance are untouched. What ran before is kept in a
``_PatchState`` in the instance ``__dict__``, so ``unpatch`` can put it back exactly
(deleting our instance attribute when the class forward was in use).

accelerate's hooks (``device_map=...``) replace ``module.forward`` with a wrapper that
calls ``module._old_forward``; in that case we patch ``_old_forward`` so the hook keeps
moving tensors between devices around our forward.

Patched forwards are module-level functions that find the original through ``self``
rather than closures over it: ``copy.deepcopy`` rebinds bound methods to the copy,
so a deep-copied patched model keeps calling its own originals.
"""
from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any, Callable

import torch

STATE_ATTR = "_fastlora_patch"


@dataclasses.dataclass
class PatchState:
    kind: str
    attr: str  # "forward", or "_old_forward" under an accelerate hook
    had_own: bool  # the instance had its own attribute before us
    previous: Any  # that attribute (only meaningful when had_own)
    original: Callable  # what ran before us, bound to the module
    extra: Any = None  # handler data (e.g. the head spec)


def state(module: torch.nn.Module) -> PatchState | None:
    return module.__dict__.get(STATE_ATTR)


def _forward_attr(module: torch.nn.Module) -> str:
    if getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


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
    )
    module.__dict__[STATE_ATTR] = st
    module.__dict__[attr] = types.MethodType(fn, module)


def restore(module: torch.nn.Module) -> bool:
    """Put back what ran before :func:`bind`; False when the module was not patched."""
    st = module.__dict__.pop(STATE_ATTR, None)
    if st is None:
        return False
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
