"""Shared test setup.

Triton decides between compiling and interpreting when a kernel is decorated, so the
interpreter must be chosen before any fastlora kernel module imports triton. We choose
it only when no GPU is present: on a GPU machine the compiled kernels are tested.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic, and leave the second core to the OS on 2-core CI machines.
torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption(
        "--triton-autotune", choices=["full", "one"], default="full",
        help="fused NF4 GEMM on a GPU: autotune over every dispatchable config (full), or run "
        "one fixed config per M bucket (one: what scripts/gpu/run_gpu.sh uses, so the GPU's "
        "minutes test rather than time candidates; tests/test_aot_compile.py covers every config)",
    )


def pytest_configure(config):
    if config.getoption("--triton-autotune", default="full") == "one":
        from fastlora.kernels import lora_linear_triton

        lora_linear_triton.set_autotune(False)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none present)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
