"""Generation on the (patched) 4-bit model: ``fastlora.generate(model, prompts, ...)``.

One engine for evaluation, PPO rollouts, ``fastlora generate`` and label-restricted
prediction (``choices=``). See :func:`fastlora.generate.api.generate` for the arguments
and :class:`GenerationResult` for what comes back.

- ``api.py``: input checks, batching, the result;
- ``sampling.py``: greedy / temperature / top-k / top-p and the log-probs;
- ``decode.py``: prefill + KV-cache decode loop, finished rows leave the batch;
- ``choices.py``: the token trie and the probability of each allowed answer;
- ``static.py``: a static KV cache whose decode step is captured in a CUDA graph (GPU);
- ``commands.py``: the ``fastlora generate`` and ``fastlora predict`` commands.

The package itself is callable, so ``fastlora.generate`` is both this package and the
function (``fastlora.generate(model, ...)`` and ``fastlora.generate.GenerationResult``):
importing a submodule binds the package on ``fastlora``, which would otherwise hide a
function of the same name.
"""
from __future__ import annotations

import sys
import types

from .api import GenerationResult, generate

__all__ = ["generate", "GenerationResult"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> GenerationResult:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
