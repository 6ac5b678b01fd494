"""Shared-prefix training (issue 23): one training step (forward with labels, backward)
of a batch whose rows share their prompts, through ``fastlora.patch`` with
``share_prefix=True`` (``shared``: each shared token runs once, as a packed prefix tree)
against ``share_prefix=False`` (``plain``: every row runs its whole prompt).

The model is SmolLM2-135M-shaped (``harness.smollm2_135m``: a Llama, RoPE, RMSNorm,
GQA 9/3 heads of 64, tied embeddings) loaded as the train-step benchmark loads its
own: bitsandbytes NF4 + double quant, sdpa attention, PEFT LoRA r = 16 on every linear
layer, fp32 compute on a CPU and bf16 on a GPU; fewer decoder layers on a CPU.
Batches (``harness.PrefixCase``), no padding, responses trained and prompts masked, as
GRPO and DPO score them:

* ``grpo``: G prompts x K completions, each prompt's rows next to each other (TRL's
  GRPO repeats a prompt K times);
* ``dpo``: P pairs, every chosen row then every rejected row (TRL's concatenated DPO
  forward).

The check (before any timing): the loss and every LoRA gradient equal the plain
model's (fp32: 1e-5 relative on the loss, 1e-4 on the gradients; bf16 at bf16
tolerances), and the shared provider really shared (one planned call, no fallback)
while the plain one planned nothing. That first call also records the bytes autograd
saved for backward (``saved_activation_bytes``: unique storages, the model's weights
and quantization state excluded: an exact activation-memory figure on any device)
and, for ``shared``, ``tokens_in`` / ``tokens_run`` of ``fastlora.shared_prefix_stats``.
The timed figure is the whole step; the peak memory is the harness's (over inputs:
``max_memory_allocated`` minus what was allocated before, the model included, on a
GPU; the sampled heap on a CPU).
"""
from __future__ import annotations

import torch

from benchmarks import harness as H
from benchmarks import models as Mo

PROVIDERS = ("plain", "shared")


def case_id(preset: H.Preset, pc: H.PrefixCase) -> str:
    m = preset.prefix_model
    return f"{pc.kind}-{pc.groups}x{pc.group_size}-p{pc.prompt}-r{pc.response}-smollm2-{m.layers}L"


def pytest_generate_tests(metafunc):
    preset = H.PRESETS[metafunc.config.getoption("--preset")]
    metafunc.parametrize("case_id,provider", [(case_id(preset, c), p) for c in preset.prefix_cases
                                              for p in PROVIDERS])


def batch(env: H.Env, pc: H.PrefixCase, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, labels), each (rows, prompt + response)."""
    g = H.generator(seed, env.device)
    prompts = torch.randint(3, vocab, (pc.groups, pc.prompt), generator=g, device=env.device)
    responses = torch.randint(3, vocab, (pc.rows, pc.response), generator=g, device=env.device)
    row = torch.arange(pc.rows, device=env.device)
    if pc.kind == "grpo":
        owner = row // pc.group_size
    elif pc.kind == "dpo":
        owner = row % pc.groups
    else:
        raise ValueError(f"prefix case kind {pc.kind!r}: expected 'grpo' or 'dpo'")
    ids = torch.cat([prompts[owner], responses], dim=1)  # (rows, prompt + response)
    labels = ids.clone()
    labels[:, : pc.prompt] = -100
    return ids, torch.ones_like(ids), labels


def _step(qm: Mo.QLoRAModel, inputs) -> torch.Tensor:
    ids, mask, labels = inputs
    loss = qm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


@H.one_case_at_a_time
def _case(env: H.Env, cid: str) -> H.Case:
    preset = env.preset
    pc = next((c for c in preset.prefix_cases if case_id(preset, c) == cid), None)
    if pc is None:
        raise KeyError(f"prefix case {cid!r} is not in preset {preset.name}")
    shape = preset.prefix_model
    qm = Mo.qlora_model(env, shape)
    ring = [batch(env, pc, shape.vocab, seed=6000 + 10 * k) for k in range(preset.ring)]
    # the reference: share_prefix=False from the pristine adapters
    Mo.restore_lora(qm)
    Mo.fastlora_patch(qm.model, backend=None, share_prefix=False)
    try:
        qm.model.train()
        loss = _step(qm, ring[0])
        params = dict(qm.model.named_parameters())
        zero = [n for n in sorted(qm.lora_init) if not params[n].grad.abs().max() > 0]
        if zero:  # the gradient check would be vacuous there
            raise AssertionError(f"{cid}: the plain step gives zero LoRA gradients for {zero[:3]} ...")
        reference = (loss.double(), Mo.lora_grads(qm).double())
    finally:
        Mo.fastlora_unpatch(qm.model)
        Mo.restore_lora(qm)
    fp32 = env.dtype == torch.float32
    return H.Case(
        area="prefix", id=cid, ring=ring, reference=reference, output_names=("loss", "lora_grads"), dtype=env.dtype,
        unit="tokens/s", tokens=pc.rows * pc.seq,
        tolerances={"loss": (1e-5, 0.0) if fp32 else (2e-2, 0.0),
                    "lora_grads": (1e-4, 1e-4) if fp32 else (5e-2, 5e-2)},
        params={"kind": pc.kind, "groups": pc.groups, "group_size": pc.group_size, "prompt": pc.prompt,
                "response": pc.response, "rows": pc.rows, "seq": pc.seq, "layers": shape.layers,
                "hidden": shape.hidden, "vocab": shape.vocab, "rank": shape.rank, "attention": "sdpa",
                "model": "SmolLM2-135M shapes"},
    )


def _provider(env: H.Env, name: str, qm: Mo.QLoRAModel, case: H.Case) -> H.Provider:
    import fastlora

    share = name == "shared"
    state: dict = {}

    def check_call(inputs):
        """The first call: the outputs to check, the saved bytes and the sharing counters."""
        fastlora.shared_prefix_stats(qm.model, reset=True)
        loss, saved = H.saved_for_backward(lambda: _step(qm, inputs), exclude=Mo.state_tensors(qm.model))
        stats = fastlora.shared_prefix_stats(qm.model, reset=True)
        grads = Mo.lora_grads(qm)
        if share and (stats["shared_calls"] != 1 or stats["calls"] != 1 or stats["fallbacks"]):
            raise AssertionError(f"{case.id} [shared]: the step did not run one shared-prefix forward: {stats}")
        if not share and stats["calls"]:
            raise AssertionError(f"{case.id} [plain]: share_prefix=False still planned: {stats}")
        provider.info.update(saved, loss_rel_err=_rel(loss, case.reference[0]),
                             lora_grads_rel_err=_rel(grads, case.reference[1]))
        if share:
            provider.info.update(tokens_in=stats["tokens_in"], tokens_run=stats["tokens_run"],
                                 tokens_run_fraction=stats["tokens_run"] / stats["tokens_in"])
        return loss.double(), grads.double()

    def build(inputs):
        if not state:
            Mo.restore_lora(qm)
            report = Mo.fastlora_patch(qm.model, backend=None, share_prefix=share)
            state["first"] = True
            provider.info.update(share_prefix=share, patch_report=str(report))
            qm.model.train()

        def call():
            if state["first"]:
                state["first"] = False
                return check_call(inputs)
            return (_step(qm, inputs),)

        return call

    def reset(inputs):
        Mo.drop_grads(qm)

    def cleanup():
        if state:
            Mo.fastlora_unpatch(qm.model)
        Mo.restore_lora(qm)

    family = "fastlora" if share else "fastlora share_prefix=False"
    provider = H.Provider(name, family, build, reset=reset, cleanup=cleanup)
    return provider


def test_prefix(benchmark, env, case_id, provider):
    case = _case(env, case_id)
    qm = Mo.qlora_model(env, env.preset.prefix_model)
    H.run(benchmark, env, case, _provider(env, provider, qm, case), heavy=True)
