"""Merge a LoRA adapter into its base: a plain 16-bit model with no adapter and no bnb.

Which base the adapter is merged into matters. A QLoRA adapter was trained against
the DEQUANTIZED NF4 weights W_nf4 = dequant(quant(W)), not against the original W:
its update ΔW = s·B·A corrects W_nf4. So the merged weight is W_nf4 + ΔW, computed in
float32 and cast once to the output dtype; that model reproduces the trained
(4-bit + adapter) model up to the final cast. Two common alternatives lose accuracy:
merging into the original 16-bit W (which the adapter never saw, off by W − W_nf4 ≈
the whole quantization error), and merging into the 4-bit layer and re-quantizing
(PEFT's bnb merge), which rounds ΔW away into 4-bit codes.

Layers LoRA did not target but bitsandbytes quantized are dequantized too, so every
weight of the merged model is what the trained model computed with.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import checkpoint as ckpt

_OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dequantize(layer) -> torch.Tensor:
    """float32 weight of a bnb Linear4bit (or a plain Linear)."""
    w = layer.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return w.detach().float()
    if getattr(qs, "packing_format_for_cpu", False):
        # bnb repacked these bytes for its CPU kernels; they are no longer NF4 (nf4.md §1.6).
        raise RuntimeError("bitsandbytes repacked this layer's weight for CPU inference; reload the model "
                           "(fastlora protects against this with protect_bnb_weights)")
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(w.data, qs).float()


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """float32 state dict of the base model with every LoRA delta merged into its
    dequantized base weight; keys are those of a plain (unquantized, unwrapped) model."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            w = _dequantize(layer)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    w = w + module.get_delta_weight(adapter).float().to(w.device)
            merged[f"{name}.weight"] = w
            if getattr(layer, "bias", None) is not None:
                merged[f"{name}.bias"] = layer.bias.detach().float()
            handled.add(name)
        elif type(module).__name__ == "Linear4bit" and not any(name.startswith(h + ".") for h in handled):
            merged[f"{name}.weight"] = _dequantize(module)
            if module.bias is not None:
                merged[f"{name}.bias"] = module.bias.detach().float()
            handled.add(name)
    # Everything else (embeddings, norms, an unquantized lm_head) is copied as is.
    for key, value in base.state_dict().items():
        if any(key.startswith(h + ".") for h in handled):
            continue
        merged.setdefault(key, value.detach().float() if value.is_floating_point() else value)
    return merged


def _refusal(adapter: Path, cfg_file: Path) -> str | None:
    from .peft_methods import CONFIG_FILE, is_own_adapter_dir, merge_refusal

    if is_own_adapter_dir(adapter):
        return merge_refusal(str(json.loads((adapter / CONFIG_FILE).read_text()).get("method")))
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        return merge_refusal(str(cfg.get("peft_type", "LORA")), bool(cfg.get("use_dora", False)))
    return None


def merge(adapter: str | os.PathLike, output: str | os.PathLike, *, model: str | os.PathLike | None = None,
          dtype: str = "bfloat16", cache_dir: str | os.PathLike | None = None, device: str = "auto") -> Path:
    """Write ``output``: the base model with ``adapter`` merged, as a 16-bit (``dtype``)
    HF model directory with its tokenizer. ``model`` defaults to the adapter's base
    (``base_model_name_or_path`` in adapter_config.json). The base is loaded 4-bit NF4
    exactly as for training and merged into its dequantized weights (see the module
    docstring). ``output`` is written atomically and must not hold anything already."""
    adapter = Path(adapter)
    cfg_file = adapter / "adapter_config.json"
    refusal = _refusal(adapter, cfg_file)
    if refusal:
        raise ValueError(f"{adapter}: {refusal}")
    if not cfg_file.is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"adapter dir {str(adapter)!r} must hold adapter_config.json and adapter_model.safetensors "
            f"(a PEFT adapter, e.g. runs/sft/adapter)"
        )
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(_OUT_DTYPES)}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output dir {str(output)!r} already exists and is not empty; choose another")
    if model is None:
        base_name = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{cfg_file} names no base model; pass --model")
        model = base_name
    # Heavy imports only once the arguments checked out.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model import load_base, load_tokenizer, resolve_device, resolve_dtype, resolve_model_path

    model_path = resolve_model_path(model, cache_dir)

    dev = resolve_device(device)
    compute = resolve_dtype("auto", dev)
    base = load_base(model_path, load_in_4bit=True, dtype=compute, device=dev)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    state = merged_state_dict(peft_model)
    config = base.config
    plain_config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    merged_model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    out_dtype = _OUT_DTYPES[dtype]
    result = merged_model.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(plain_config, "tie_word_embeddings", False) else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise RuntimeError(f"merge: weights do not fit the base architecture: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    merged_model.to(out_dtype)
    tokenizer = load_tokenizer(model_path)

    def fill(tmp: Path) -> None:
        merged_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    if output.exists():
        output.rmdir()  # empty (checked above): replaced by the complete directory
    return ckpt.write_dir_atomic(output, fill)
