"""One QLoRA training step (forward with labels, backward, AdamW step, zero_grad) of a
Llama-shaped model loaded through transformers + bitsandbytes NF4 + PEFT LoRA on every
linear layer, sdpa attention: unpatched (today's stack) against ``fastlora.patch``ed
per backend, Liger-Kernel's patch and Unsloth.

The check (before any timing): from the same LoRA weights, the loss and every LoRA
gradient of one step equal the unpatched model's. Tokens/s, peak memory, and MFU with
FLOPs = 4·N·T (forward 2N + input-gradient backward 2N, N = every base linear weight
including lm_head; the embedding lookup does no FLOPs; the frozen base has no weight
gradient) + 6·r·(in+out)·T per LoRA layer + 6·s·d·T per layer for causal attention
(forward 2·s·d per token on average, backward twice that).

The Liger provider runs LAST, and ``fastlora bench`` runs this file after the others:
``apply_liger_kernel_to_llama`` also patches transformers' Llama module process-wide
(rotary embedding, RMSNorm and MLP classes), and there is no unpatch.
"""
from __future__ import annotations

import torch

from benchmarks import harness as H
from benchmarks import models as Mo

PEERS_FIRST = ("hf-bnb-peft",)
PEERS_LAST = ("unsloth", "liger")


def pytest_generate_tests(metafunc):
    # a patched model runs every op on its AUTO backend (cpp where an op has one on CPU,
    # triton/cuda on GPU); per-backend figures are in the op benchmarks
    provs = list(PEERS_FIRST) + ["fastlora"] + list(PEERS_LAST)
    metafunc.parametrize("provider", provs)


def _labels(ids: torch.Tensor) -> torch.Tensor:
    lab = ids.clone()
    lab[:, : ids.shape[1] // 4] = -100  # the prompt part of SFT data is masked
    return lab


_CASE: dict = {}


def _case(env: H.Env) -> tuple[H.Case, Mo.QLoRAModel]:
    if "case" in _CASE:
        return _CASE["case"], _CASE["qm"]
    sh = env.preset.train
    qm = Mo.qlora_model(env, sh)
    ring = Mo.batches(env, sh, env.preset.ring, sh.seq, sh.batch, seed=4000)
    # reference: the unpatched model, one forward + backward from the pristine adapters
    Mo.restore_lora(qm)
    qm.model.train()
    out = qm.model(input_ids=ring[0], labels=_labels(ring[0]))
    out.loss.backward()
    reference = (out.loss.detach().double(), Mo.lora_grads(qm).double())
    Mo.restore_lora(qm)
    T = sh.batch * sh.seq
    flops = 4.0 * qm.linear_params * T
    flops += sum(6.0 * r * (i + o) * T for i, o, r in qm.lora_shapes)
    flops += sh.layers * 6.0 * sh.seq * sh.hidden * T
    tol = (1e-3, 1e-3) if env.dtype == torch.float32 else (5e-2, 5e-2)
    case = H.Case(
        area="train_step", id=f"llama-{sh.layers}L-h{sh.hidden}-v{sh.vocab}-s{sh.seq}-b{sh.batch}-r{sh.rank}",
        ring=ring, reference=reference, output_names=("loss", "lora_grads"), dtype=env.dtype, unit="tokens/s",
        flops=flops, tokens=T,
        tolerances={"loss": (1e-4 if env.dtype == torch.float32 else 2e-2, 0.0), "lora_grads": tol},
        params={"layers": sh.layers, "hidden": sh.hidden, "vocab": sh.vocab, "seq": sh.seq, "batch": sh.batch,
                "rank": sh.rank, "linear_params": qm.linear_params, "attention": "sdpa"},
    )
    _CASE.update(case=case, qm=qm)
    return case, qm


def _steps(qm: Mo.QLoRAModel):
    """build(ids) for a provider: one AdamW shared by the ring; the first call restores
    the pristine adapters and returns (loss, LoRA grads) for the check."""
    state = {"opt": None, "first": True}

    def build(ids):
        if state["opt"] is None:
            Mo.restore_lora(qm)
            qm.model.train()
            state["opt"] = torch.optim.AdamW([p for p in qm.model.parameters() if p.requires_grad], lr=1e-4)
        opt = state["opt"]
        labels = _labels(ids)

        def step():
            out = qm.model(input_ids=ids, labels=labels)
            out.loss.backward()
            if state["first"]:
                state["first"] = False
                res = (out.loss.detach().double(), Mo.lora_grads(qm).double())
            else:
                res = (out.loss.detach(),)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return res

        return step

    return build


def _provider(env: H.Env, name: str, qm: Mo.QLoRAModel) -> H.Provider:
    build = _steps(qm)
    if name == "hf-bnb-peft":
        return H.Provider(name, "bitsandbytes+peft", build)
    if name == "fastlora":
        state = {}

        def build_patched(ids):
            if not state:
                state["report"] = Mo.fastlora_patch(qm.model, backend=None)
                provider.info["patch_report"] = str(state["report"])
            return build(ids)

        def cleanup():
            if state:
                Mo.fastlora_unpatch(qm.model)
            Mo.restore_lora(qm)

        provider = H.Provider(name, "fastlora", build_patched, cleanup=cleanup)
        return provider
    if name == "liger":
        state = {}

        def build_liger(ids):
            if not state:
                H.require_cuda(env, "liger-kernel")
                lt = H.require_module("liger_kernel.transformers", "liger-kernel")
                lt.apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                               fused_linear_cross_entropy=True, model=qm.model.get_base_model())
                state["done"] = True
            return build(ids)

        def forget_model():
            if state:  # this model (and transformers' Llama classes) now run Liger's code
                Mo.forget()

        return H.Provider(name, "liger-kernel", build_liger, cleanup=forget_model)
    if name == "unsloth":
        def build_unsloth(ids):
            H.require_module("unsloth")
            raise H.Unavailable(
                "Unsloth accelerates models it loads itself (FastLanguageModel.from_pretrained), not an existing "
                "transformers + PEFT model; no train-step provider yet"
            )

        return H.Provider(name, "unsloth", build_unsloth)
    raise ValueError(f"unknown provider {name!r}")


def test_train_step(benchmark, env, provider):
    case, qm = _case(env)
    H.run(benchmark, env, case, _provider(env, provider, qm), heavy=True)
