"""Exact memory of the RL roles: one shared 4-bit base vs one separate 4-bit model per role.

Two ways to the same numbers:

- :func:`model_memory` counts the tensors of a loaded :class:`~fastlora.rl.SharedBase`
  (parameters, buffers and bitsandbytes quantization states, each storage once);
- :func:`memory_estimate` computes them from a transformers config alone (the model is
  built on the meta device, nothing is allocated), with :func:`nf4_param_bytes` for each
  quantized linear layer, so 8B shapes can be reported on a small CPU machine. A test checks
  that both agree byte for byte on a model loaded through bitsandbytes.

bitsandbytes NF4 with double quantization (what ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_use_double_quant=True)`` makes, blocksize 64) stores, per linear layer of n weights::

    packed weights   ceil(n / 2)  uint8          two 4-bit codes per byte
    absmax           ceil(n / 64) uint8          one scale per block, itself quantized
    code             16 float32                  the NF4 table
    offset           1 float32                   mean subtracted from the absmax values
    state2.absmax    ceil(ceil(n / 64) / 256) float32   scales of the absmax blocks
    state2.code      256 float32                 the 8-bit dynamic table of the absmax

Layers bitsandbytes leaves unquantized (embeddings, norms, the LM head) keep the compute
dtype. LoRA adapters are float32 (PEFT upcasts them over a 4-bit base): r·(in + out) per
targeted layer; a scalar head is hidden_size float32 weights.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ROLES = ("policy", "reference", "critic", "reward")


def nf4_param_bytes(numel: int, *, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256
                    ) -> int:
    """Bytes bitsandbytes holds for one NF4 weight of ``numel`` elements (see the module docstring)."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    code = 16 * 4
    if not double_quant:
        return packed + blocks * 4 + code
    return packed + blocks * 1 + code + 4 + math.ceil(blocks / nested_blocksize) * 4 + 256 * 4


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = []
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None)
        if torch.is_tensor(t):
            out.append(t)
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return out


def _storages(tensors) -> dict:
    """Distinct storages among ``tensors``: key -> bytes (tied weights count once)."""
    seen: dict = {}
    for t in tensors:
        if t.device.type == "meta":
            key = ("meta", id(t))
        else:
            key = (t.untyped_storage().data_ptr(), t.device.type)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes() if t.device.type != "meta"
                        else t.numel() * t.element_size())
    return seen


def _logical_numel(p: torch.Tensor) -> int:
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(math.prod(qs.shape))
    return p.numel()


def _counts(tensors: list[torch.Tensor], params: list[torch.Tensor]) -> dict:
    extra = [t for p in params if getattr(p, "quant_state", None) is not None
             for t in _quant_state_tensors(p.quant_state)]
    seen_p, n = set(), 0
    for p in params:
        key = (p.untyped_storage().data_ptr(), p.device.type) if p.device.type != "meta" else id(p)
        if key not in seen_p:
            seen_p.add(key)
            n += _logical_numel(p)
    return {"parameters": n, "bytes": sum(_storages(tensors + extra).values())}


def model_memory(base, roles: Sequence[str] = ROLES) -> dict:
    """See :meth:`fastlora.rl.SharedBase.memory_report`."""
    adapter_ids = {id(p) for _, p in base._adapter_named_parameters()}
    lm = base.lm
    base_params = [p for p in lm.parameters() if id(p) not in adapter_ids]
    base_tensors = base_params + list(lm.buffers())
    frozen = _counts(base_tensors, base_params)
    roles = list(roles)
    per_role = {}
    for r in roles:
        spec = base._role(r)
        ad = [p for a, p in base._adapter_named_parameters() if a == spec.adapter] if spec.adapter else []
        hd = list(base.heads[r].parameters()) if r in base.heads else []
        per_role[r] = {"adapter": spec.adapter, "adapter_counts": _counts(ad, ad), "head_counts": _counts(hd, hd)}
    return _combine(frozen, per_role)


def _combine(frozen: dict, per_role: dict) -> dict:
    shared = dict(frozen)
    separate = {"parameters": 0, "bytes": 0}
    done_adapters = set()
    for r, info in per_role.items():
        a, h = info["adapter_counts"], info["head_counts"]
        for k in ("parameters", "bytes"):
            separate[k] += frozen[k] + a[k] + h[k]
            shared[k] += h[k] + (a[k] if info["adapter"] not in done_adapters else 0)
        if info["adapter"] is not None:
            done_adapters.add(info["adapter"])
    return {
        "base": frozen,
        "roles": {r: {"adapter": i["adapter"],
                      "adapter_parameters": i["adapter_counts"]["parameters"],
                      "adapter_bytes": i["adapter_counts"]["bytes"],
                      "head_parameters": i["head_counts"]["parameters"], "head_bytes": i["head_counts"]["bytes"]}
                  for r, i in per_role.items()},
        "shared": shared,
        "separate": separate,
        "bytes_saved": separate["bytes"] - shared["bytes"],
        "ratio": shared["bytes"] / separate["bytes"] if separate["bytes"] else None,
    }


def memory_estimate(config, *, lora_r: int = 16, target_modules: Sequence[str] | str = "all-linear",
                    roles: Sequence[str] = ROLES, adapters: dict[str, str | None] | None = None,
                    heads: Sequence[str] = ("critic", "reward"), dtype: torch.dtype = torch.bfloat16,
                    double_quant: bool = True) -> dict:
    """The :func:`model_memory` figures from a transformers config, allocating nothing.

    ``adapters`` maps role -> adapter name (default: each role but ``reference`` its own
    adapter); ``heads`` are the roles with a scalar head. Quantized: every ``nn.Linear``
    but the output embedding, as transformers' bitsandbytes integration does.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out_emb = lm.get_output_embeddings()
    quantized = [(n, m) for n, m in lm.named_modules() if isinstance(m, nn.Linear) and m is not out_emb]
    q_ids = {id(m.weight) for _, m in quantized}
    plain = [p for p in lm.parameters() if id(p) not in q_ids] + list(lm.buffers())
    frozen = {"parameters": sum(p.numel() for p in {id(p): p for p in lm.parameters()}.values()),
              "bytes": sum(_storages(plain).values())
              + sum(nf4_param_bytes(m.weight.numel(), double_quant=double_quant) for _, m in quantized)}
    if target_modules == "all-linear":
        targets = quantized
    else:
        names = set(target_modules)
        targets = [(n, m) for n, m in quantized if n.rsplit(".", 1)[-1] in names]
    adapter_params = sum(lora_r * (m.in_features + m.out_features) for _, m in targets)
    adapters = adapters or {r: (None if r == "reference" else r) for r in roles}
    H = int(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size"))
    per_role = {}
    for r in roles:
        a = adapters.get(r)
        ad = {"parameters": adapter_params, "bytes": adapter_params * 4} if a else {"parameters": 0, "bytes": 0}
        hd = {"parameters": H, "bytes": H * 4} if r in heads else {"parameters": 0, "bytes": 0}
        per_role[r] = {"adapter": a, "adapter_counts": ad, "head_counts": hd}
    return _combine(frozen, per_role)


def format_memory(report: dict, title: str = "") -> str:
    """A plain-text table of a memory report (MiB = 2**20 bytes)."""
    def mib(b):
        return f"{b / 2**20:,.2f} MiB"

    lines = [title] if title else []
    b = report["base"]
    lines.append(f"frozen 4-bit base: {b['parameters']:,} parameters, {b['bytes']:,} bytes ({mib(b['bytes'])})")
    for r, i in report["roles"].items():
        lines.append(f"  {r:<10} adapter {i['adapter'] or '-':<8} {i['adapter_parameters']:>12,} params "
                     f"{i['adapter_bytes']:>14,} B   head {i['head_parameters']:>6,} params {i['head_bytes']:>8,} B")
    s, p = report["shared"], report["separate"]
    lines.append(f"shared base, all roles:    {s['parameters']:>14,} params {s['bytes']:>16,} B ({mib(s['bytes'])})")
    lines.append(f"one 4-bit model per role:  {p['parameters']:>14,} params {p['bytes']:>16,} B ({mib(p['bytes'])})")
    lines.append(f"shared / separate = {report['ratio']:.3f}  (saves {mib(report['bytes_saved'])})")
    return "\n".join(lines)
