"""Generation (PPO rollouts, evaluation) with the 4-bit QLoRA model: Hugging Face
``generate`` on bitsandbytes NF4 + PEFT LoRA (unpatched) against ``fastlora.generate`` on
the same model after ``fastlora.patch`` (small-M NF4 kernels: the C++ GEMV on CPU, the
CUDA GEMV on GPU, where the decode step is also replayed as a CUDA graph), and against
Hugging Face ``generate`` on the patched model (the kernels without the decode loop).

Greedy decoding of a fixed number of new tokens (``min_new_tokens`` = ``max_new_tokens``,
so no sequence stops early and every provider does the same work). The check (before
any timing): the next-token logits of the prompt batch equal the unpatched model's; the
share of identical greedy tokens is recorded too. Throughput is new tokens per second;
the bandwidth figure counts one read of every weight per decode step, against the copy
bandwidth: decoding is memory-bound.
"""
from __future__ import annotations

import torch

from benchmarks import harness as H
from benchmarks import models as Mo


def pytest_generate_tests(metafunc):
    metafunc.parametrize("provider", ["hf-bnb-peft", "fastlora", "fastlora-kernels+hf-generate", "unsloth"])


_CASE: dict = {}


def _next_logits(qm: Mo.QLoRAModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return qm.model(input_ids=ids).logits[:, -1, :].float()


def _generate(qm: Mo.QLoRAModel, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return qm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)


def _case(env: H.Env) -> tuple[H.Case, Mo.QLoRAModel]:
    if "case" in _CASE:
        return _CASE["case"], _CASE["qm"]
    p = env.preset
    qm = Mo.qlora_model(env, p.train)
    Mo.restore_lora(qm)
    qm.model.eval()
    ring = Mo.batches(env, p.train, p.ring, p.gen_prompt, p.gen_batch, seed=5000)
    reference = (_next_logits(qm, ring[0]),)
    _CASE["tokens"] = _generate(qm, ring[0], p.gen_new)
    case = H.Case(
        area="generation", id=f"llama-{p.train.layers}L-h{p.train.hidden}-b{p.gen_batch}-p{p.gen_prompt}-n{p.gen_new}",
        ring=ring, reference=reference, output_names=("next_token_logits",), dtype=env.dtype, unit="tokens/s",
        bytes=float(p.gen_new * qm.weight_bytes), tokens=p.gen_batch * p.gen_new,
        tolerance=(1e-4, 1e-4) if env.dtype == torch.float32 else (5e-2, 5e-2),
        params={"batch": p.gen_batch, "prompt": p.gen_prompt, "new_tokens": p.gen_new, "decoding": "greedy",
                "attention": "sdpa"},
    )
    _CASE.update(case=case, qm=qm)
    return case, qm


def _fl_generate(qm: Mo.QLoRAModel, ids: torch.Tensor, new: int) -> torch.Tensor:
    """fastlora.generate, every row making ``new`` tokens (no stop token), as (B, prompt+new)."""
    import fastlora

    res = fastlora.generate(qm.model, input_ids=ids, max_new_tokens=new, stop_token_ids=[])
    return torch.cat([ids, torch.stack(res.sequences)], dim=1)


def _provider(env: H.Env, name: str, qm: Mo.QLoRAModel) -> H.Provider:
    new = env.preset.gen_new
    provider = None
    gen = _fl_generate if name == "fastlora" else _generate

    def build_calls(ids):
        state = {"first": ids is _CASE["case"].ring[0]}

        def call():
            if state["first"]:  # the check: logits, then the greedy-token agreement
                state["first"] = False
                logits = _next_logits(qm, ids)
                toks = gen(qm, ids, new)
                # transformers' min_new_tokens bans eos and fastlora.generate without stop tokens
                # does not: a row that reaches eos may go on differently after it
                provider.info["greedy_token_agreement"] = float((toks == _CASE["tokens"]).float().mean().item())
                return (logits,)
            return (gen(qm, ids, new),)

        return call

    if name == "hf-bnb-peft":
        provider = H.Provider(name, "bitsandbytes+peft", build_calls)
    elif name in ("fastlora", "fastlora-kernels+hf-generate"):
        state = {}

        def build(ids):
            if not state:
                state["report"] = Mo.fastlora_patch(qm.model, backend=None)
                provider.info["patch_report"] = str(state["report"])
                qm.model.eval()
            return build_calls(ids)

        def cleanup():
            if state:
                Mo.fastlora_unpatch(qm.model)

        provider = H.Provider(name, "fastlora", build, cleanup=cleanup)
        if name == "fastlora":
            provider.info["decoder"] = "auto (CUDA graph on GPU, dynamic KV cache on CPU)"
    elif name == "unsloth":
        def build_unsloth(ids):
            H.require_module("unsloth")
            raise H.Unavailable("Unsloth's fast generation needs a model loaded through FastLanguageModel; "
                                "no provider for an existing transformers + PEFT model yet")

        provider = H.Provider(name, "unsloth", build_unsloth)
    else:
        raise ValueError(f"unknown provider {name!r}")
    return provider


def test_generation(benchmark, env, provider):
    case, qm = _case(env)
    H.run(benchmark, env, case, _provider(env, provider, qm), heavy=True)
