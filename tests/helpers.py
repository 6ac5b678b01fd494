"""Helpers shared by the tests: float64 references and explicit two-sided tolerances."""
from __future__ import annotations

import importlib.util

import pytest
import torch

# (rtol, atol) of a kernel's result against a float64 reference, by compute dtype.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None, msg=""):
    """|actual - expected| <= atol + rtol*|expected| elementwise (too high and too low
    both fail), after upcasting both to float64. Shapes must match exactly."""
    dtype = dtype or actual.dtype
    r, a = TOL.get(dtype, (1e-5, 1e-5))
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}"
    )


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# Triton tests run on the GPU when one is present, else under Triton's interpreter on CPU
# tensors (tests/conftest.py selects the interpreter only when there is no GPU): never CPU
# tensors with the compiled backend, which fastlora refuses.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton = pytest.mark.skipif(not has_module("triton"), reason="triton is not installed")
requires_bnb = pytest.mark.skipif(not has_module("bitsandbytes"), reason="bitsandbytes is not installed")
