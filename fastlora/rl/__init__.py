"""RL for QLoRA: the pure-torch math (``reward_loss``, ``whiten``, ``masked_mean``, ...) and
the shared base (``SharedBase``): ONE frozen NF4 model serving the roles policy, reference,
critic and reward through named LoRA adapters and scalar heads.

Flat and lazy like ``fastlora``: importing this package imports nothing heavy; each name is
loaded from its module on first use. PPO's losses live in ``fastlora/rl/ppo.py`` and are
exported here too.
"""
from __future__ import annotations

import importlib

# name -> module that defines it
_EXPORTS = {
    "masked_mean": "fastlora.rl.math",
    "masked_sum": "fastlora.rl.math",
    "masked_var": "fastlora.rl.math",
    "whiten": "fastlora.rl.math",
    "reward_loss": "fastlora.rl.math",
    "SharedBase": "fastlora.rl.base",
    "RoleSpec": "fastlora.rl.base",
    "last_token_index": "fastlora.rl.base",
    "memory_estimate": "fastlora.rl.memory",
    # PPO / GRPO per-token math
    "KL_KINDS": "fastlora.rl.ppo",
    "kl_penalty": "fastlora.rl.ppo",
    "gae": "fastlora.rl.ppo",
    "policy_loss": "fastlora.rl.ppo",
    "value_loss": "fastlora.rl.ppo",
    "entropy_bonus": "fastlora.rl.ppo",
    "token_rewards": "fastlora.rl.ppo",
    "group_advantages": "fastlora.rl.ppo",
    "AdaptiveKLController": "fastlora.rl.ppo",
    "FixedKLController": "fastlora.rl.ppo",
    "nf4_param_bytes": "fastlora.rl.memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastlora.rl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
