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


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none present)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
