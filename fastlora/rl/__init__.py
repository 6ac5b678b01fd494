"""RL for LMs on QLoRA: the per-token math (pure torch, ``[batch, length]`` + 0/1 mask).

``fastlora.rl.ppo``: KL estimators, GAE, the clipped policy and value losses, per-token
rewards, GRPO group advantages and the KL controllers.
"""
from __future__ import annotations

from .math import masked_mean, whiten
from .ppo import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus,
    gae,
    group_advantages,
    kl_penalty,
    last_valid_index,
    policy_loss,
    token_rewards,
    value_loss,
)

__all__ = [
    "masked_mean", "whiten",
    "KL_KINDS", "AdaptiveKLController", "FixedKLController", "entropy_bonus", "gae", "group_advantages",
    "kl_penalty", "last_valid_index", "policy_loss", "token_rewards", "value_loss",
]
