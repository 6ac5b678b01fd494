"""Hugging Face integration: ``patch``/``unpatch`` a transformers + bitsandbytes + PEFT
model in place, ``load`` a model ready for QLoRA, and the ``PatchReport``.

Importing this package imports torch but not transformers, PEFT or bitsandbytes: the
handlers find those in ``sys.modules`` (a model built with them has imported them).
"""
from __future__ import annotations

import sys
import types

from .core import patch, unpatch
from .loader import load
from .lora import protect_bnb_weights
from .prefix import shared_prefix_stats
from .report import Fallback, PatchReport

__all__ = ["patch", "unpatch", "PatchReport", "Fallback", "load", "protect_bnb_weights", "shared_prefix_stats"]


class _CallablePackage(types.ModuleType):
    # `import fastlora.patch` makes the attribute `fastlora.patch` this package, which
    # would then shadow the function of the same name: keep `fastlora.patch(model)`
    # working either way.
    def __call__(self, *args, **kwargs):
        return patch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
