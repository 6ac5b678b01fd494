"""fastlora: a speedup backend for QLoRA fine-tuning on transformers + bitsandbytes + PEFT.

The public API is flat and loaded lazily: ``import fastlora`` imports nothing heavy
(not even torch), initializes no device and changes no global setting. Each name is
imported from its own module the first time it is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "NF4Weight": "fastlora.nf4",
    "quantize_nf4": "fastlora.nf4",
    "lora_linear": "fastlora.ops.lora_linear",
    "cross_entropy": "fastlora.ops.cross_entropy",
    "linear_cross_entropy": "fastlora.ops.linear_cross_entropy",
    "token_logprobs": "fastlora.ops.token_logprobs",
    "patch": "fastlora.patch",
    "unpatch": "fastlora.patch",
    "PatchReport": "fastlora.patch",
    "load": "fastlora.patch",
    "shared_prefix_stats": "fastlora.patch",
    "Backend": "fastlora.backend",
    "use_backend": "fastlora.backend",
    "backend_info": "fastlora.backend",
}
_SUBMODULES = ("rl", "train", "backend", "nf4", "ops", "patch", "cli", "generate")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastlora.{name}")
    raise AttributeError(f"module 'fastlora' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
