"""``fastlora.load``: transformers + bitsandbytes 4-bit + PEFT LoRA, then ``patch``.

A convenience for new code. Weights come from a local directory (or a GGUF file in
it); the hub is used only if the caller's transformers/huggingface_hub setup allows it
and the name is not a local path. Nothing here forces a network call.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

DEFAULT_LORA = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules="all-linear",
    bias="none",
    task_type="CAUSAL_LM",
)


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with a separator is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _gguf_to_safetensors(name: str, gguf: str, out_dir: str, kwargs: dict) -> None:
    """transformers dequantizes a GGUF file on load but will not 4-bit-quantize it in
    the same call: write the dequantized weights to ``out_dir`` and load them from there."""
    from transformers import AutoModelForCausalLM

    dense_kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "dtype")}
    gguf_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **dense_kwargs)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # else transformers reads it as GGUF again
        del config.quantization_config
    # transformers will not save a model loaded from GGUF: copy it into a plain one.
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = dense.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {k for k in missing if k.startswith("lm_head")} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"fastlora.load: GGUF {gguf!r} does not match its config: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    dense.save_pretrained(out_dir)


def load(
    model_name_or_path: str | os.PathLike,
    *,
    load_in_4bit: bool = True,
    lora: Any = None,
    compute_dtype: torch.dtype | None = None,
    device_map: Any = None,
    patch: bool = True,
    tokenizer: bool = True,
    **from_pretrained_kwargs,
):
    """Load a causal LM for QLoRA; returns ``(model, tokenizer, report)``.

    ``load_in_4bit``: NF4 with double quantization, compute dtype ``compute_dtype``
    (default bf16 on GPU, fp32 on CPU). ``lora``: a ``peft.LoraConfig``, a dict of its
    fields (merged over r=16, alpha=32, dropout 0.05, all linear layers), or False for
    no adapter. ``device_map``: passed to transformers (default: the GPU if there is
    one, else CPU). ``patch``: run :func:`fastlora.patch` (report is None otherwise).
    Other keywords (``gguf_file=``, ``dtype=``, ``attn_implementation=``...) go to
    ``from_pretrained``. A local path that does not exist raises FileNotFoundError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    name = os.fspath(model_name_or_path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        name = expanded
    elif os.path.exists(expanded):
        raise FileNotFoundError(f"fastlora.load: {name!r} is a file; pass its directory (and gguf_file=)")
    elif _looks_like_path(name) or os.path.isabs(expanded):
        raise FileNotFoundError(f"fastlora.load: model directory {name!r} does not exist")
    gguf = from_pretrained_kwargs.get("gguf_file")
    if gguf is not None and os.path.isdir(name) and not os.path.exists(os.path.join(name, gguf)):
        raise FileNotFoundError(f"fastlora.load: gguf_file {gguf!r} not found in {name!r}")

    cfg = None
    if lora is not False:
        from peft import LoraConfig

        if lora is None or isinstance(lora, dict):
            cfg = LoraConfig(**{**DEFAULT_LORA, **(lora or {})})
        elif isinstance(lora, LoraConfig):
            cfg = lora
        else:
            raise TypeError(f"fastlora.load: lora must be a LoraConfig, a dict or False, got {type(lora).__name__}")

    on_gpu = torch.cuda.is_available()
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    if device_map is None:
        device_map = {"": 0} if on_gpu else {"": "cpu"}
    kwargs = dict(from_pretrained_kwargs)
    kwargs.setdefault("dtype", compute_dtype)
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if gguf is not None and load_in_4bit:
        with tempfile.TemporaryDirectory(prefix="fastlora-gguf-") as tmp:
            _gguf_to_safetensors(name, gguf, tmp, kwargs)
            rest = {k: v for k, v in kwargs.items() if k != "gguf_file"}
            model = AutoModelForCausalLM.from_pretrained(tmp, device_map=device_map, **rest)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, device_map=device_map, **kwargs)
    tok = None
    if tokenizer:
        tok_kwargs = {"gguf_file": gguf} if gguf is not None else {}
        tok = AutoTokenizer.from_pretrained(name, **tok_kwargs)

    from .lora import protect_bnb_weights

    protect_bnb_weights(model)  # before anything can run it in eval mode
    if lora is not False:
        from peft import get_peft_model

        model = get_peft_model(model, cfg)
    report = None
    if patch:
        from .core import patch as _patch

        report = _patch(model)
    return model, tok, report
