"""Backend choice, in one place.

Every op asks :func:`select` which implementation to run. The answer depends on the
tensor's device, what is installed, and an explicit override: the ``backend=``
argument of an op, or the :func:`use_backend` context manager. Kernels never decide
it themselves, and no environment variable is read here.

AUTO means: on CUDA, the op's preferred GPU kernels (Triton or CUDA); on CPU, the C++
kernels where the op has them, else the pure-torch reference. Falling back from a GPU
kernel to the reference is reported once with its reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import importlib.util
from typing import Iterable, Iterator

from . import _ext


class Backend(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"  # pure torch: the spec, the test oracle, last-resort path
    TRITON = "triton"
    CUDA = "cuda"  # fastlora._C CUDA kernels
    CPP = "cpp"  # fastlora._C C++ CPU kernels

    @classmethod
    def parse(cls, value: "Backend | str | None") -> "Backend | None":
        if value is None or isinstance(value, Backend):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown backend {value!r}; expected one of {[b.value for b in cls]}"
            ) from None


_forced: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "fastlora_backend", default=None
)


@contextlib.contextmanager
def use_backend(backend: Backend | str) -> Iterator[Backend]:
    """Force a backend for every op called inside the block (tests, benchmarks)."""
    b = Backend.parse(backend)
    token = _forced.set(None if b is Backend.AUTO else b)
    try:
        yield b
    finally:
        _forced.reset(token)


@functools.lru_cache(maxsize=None)
def triton_importable() -> tuple[bool, str | None]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install should not break fastlora
        return False, f"triton failed to import: {e}"
    return True, None


def triton_interprets() -> bool:
    """Whether fastlora's Triton kernels run in Triton's interpreter (on CPU tensors).

    Asked of Triton itself, through the type of one of our decorated kernels: Triton
    picks its interpreter when a kernel is decorated, from its own documented switch
    (``TRITON_INTERPRET=1``). fastlora never reads that variable."""
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels import nf4_triton

    return isinstance(nf4_triton._nf4_quantize_kernel, InterpretedFunction)


def available(backend: Backend) -> tuple[bool, str | None]:
    """Whether ``backend`` can run at all on this machine, and why not."""
    if backend is Backend.REFERENCE:
        return True, None
    if backend is Backend.TRITON:
        return triton_importable()
    if backend is Backend.CPP:
        r = _ext.missing_reason()
        return r is None, r
    if backend is Backend.CUDA:
        r = _ext.missing_reason(cuda=True)
        return r is None, r
    return True, None


def select(
    op: str,
    device,
    supported: Iterable[Backend],
    backend: Backend | str | None = None,
) -> Backend:
    """Pick the backend that runs ``op`` on ``device``.

    ``supported`` lists the op's implementations for this call, in order of preference
    (an op may prefer CUDA for small M and Triton otherwise). REFERENCE is always
    supported. An explicit choice that cannot run raises; AUTO falls back to the
    reference and says so once.
    """
    import torch

    device = torch.device(device)
    supported = [Backend.parse(b) for b in supported]
    if Backend.REFERENCE not in supported:
        supported.append(Backend.REFERENCE)
    req = Backend.parse(backend) or _forced.get() or Backend.AUTO

    if req is not Backend.AUTO:
        if req not in supported:
            raise ValueError(
                f"{op}: no {req.value} backend for this call; it has "
                f"{[b.value for b in supported]}"
            )
        ok, why = available(req)
        if not ok:
            raise RuntimeError(f"{op}: the {req.value} backend cannot run: {why}")
        if req is Backend.CUDA and device.type != "cuda":
            raise ValueError(f"{op}: the cuda backend needs CUDA tensors, got {device}")
        if req is Backend.CPP and device.type != "cpu":
            raise ValueError(f"{op}: the cpp backend needs CPU tensors, got {device}")
        if req is Backend.TRITON and device.type != "cuda" and not triton_interprets():
            raise ValueError(
                f"{op}: the triton backend got tensors on {device}, but compiled Triton kernels "
                "run on CUDA tensors only; CPU tensors run only in Triton's interpreter "
                "(TRITON_INTERPRET=1 set before triton is imported, for tests). Move the "
                "tensors to a GPU, or use backend='cpp' / 'reference' on CPU"
            )
        return req

    if device.type == "cuda":
        reasons = []
        for b in supported:
            if b in (Backend.TRITON, Backend.CUDA):
                ok, why = available(b)
                if ok:
                    return b
                reasons.append(f"{b.value}: {why}")
        if reasons:
            _ext.warn_once(
                f"fallback:{op}",
                f"fastlora: {op} runs the slow pure-torch reference on CUDA because "
                + "; ".join(reasons),
            )
        return Backend.REFERENCE
    if device.type == "cpu" and Backend.CPP in supported:
        ok, why = available(Backend.CPP)
        if ok:
            return Backend.CPP
        _ext.warn_once(f"fallback:{op}:cpu", f"fastlora: {op} uses the torch reference on CPU: {why}")
    return Backend.REFERENCE


def backend_info() -> dict[str, str]:
    """What is available on this machine, for reports and ``fastlora info``."""
    import torch

    info = {"torch": torch.__version__}
    has_gpu = torch.cuda.is_available()
    for b in (Backend.TRITON, Backend.CPP, Backend.CUDA):
        ok, why = available(b)
        if not ok:
            info[b.value] = f"missing: {why}"
        elif b in (Backend.TRITON, Backend.CUDA) and not has_gpu:
            # Installed or compiled, but nothing here can run it (Triton only interpreted).
            info[b.value] = "built, idle: no CUDA device present"
        else:
            info[b.value] = "available"
    info["cuda device"] = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    )
    return info
