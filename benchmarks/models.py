"""The QLoRA model of the train-step and generation benchmarks, built the way users
build theirs: a Llama-shaped checkpoint on disk (random weights, no hub), loaded
through transformers + ``BitsAndBytesConfig`` (NF4, double quant), sdpa attention, and
PEFT LoRA on every linear layer. One model is cached per session.
"""
from __future__ import annotations

import dataclasses
import importlib
import tempfile

import torch

from benchmarks import harness as H

_MODEL: dict = {}


@dataclasses.dataclass
class QLoRAModel:
    model: torch.nn.Module  # the PeftModel
    shape: H.TrainShape
    dtype: torch.dtype
    lora_init: dict  # name -> pristine LoRA tensor, to restore before each check
    linear_params: int  # base linear weights incl. lm_head (the "N" of MFU)
    lora_shapes: list  # (in, out, r) of every adapted layer
    weight_bytes: int  # bytes read per decode step (NF4 bytes + dense head/norms)


def qlora_model(env: H.Env, shape: H.TrainShape) -> QLoRAModel:
    key = (shape, str(env.device))
    if key in _MODEL:
        return _MODEL[key]
    _MODEL.clear()
    if env.is_cuda:
        torch.cuda.empty_cache()
    transformers = H.require_module("transformers")
    peft = H.require_module("peft")
    H.require_module("bitsandbytes")
    dt = env.dtype
    cfg = transformers.LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        max_position_embeddings=max(4096, shape.seq), tie_word_embeddings=shape.tie_embeddings, rms_norm_eps=1e-5,
    )
    with tempfile.TemporaryDirectory(prefix="fastlora-bench-model-") as d:
        torch.manual_seed(0)
        with torch.device(env.device):
            dense = transformers.LlamaForCausalLM(cfg).to(dt)
        dense.save_pretrained(d, safe_serialization=True)
        del dense
        if env.is_cuda:
            torch.cuda.empty_cache()
        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dt,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, quantization_config=q, dtype=dt, device_map={"": env.device.index or 0} if env.is_cuda else {"": "cpu"},
            attn_implementation="sdpa",
        )
    H.protect_bnb(model)
    lcfg = peft.LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules="all-linear", lora_dropout=0.0,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    g = H.generator(7, env.device)
    lora_init, lora_shapes = {}, []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                if p.dtype != dt:  # PEFT keeps adapters fp32; train them in the compute dtype
                    p.data = p.data.to(dt)
                if "lora_B" in name:  # PEFT starts B at 0; a zero adapter would check nothing
                    p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.02)
                lora_init[name] = p.detach().clone()
    bnb = importlib.import_module("bitsandbytes")
    linear_params = 0
    weight_bytes = 0
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            linear_params += m.in_features * m.out_features
            weight_bytes += m.weight.numel() * m.weight.element_size() + m.in_features * m.out_features // 64
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            base = m.get_base_layer()
            lora_shapes.append((base.in_features, base.out_features, shape.rank))
    head = model.get_output_embeddings()
    linear_params += head.weight.numel()
    weight_bytes += head.weight.numel() * head.weight.element_size()
    qm = QLoRAModel(model=model, shape=shape, dtype=dt, lora_init=lora_init, linear_params=linear_params,
                    lora_shapes=lora_shapes, weight_bytes=weight_bytes)
    _MODEL[key] = qm
    return qm


def forget() -> None:
    """Drop the cached model (after a peer patched it beyond repair)."""
    _MODEL.clear()


def restore_lora(qm: QLoRAModel) -> None:
    params = dict(qm.model.named_parameters())
    with torch.no_grad():
        for name, t in qm.lora_init.items():
            params[name].copy_(t)
            params[name].grad = None


def drop_grads(qm: QLoRAModel) -> None:
    params = dict(qm.model.named_parameters())
    for name in qm.lora_init:
        params[name].grad = None


def lora_grads(qm: QLoRAModel) -> torch.Tensor:
    """Every LoRA gradient, flattened into one vector (name order)."""
    params = dict(qm.model.named_parameters())
    return torch.cat([params[n].grad.detach().reshape(-1).float() for n in sorted(qm.lora_init)])


def batches(env: H.Env, shape: H.TrainShape, count: int, seq: int, batch: int, seed: int) -> list:
    out = []
    for k in range(count):
        g = H.generator(seed + k, env.device)
        out.append(torch.randint(3, shape.vocab, (batch, seq), generator=g, device=env.device))
    return out


def state_tensors(model: torch.nn.Module) -> list:
    """The model's own tensors: parameters, buffers and the bitsandbytes quantization
    state of its NF4 weights (absmax, code, nested statistics), which autograd saves for
    backward beside the activations."""
    out = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        for holder in (qs, getattr(qs, "state2", None)):
            if holder is not None:
                out += [t for t in vars(holder).values() if torch.is_tensor(t)]
    return out


def fastlora_patch(model, backend: str, **options):
    """``fastlora.patch(model, backend=..., **options)``, or Unavailable while it does not exist."""
    try:
        mod = importlib.import_module("fastlora.patch")
        fn = mod.patch
    except (ImportError, AttributeError) as e:
        raise H.Unavailable(f"fastlora.patch is not available: {type(e).__name__}: {e}") from None
    return fn(model, backend=backend, **options)


def fastlora_unpatch(model) -> None:
    importlib.import_module("fastlora.patch").unpatch(model)
