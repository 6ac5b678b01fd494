"""QLoRA SFT on transformers + bitsandbytes + PEFT: ``sft(SFTConfig(...))``, ``merge``, and reward
models on the shared 4-bit base: ``reward(RewardConfig(...))``.

transformers, PEFT and bitsandbytes are imported on first use, not here.
"""
from __future__ import annotations

from .config import SFTConfig

# Imported (not wrapped) so that the package attributes `sft` / `merge` are the functions:
# importing a submodule later finds it in sys.modules and does not rebind the name.
from .merge import merge
from .reward import RewardConfig, reward
from .sft import sft

__all__ = ["SFTConfig", "sft", "merge", "RewardConfig", "reward"]
