"""fastlora.patch in TRL's trainers, on tiny 4-bit QLoRA models, patched vs unpatched.

Each trainer runs twice from the same weights, adapters and seed: unpatched (the
oracle: transformers + bitsandbytes + PEFT + TRL as users run them) and patched, with
the patch applied before or after the trainer is built (or before LoRA is added). The
losses of every step and the LoRA gradients of the first optimizer step must agree at
the patch tests' tolerances in fp32; under bf16 autocast the patched run must be
PEFT's bf16 run (no tolerance needed beyond that of fp32). TRL >= 1.x installs its own
fused LM head (``trl.trainer.utils.add_fused_lm_head``) on causal LMs: the patch must
keep it, say so, and leave its ``outputs.log_probs`` contract intact; the LoRA layers
are what fastlora accelerates there. After training, ``unpatch`` then ``evaluate()``
must still run TRL's own forward.

API used (a TRL upgrade that breaks a test breaks it here): ``SFTTrainer``/``SFTConfig``,
``RewardTrainer``/``RewardConfig``, ``DPOTrainer``/``DPOConfig``,
``GRPOTrainer``/``GRPOConfig`` (``reward_funcs``), ``Trainer.add_callback`` and the
``on_pre_optimizer_step`` callback event of transformers.
"""
import contextlib
import io
import logging
import warnings

import pytest
import torch

import fastlora
from fastlora.patch import head as head_mod
from tests.helpers import assert_close, has_module, requires_bnb
from tests.patch import tiny
from tests.patch.test_families import rel_err

pytestmark = [requires_bnb, pytest.mark.skipif(not has_module("trl"), reason="trl is not installed "
                                                "(pip install -e '.[test]' installs it)")]

N_LORA = 7 * tiny.LAYERS
N_PATCHED = N_LORA + 1  # the LoRA layers and the decoder (shared prefixes); + 1 with our head
FP32_TOL = 1e-5  # the patch tests' loss and gradient tolerance (fp32: measured <= 8e-7)
CURVE_TOL = 1e-4  # later steps, after AdamW updates (as the HF Trainer test): Adam's
# normalization turns ~1e-7 differences of near-zero grads into full-size steps
# With bf16 adapters or autocast, shared prefixes run a shared token once and sum its
# gradient before the bf16 backward, where PEFT rounds each row's copy: the same bf16
# computation in another order (measured: losses <= 6.4e-4, gradients <= 5.8e-3 apart).
BF16_SHARED = {"loss": 2e-3, "grad": 2e-2}


def _assert_losses(l_pat, l_ref, atol=0.0, first=FP32_TOL, curve=CURVE_TOL):
    assert len(l_pat) == len(l_ref) == 2 and torch.isfinite(l_pat).all()
    assert_close(l_pat[:1], l_ref[:1], rtol=first, atol=atol)  # the first step: same weights
    assert_close(l_pat, l_ref, rtol=max(curve, first), atol=atol)


# ------------------------------------------------------------------------- data
def _sum_rows(n):
    return [(3 + i % 5, 2 + (i * 3) % 7) for i in range(n)]


def _data(kind: str, n: int = 8):
    from datasets import Dataset

    rows = []
    for a, b in _sum_rows(n):
        q, ans = f"what is {a} plus {b}?", f"it is {a + b}."
        if kind == "prompt_completion":
            rows.append({"prompt": q, "completion": " " + ans})
        elif kind == "messages":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]})
        elif kind == "preference":
            rows.append({"prompt": q, "chosen": " " + ans, "rejected": f" it is {a * b + 1}!"})
        elif kind == "prompt":
            rows.append({"prompt": q})
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------- models
def _quiet():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return contextlib.redirect_stderr(io.StringIO())


def _reward_model(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    with _quiet():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, quantization_config=tiny.bnb_config(), dtype=torch.float32,
            device_map={"": "cpu"}, attn_implementation="eager",
        )
    fastlora.patch.protect_bnb_weights(model)
    torch.manual_seed(1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.05)  # the fresh head, identical across loads
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                     task_type="SEQ_CLS", modules_to_save=["score"])
    return get_peft_model(model, cfg)


class _GradSpy:
    """A transformers callback keeping the trainable grads of the first optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Spy(TrainerCallback):
            grads = None

            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                if self.grads is None:
                    self.grads = tiny.lora_grads(model)

        return Spy()


def _args(cls, tmp_path, *, bf16=False, steps=2, accum=2, **kw):
    return cls(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=accum, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        lr_scheduler_type="constant", bf16=bf16, **kw,
    )


def _make(name, model, tmp_path, *, bf16=False, data="prompt_completion", packing=False, peft_config=None):
    import trl

    tok = tiny.tokenizer()
    if name == "sft":
        args = _args(trl.SFTConfig, tmp_path, bf16=bf16, max_length=48, packing=packing)
        return trl.SFTTrainer(model=model, args=args, train_dataset=_data(data), eval_dataset=_data(data, 4),
                              processing_class=tok, peft_config=peft_config)
    if name == "reward":
        args = _args(trl.RewardConfig, tmp_path, bf16=bf16, max_length=48)
        return trl.RewardTrainer(model=model, args=args, train_dataset=_data("preference"),
                                 eval_dataset=_data("preference", 4), processing_class=tok)
    if name == "dpo":
        args = _args(trl.DPOConfig, tmp_path, bf16=bf16, max_length=48)
        return trl.DPOTrainer(model=model, args=args, train_dataset=_data("preference"),
                              eval_dataset=_data("preference", 4), processing_class=tok)
    if name == "grpo":
        args = _args(trl.GRPOConfig, tmp_path, bf16=bf16, accum=1, num_generations=2, max_completion_length=4,
                     temperature=1.0)

        def toy(completions, **kw):  # a toy reward that differs between completions
            return [float(sum(map(ord, c)) % 7) for c in completions]

        return trl.GRPOTrainer(model=model, args=args, reward_funcs=[toy], train_dataset=_data("prompt"),
                               processing_class=tok)
    raise ValueError(name)


def _run(name, model, tmp_path, order, fp32_adapters=False, share_prefix=True, **kw):
    """Train 2 steps; order: None (unpatched), "before"/"after" the trainer is built.
    ``fp32_adapters``: undo TRL's bf16 cast of QLoRA adapters (an fp32 run end to end).
    Returns (trainer, report, losses, first-step grads)."""
    if order == "before":
        fastlora.patch(model, share_prefix=share_prefix)
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _make(name, model, tmp_path, **kw)
        if fp32_adapters:
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        spy = _GradSpy()
        trainer.add_callback(spy)
        report = None if order is None else fastlora.patch(trainer.model, share_prefix=share_prefix)
        trainer.train()
    losses = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])
    return trainer, report, losses, spy.grads


def _assert_grads(g_pat, g_ref, tol):
    assert g_ref and set(g_pat) == set(g_ref)
    for n in g_ref:
        assert g_ref[n].abs().max() > 0, f"{n}: zero gradient, the comparison would be vacuous"
        err = rel_err(g_pat[n], g_ref[n])
        assert err <= tol, f"{n}: relative gradient error {err:.2e} > {tol}"


def _fused_calls(monkeypatch):
    """Count calls of the fused LoRA op and of fastlora's fused head loss."""
    import fastlora.ops.lora_linear as ll

    calls = {"lora": 0, "head": 0}
    lora_op, head_loss = ll.lora_linear, head_mod.causal_lm_loss

    def lora_spy(*a, **k):
        calls["lora"] += 1
        return lora_op(*a, **k)

    def head_spy(*a, **k):
        calls["head"] += 1
        return head_loss(*a, **k)

    monkeypatch.setattr(ll, "lora_linear", lora_spy)
    monkeypatch.setattr(head_mod, "causal_lm_loss", head_spy)
    return calls


def _assert_trl_head_kept(report, already):
    assert report.ok, str(report)
    assert report.already_patched is already
    assert report.patched["lora/bnb-nf4"] == N_LORA
    assert report.patched[head_mod.KIND] == 0  # TRL's head computes the loss: not claimed
    n, why = report.kept["causal-LM head"]
    assert n == 1 and "add_fused_lm_head" in why and "log_probs" in why, why
    assert "causal-LM head" in str(report)


def _trl_forward_is_installed(lm) -> bool:
    fwd = lm.__dict__.get("forward")
    return fwd is not None and "add_fused_lm_head" in fwd.__func__.__code__.co_qualname


# ------------------------------------------------------------------------ tests
# (data, packing, precision, order): each axis covered, the whole cross is not needed.
# precision: "fp32" end to end; "fp32+bf16-adapters" is TRL's default for QLoRA (it casts
# the adapters of quantized models to bf16); "bf16" adds bf16 autocast (bf16=True).
SFT_CASES = [
    ("prompt_completion", False, "fp32", "after"),
    ("messages", True, "fp32+bf16-adapters", "before"),
    ("messages", False, "bf16", "after"),
]


@pytest.mark.parametrize("data,packing,precision,order", SFT_CASES)
def test_sft_trainer(saved_models, tmp_path, monkeypatch, data, packing, precision, order):
    path = saved_models("llama")
    kw = dict(data=data, packing=packing, bf16=precision == "bf16", fp32_adapters=precision == "fp32")
    _, _, l_ref, g_ref = _run("sft", tiny.load_qlora(path), tmp_path / "ref", None, **kw)
    calls = _fused_calls(monkeypatch)
    # bf16: the patched LoRA layers return PEFT's dtype and rounding, so without shared
    # prefixes the runs agree as in fp32; shared prefixes change the bf16 rounding order
    share = packing or precision == "fp32"  # packed rows run plain: nothing to share
    trainer, report, l_pat, g_pat = _run("sft", tiny.load_qlora(path), tmp_path / "pat", order,
                                         share_prefix=share, **kw)
    _assert_trl_head_kept(report, already=(order == "before"))
    assert report.share_prefix is share
    assert calls["lora"] > 0 and calls["head"] == 0  # LoRA fused; TRL's head ran, ours did not
    _assert_losses(l_pat, l_ref)
    if precision == "fp32":
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    _assert_grads(g_pat, g_ref, FP32_TOL)
    stats = fastlora.shared_prefix_stats(trainer.model)
    if packing:  # TRL's packed rows come as varlen sequences: never planned
        assert stats["shared_calls"] == 0 and stats["fallbacks"].get("packed sequences (cu_seq_lens)"), stats
    elif share:
        assert stats["shared_calls"] > 0 and stats["tokens_run"] < stats["tokens_in"], stats
    _unpatch_then_evaluate(trainer, order, share)


def _unpatch_then_evaluate(trainer, order, share=True):
    lm = trainer.model.get_base_model()
    assert fastlora.unpatch(trainer.model) == N_LORA + int(share) + (1 if order == "before" else 0)
    assert _trl_forward_is_installed(lm)  # TRL's forward is still the model's forward
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    with torch.no_grad():  # and plain calls give the logits again
        trainer.model.eval()
        ids = torch.tensor([[1, 10, 11, 12]])
        assert trainer.model(input_ids=ids).logits.shape == (1, 4, tiny.VOCAB)


def test_sft_trainer_patch_before_lora_is_added(saved_models, tmp_path, monkeypatch):
    """patch(base) before TRL adds LoRA through peft_config: loudly not ok (nothing to
    fuse); patching trainer.model afterwards fuses the LoRA layers TRL added."""
    path = saved_models("llama")
    cfg = tiny.lora_config()
    torch.manual_seed(1)
    _, _, l_ref, g_ref = _run("sft", tiny.load_4bit(path), tmp_path / "ref", None, peft_config=cfg)
    base = tiny.load_4bit(path)
    with pytest.warns(UserWarning, match="accelerated no LoRA layer"):
        early = fastlora.patch(base)
    assert not early.ok and "no PEFT LoRA layer" in str(early)
    calls = _fused_calls(monkeypatch)
    torch.manual_seed(1)
    trainer, report, l_pat, g_pat = _run("sft", base, tmp_path / "pat", "after", peft_config=cfg)
    _assert_trl_head_kept(report, already=True)
    assert "installed over fastlora's head" in report.kept["causal-LM head"][1]
    assert calls["lora"] > 0 and calls["head"] == 0
    # TRL casts the adapters it adds to bf16: shared prefixes round in another order
    _assert_losses(l_pat, l_ref, first=BF16_SHARED["loss"])
    _assert_grads(g_pat, g_ref, BF16_SHARED["grad"])
    assert fastlora.shared_prefix_stats(trainer.model)["shared_calls"] > 0
    _unpatch_then_evaluate(trainer, "before")


@pytest.mark.parametrize("bf16", [False, True])
def test_reward_trainer(saved_models, tmp_path, monkeypatch, bf16):
    # fp32: TRL casts every trainable tensor of a quantized model to bf16, the score head
    # in modules_to_save included, which then fails on fp32 hidden states without autocast
    # (unpatched too: "expected m1 and m2 to have the same dtype"), so the fp32 case undoes it.
    path = saved_models("llama")
    kw = dict(bf16=bf16, fp32_adapters=not bf16)
    _, _, l_ref, g_ref = _run("reward", _reward_model(path), tmp_path / "ref", None, **kw)
    calls = _fused_calls(monkeypatch)
    order = "after" if bf16 else "before"
    trainer, report, l_pat, g_pat = _run("reward", _reward_model(path), tmp_path / "pat", order, **kw)
    assert report.ok and report.patched["lora/bnb-nf4"] == N_LORA, str(report)
    assert "no transformers *ForCausalLM" in report.kept["causal-LM head"][1]  # a score head: nothing to fuse
    assert calls["lora"] > 0
    assert any("modules_to_save" in n and "score" in n for n in g_pat)  # the score head trains
    tol = BF16_SHARED if bf16 else {"loss": FP32_TOL, "grad": FP32_TOL}
    _assert_losses(l_pat, l_ref, first=tol["loss"])
    _assert_grads(g_pat, g_ref, tol["grad"])
    assert fastlora.shared_prefix_stats(trainer.model)["shared_calls"] > 0
    assert fastlora.unpatch(trainer.model) == N_PATCHED
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


@pytest.mark.parametrize("name,bf16,order", [("dpo", False, "after"), ("dpo", True, "before"),
                                             ("grpo", False, "before"), ("grpo", True, "after")])
def test_preference_and_rl_trainers(saved_models, tmp_path, monkeypatch, name, bf16, order):
    """DPO and GRPO score completions with per-token log-probs from TRL's fused head
    (chunked, without (batch, length, vocab) logits): kept exact; the LoRA layers fused."""
    path = saved_models("llama")
    _, _, l_ref, g_ref = _run(name, tiny.load_qlora(path), tmp_path / "ref", None, bf16=bf16)
    calls = _fused_calls(monkeypatch)
    trainer, report, l_pat, g_pat = _run(name, tiny.load_qlora(path), tmp_path / "pat", order, bf16=bf16)
    _assert_trl_head_kept(report, already=(order == "before"))
    assert calls["lora"] > 0 and calls["head"] == 0
    # TRL's bf16 adapters (and autocast): shared prefixes round in another order
    _assert_losses(l_pat, l_ref, atol=1e-7, first=BF16_SHARED["loss"])  # GRPO's loss can be exactly 0
    _assert_grads(g_pat, g_ref, BF16_SHARED["grad"])
    lm = trainer.model.get_base_model()
    assert fastlora.unpatch(trainer.model) == N_PATCHED + (1 if order == "before" else 0)
    assert _trl_forward_is_installed(lm)
    if name == "dpo":
        with _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


# ----------------------------------------------------------- shared prefixes in TRL
@pytest.mark.parametrize("name,order", [("sft", "before"), ("reward", "after"), ("dpo", "before"),
                                        ("grpo", "after")])
def test_shared_prefix_in_trl_trainers(saved_models, tmp_path, name, order):
    """Each trainer, patched with and without shared prefixes (fp32 end to end): the same
    first-step loss and LoRA gradients, and fewer tokens through the decoder layers. DPO
    concatenates chosen and rejected (a pair shares its prompt); GRPO scores a group's
    completions of one prompt; SFT and the reward model share the chat template's start."""
    path = saved_models("llama")
    load = (lambda: _reward_model(path)) if name == "reward" else (lambda: tiny.load_qlora(path))
    runs = {}
    for share in (False, True):
        trainer, report, losses, grads = _run(name, load(), tmp_path / str(share), order, fp32_adapters=True,
                                              share_prefix=share)
        assert report.share_prefix is share
        runs[share] = (losses, grads, fastlora.shared_prefix_stats(trainer.model))
    (l_on, g_on, stats), (l_off, g_off, off) = runs[True], runs[False]
    _assert_losses(l_on, l_off, atol=1e-7)  # GRPO's loss can be exactly 0
    _assert_grads(g_on, g_off, FP32_TOL)
    assert off["calls"] == 0
    assert stats["shared_calls"] > 0 and stats["tokens_run"] < stats["tokens_in"], stats
