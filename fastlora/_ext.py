"""Lazy access to the compiled extension ``fastlora._C``.

Importing fastlora never imports the extension. The first op that wants it calls
:func:`load`; if it is missing (not built, or built without CUDA) we remember why and
say so once, only when a missing piece is actually needed.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

_warned: set[str] = set()


@functools.lru_cache(maxsize=None)
def _try_load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("fastlora._C"), None
    except ImportError as e:  # not built (e.g. a plain source checkout)
        return None, (
            f"fastlora._C is not importable ({e}); build it with `pip install -e .` "
            "(needs cmake and a C++17 compiler)"
        )


def load() -> ModuleType | None:
    """The extension module, or None if it is missing."""
    return _try_load()[0]


def available(cuda: bool = False) -> bool:
    mod = load()
    return mod is not None and (not cuda or bool(getattr(mod, "with_cuda", False)))


def missing_reason(cuda: bool = False) -> str | None:
    mod, reason = _try_load()
    if mod is None:
        return reason
    if cuda and not getattr(mod, "with_cuda", False):
        return "fastlora._C was built without CUDA kernels (no CUDA toolkit found at build time)"
    return None


def require(what: str, cuda: bool = False) -> ModuleType:
    """The extension, or a RuntimeError saying why ``what`` cannot run."""
    reason = missing_reason(cuda)
    if reason is not None:
        raise RuntimeError(f"{what} needs the compiled extension: {reason}")
    return load()


def warn_once(key: str, message: str) -> None:
    """Warn once per process and key: fallbacks are reported, never silent."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
