"""PPOConfig: every option of a PPO (or GRPO) run on the shared 4-bit base.

Built like :class:`~fastlora.train.SFTConfig` (same ``from_dict`` / ``from_yaml`` /
``to_dict``, borrowed rather than copied, so unknown keys and ill-typed values are
rejected with the key and file named). ``data=None`` selects the embedded healthcare
task, ``sft_adapter=None`` there the default SFT run's adapter (trained first if absent).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .config import DTYPES, OPTIMIZERS, SFTConfig

ADVANTAGES = ("gae", "grpo")
SCORE_BASELINES = ("none", "greedy")
CRITICS = ("separate", "shared")
KL_KINDS = ("k1", "k3", "abs", "mse")
ON_REWARD_ERROR = ("skip", "stop")

# Options whose default depends on the task (fields left at None, see PPOConfig.resolved).
GENERIC = {"batch_size": 16, "mini_batch_size": 8, "max_steps": 20, "lr": 1e-5}
# The embedded healthcare default, sized for the 10-minute budget on 2 CPU cores: 8 prompts per
# rollout, one mini-batch of 8, so 4 optimizer steps (the 4 PPO epochs) per rollout.
EMBEDDED_TASK = {"batch_size": 8, "mini_batch_size": 8, "max_steps": 12, "lr": 1e-5}


@dataclass
class PPOConfig:
    # --- model ---
    model: str | None = None  # local HF model dir; None = the embedded SmolLM2-135M-Instruct
    cache_dir: str | None = None
    load_in_4bit: bool = True
    dtype: str = "auto"
    device: str = "auto"
    patch: bool = True
    share_prefix: bool = True  # the tokens a batch's rows share (system prompt, a GRPO group's prompt) run once
    sft_adapter: str | None = None  # the SFT adapter the policy starts from and the reference is (None: embedded default's, or the raw base)
    sft_output_dir: str = "runs/sft"  # embedded default: where the default SFT run is (run first if absent)

    # --- prompts ---
    data: list[str] | None = None  # prompt files (prompt / messages records); None = the embedded healthcare task
    data_format: str = "auto"
    test_data: list[str] | None = None  # scored (greedy, exact match) before and after
    max_prompt_length: int = 256
    test_max_examples: int = 0  # 0 = all
    eval_batch_size: int = 32
    measure_forgetting: bool = True  # general QA after PPO (retention against the base: see fastlora rlhf)

    # --- reward ---
    reward_model: str | None = None  # dir of a `fastlora rm` result (None: the embedded default's if it exists)
    reward_fn: str | None = None  # "module:function" (or "file.py:function"); None: the task's rule reward when it has one
    reward_model_weight: float = 1.0
    reward_fn_weight: float = 1.0
    score_clip: float | None = None  # clip scores to [-c, c]
    truncation_penalty: float | None = None  # score given to a response that hits max_new_tokens without a stop
    on_reward_error: str = "skip"  # skip | stop: a reward fn that raises or returns NaN

    # --- rollouts ---
    batch_size: int | None = None  # prompts per rollout (x group_size for grpo); None: by task
    max_new_tokens: int = 12
    temperature: float = 1.0  # applied to the old, reference and training log-probs alike
    top_p: float = 1.0  # must stay 1 (PPO refuses nucleus sampling: see __post_init__)
    top_k: int = 0  # must stay 0 (PPO refuses top-k sampling: see __post_init__)

    # --- PPO ---
    advantage: str = "gae"  # gae (critic) | grpo (group z-scores, no critic)
    group_size: int = 4  # grpo: responses per prompt
    critic: str = "separate"  # separate adapter | shared (value head on the policy's trunk)
    ppo_epochs: int = 4
    mini_batch_size: int | None = None  # rows per optimizer step; must divide the rollout
    grad_accum: int = 1  # micro-batches per mini-batch
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # β (initial β with kl_target)
    kl_kind: str = "k1"
    kl_target: float | None = None  # adaptive KL controller target (per-sequence KL); None = fixed β
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    score_baseline: str = "none"  # none | greedy: subtract the score of the policy's own greedy answer (ReMax)

    # --- LoRA / optimization ---
    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: list[str] | str = "all-linear"
    optimizer: str = "auto"
    lr: float | None = None
    critic_lr: float | None = None  # None = lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # rollouts (each followed by ppo_epochs of updates)
    seed: int = 0

    # --- output ---
    output_dir: str = "runs/ppo"
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool | str = False  # True: continue from the newest valid checkpoint; "auto": or start fresh
    log_every: int = 1
    sample_every: int = 5  # log sample responses every N rollouts (0 = never)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("data", "test_data"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [v])
        for name, choices in (("advantage", ADVANTAGES), ("critic", CRITICS), ("kl_kind", KL_KINDS),
                              ("on_reward_error", ON_REWARD_ERROR), ("score_baseline", SCORE_BASELINES), ("optimizer", OPTIMIZERS), ("dtype", DTYPES)):
            self._check_choice(name, choices)
        for name in ("batch_size", "max_new_tokens", "ppo_epochs", "mini_batch_size", "grad_accum", "lora_r",
                     "lora_alpha", "max_prompt_length", "eval_batch_size", "log_every", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "keep_checkpoints", "sample_every", "test_max_examples", "top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("clip", "vf_clip", "lr", "temperature", "kl_horizon"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v}")
        for name in ("vf_coef", "ent_coef", "kl_coef", "max_grad_norm", "weight_decay", "reward_model_weight",
                     "reward_fn_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if self.resume not in (False, True, "auto"):
            raise ValueError(f"resume must be true, false or 'auto', got {self.resume!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # PPO's ratio and KL need the log-prob of each sampled token under the distribution
        # it was sampled from, recomputed for the current policy and the reference. Under
        # top-k / top-p that distribution's support depends on the weights being trained: a
        # sampled token can fall outside the current policy's (or the reference's) kept set,
        # making its log-prob -inf and the ratio 0 or the KL infinite. Temperature has no
        # such problem and is applied to every log-prob (see fastlora/train/ppo.py).
        if self.top_k != 0:
            raise ValueError(f"top_k={self.top_k} is not supported by PPO: the log-probs of a top-k filtered "
                             "distribution are -inf outside its moving support; use temperature (top_k 0)")
        if self.top_p != 1.0:
            raise ValueError(f"top_p={self.top_p} is not supported by PPO: the log-probs of a nucleus-filtered "
                             "distribution are -inf outside its moving support; use temperature (top_p 1)")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"kl_target must be > 0 (or null for a fixed kl_coef), got {self.kl_target}")
        if self.score_clip is not None and not self.score_clip > 0:
            raise ValueError(f"score_clip must be > 0, got {self.score_clip}")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ValueError(f"critic_lr must be > 0, got {self.critic_lr}")
        if self.advantage == "grpo" and self.group_size < 2:
            raise ValueError(f"advantage='grpo' needs group_size >= 2, got {self.group_size}")
        if self.batch_size is None or self.mini_batch_size is None:
            return  # the rest is checked once resolved()
        if self.mini_batch_size % self.grad_accum:
            raise ValueError(f"mini_batch_size={self.mini_batch_size} does not divide into grad_accum="
                             f"{self.grad_accum} micro-batches")
        if self.rollout_size % self.mini_batch_size:
            raise ValueError(f"the rollout of {self.rollout_size} responses (batch_size={self.batch_size}"
                             + (f" x group_size={self.group_size}" if self.advantage == "grpo" else "")
                             + f") does not divide into mini-batches of mini_batch_size={self.mini_batch_size}")

    def resolved(self) -> "PPOConfig":
        """A copy with every option left at None filled in: from :data:`EMBEDDED_TASK` for the
        embedded task (``data=None``), else from :data:`GENERIC`; checked again."""
        preset = EMBEDDED_TASK if self.data is None else GENERIC
        return dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})

    @property
    def rollout_size(self) -> int:
        return self.batch_size * (self.group_size if self.advantage == "grpo" else 1)

    # Same construction and checks as SFTConfig (one implementation, bound to this class).
    field_names = classmethod(SFTConfig.field_names.__func__)
    from_dict = classmethod(SFTConfig.from_dict.__func__)
    from_yaml = classmethod(SFTConfig.from_yaml.__func__)
    to_dict = SFTConfig.to_dict
    _check_choice = SFTConfig._check_choice
