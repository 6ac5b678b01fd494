"""The SFT loop on a tiny random Llama: gradient accumulation normalization, a full run's
outputs (adapter through PEFT, metrics, curve, summary), resume equality, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import assert_close, requires_bnb
from tests.train.conftest import classification_records

pytestmark = requires_bnb


def _lora_model(model_dir, *, seed=0, load_in_4bit=True):
    from fastlora.train.model import add_lora, load_base

    base = load_base(model_dir, load_in_4bit=load_in_4bit, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(seed)
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    # PEFT zero-initializes B, which makes every A gradient zero: give B values so both are tested.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accum_normalizes_by_total_trained_tokens(tiny_model_dir, smollm_tokenizer):
    from fastlora.train.data import collate, prepare
    from fastlora.train.sft import accumulate_gradients

    recs = classification_records(6)
    # Unequal trained-token counts per micro-batch: one long answer, short ones.
    recs[0]["messages"][2]["content"] = '{"category": "billing", "note": "a much longer answer than the others"}'
    examples, _ = prepare(recs, smollm_tokenizer, max_length=256)
    pad = smollm_tokenizer.pad_token_id
    model = _lora_model(tiny_model_dir)
    model.train()
    dev = torch.device("cpu")

    full = collate(examples, pad)
    loss_full, n_full, _ = accumulate_gradients(model, [full], dev)
    g_full = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    parts = [collate(examples[:1], pad), collate(examples[1:4], pad), collate(examples[4:], pad)]
    counts = [int((p["labels"][:, 1:] != -100).sum()) for p in parts]
    assert len(set(counts)) > 1, counts  # otherwise a per-batch mean would pass too
    loss_acc, n_acc, _ = accumulate_gradients(model, parts, dev)
    g_acc = _lora_grads(model)

    assert n_acc == n_full == sum(counts)
    assert abs(loss_acc - loss_full) <= 1e-4 * abs(loss_full)
    for name in g_full:
        assert_close(g_acc[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)

    # The naive mean of per-micro-batch means gives a different gradient (what the test guards against).
    model.zero_grad(set_to_none=True)
    for p in parts:
        (model(**p, use_cache=False).loss / len(parts)).backward()
    g_naive = _lora_grads(model)
    diff = max(float((g_naive[n] - g_full[n]).abs().max() / g_full[n].abs().max().clamp_min(1e-12)) for n in g_full)
    assert diff > 1e-2


def test_fully_masked_microbatch_contributes_nothing(tiny_model_dir, smollm_tokenizer):
    from fastlora.train.data import collate, prepare
    from fastlora.train.sft import accumulate_gradients

    examples, _ = prepare(classification_records(3), smollm_tokenizer, max_length=256)
    pad = smollm_tokenizer.pad_token_id
    masked = {"input_ids": list(examples[0]["input_ids"]), "labels": [-100] * len(examples[0]["labels"])}
    model = _lora_model(tiny_model_dir)
    model.train()
    loss_sum, n, _ = accumulate_gradients(model, [collate([masked], pad), collate(examples, pad)], torch.device("cpu"))
    g = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    loss_ref, n_ref, _ = accumulate_gradients(model, [collate(examples, pad)], torch.device("cpu"))
    assert n == n_ref and torch.isfinite(torch.tensor(loss_sum))
    for name, ref in _lora_grads(model).items():
        assert_close(g[name], ref, rtol=1e-5, atol=1e-7, msg=name)


def _run_cfg(model_dir, data_path, out, **kw):
    from fastlora.train import SFTConfig

    base = dict(model=str(model_dir), data=[str(data_path)], test_data=[str(data_path)], output_dir=str(out), max_steps=6,
                batch_size=4, lr=5e-3, warmup_steps=1, eval_split=0.25, max_length=64, measure_forgetting=False,
                progress=False, max_new_tokens=4, test_max_examples=4, lora_r=4, lora_alpha=8, lora_dropout=0.1,
                seed=3)
    base.update(kw)
    return SFTConfig(**base)


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "event" not in r}


def test_run_outputs_and_resume_gives_identical_losses(tiny_model_dir, chat_jsonl, tmp_path):
    """Run A: 6 steps straight. Run B: killed (KeyboardInterrupt) during step 5 after the
    step-3 checkpoint, then resumed: steps 4-6 must have exactly run A's losses, and the
    adapters must be equal. Dropout is on, so the RNG state must be restored too."""
    from peft import PeftModel

    from fastlora.train import sft
    from fastlora.train.model import load_base

    out_a = tmp_path / "a"
    summary = sft(_run_cfg(tiny_model_dir, chat_jsonl, out_a, save_every=3, eval_every=3, patch=False))

    # --- what a run leaves behind
    for f in ("summary.json", "metrics.jsonl", "curve.png", "run.json", "adapter/adapter_model.safetensors",
              "adapter/adapter_config.json"):
        assert (out_a / f).is_file(), f
    on_disk = json.loads((out_a / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "retention", "train_seconds", "tokens_per_second"):
        assert key in on_disk, key
    assert on_disk["steps"] == 6 and on_disk["tokens_per_second"] > 0
    assert 0.0 <= on_disk["accuracy_after"] <= 1.0
    losses_a = _losses(out_a)
    assert sorted(losses_a) == [1, 2, 3, 4, 5, 6]
    assert losses_a[6] < losses_a[1]  # lr 5e-3 on 18 tiny examples: the loss must go down
    events = [json.loads(line).get("event") for line in (out_a / "metrics.jsonl").read_text().splitlines()]
    assert events.count("eval") == 1 and "before" in events and "after" in events
    assert summary["adapter"] == str(out_a / "adapter")

    # --- the adapter loads through PEFT and has been trained
    cfg = json.loads((out_a / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    base = load_base(tiny_model_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    loaded = PeftModel.from_pretrained(base, str(out_a / "adapter"))
    b_norm = sum(float(p.abs().sum()) for n, p in loaded.named_parameters() if "lora_B" in n)
    assert b_norm > 0

    # --- killed during step 5, then resumed
    out_b = tmp_path / "b"

    def kill(step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sft(_run_cfg(tiny_model_dir, chat_jsonl, out_b, save_every=3, eval_every=3, patch=False), on_step=kill)
    assert not (out_b / "summary.json").exists()
    assert sorted(p.name for p in (out_b / "checkpoints").iterdir()) == ["step-000003"]
    assert sorted(_losses(out_b)) == [1, 2, 3, 4]

    # Without --resume the half-finished run is protected.
    with pytest.raises(ValueError, match="already holds a run"):
        sft(_run_cfg(tiny_model_dir, chat_jsonl, out_b, save_every=3, eval_every=3, patch=False))

    sft(_run_cfg(tiny_model_dir, chat_jsonl, out_b, save_every=3, eval_every=3, patch=False, resume=True))
    losses_b = _losses(out_b)
    assert sorted(losses_b) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert losses_b[s] == pytest.approx(losses_a[s], rel=1e-6, abs=1e-7), (s, losses_a, losses_b)
    from safetensors.torch import load_file

    wa = load_file(out_a / "adapter" / "adapter_model.safetensors")
    wb = load_file(out_b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7, msg=k)
    summary_b = json.loads((out_b / "summary.json").read_text())
    assert summary_b["accuracy_before"] == on_disk["accuracy_before"]  # carried over from the checkpoint


def test_early_stopping_and_packing(tiny_model_dir, chat_jsonl, tmp_path):
    from fastlora.train import sft

    seen = []
    # Early stopping on accuracy, which stays at 0 for a random tiny model trained at lr 1e-6:
    # the first evaluation sets the best, the next two do not improve on it.
    summary = sft(_run_cfg(tiny_model_dir, chat_jsonl, tmp_path / "es", max_steps=20, eval_every=1,
                           early_stopping_patience=2, eval_metric="accuracy", lr=1e-6, packing=True,
                           test_data=None, eval_max_examples=2, patch=False),
                  on_step=lambda step, m: seen.append(step))
    assert summary["stopped_early"] is True
    assert summary["steps"] == 3 == len(seen)  # first eval sets the best, two more without improvement


@pytest.mark.parametrize("case", ["missing_data", "missing_model", "bad_targets", "bad_format", "empty"])
def test_bad_input_fails_clearly_and_writes_nothing(case, tiny_model_dir, chat_jsonl, tmp_path):
    from fastlora.train import sft

    out = tmp_path / "out"
    kw = {}
    if case == "missing_data":
        kw["data"] = [str(tmp_path / "nope.jsonl")]
        err, match = FileNotFoundError, "nope.jsonl"
    elif case == "missing_model":
        kw["model"] = str(tmp_path / "no_model")
        err, match = FileNotFoundError, "no_model"
    elif case == "bad_targets":
        kw["target_modules"] = ["qkv", "q_proj"]
        err, match = ValueError, r"\['qkv'\].*q_proj"
    elif case == "bad_format":
        kw["data_format"] = "alpaca"
        err, match = ValueError, "instruction"
    else:
        kw["max_length"] = 4  # every answer is cut off: nothing left to train
        err, match = ValueError, "empty after filtering"
    with pytest.raises(err, match=match):
        sft(_run_cfg(tiny_model_dir, chat_jsonl, out, **kw))
    assert not out.exists()


def test_shared_prefix_run_equals_the_plain_one(tiny_model_dir, chat_jsonl, tmp_path):
    """--share-prefix (the default) against --no-share-prefix: the same losses step by step,
    fewer positions through the decoder (recorded per step and in the summary)."""
    from fastlora.train import sft

    runs = {}
    for share in (True, False):
        out = tmp_path / str(share)
        summary = sft(_run_cfg(tiny_model_dir, chat_jsonl, out, max_steps=3, lora_dropout=0.0, share_prefix=share,
                               test_max_examples=2))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[share] = (summary, {r["step"]: r for r in rows if "event" not in r})
    (on, steps_on), (off, steps_off) = runs[True], runs[False]
    assert on["share_prefix"] is True and off["share_prefix"] is False
    for s in (1, 2, 3):
        assert steps_on[s]["loss"] == pytest.approx(steps_off[s]["loss"], rel=1e-5)
        assert 0 < steps_on[s]["tokens_run_fraction"] < 1  # the chat template's system prompt runs once
        assert steps_off[s]["tokens_run_fraction"] is None  # nothing counted: sharing is off
    assert 0 < on["tokens_run_fraction"] < 1 and off["tokens_run_fraction"] is None
    assert on["patch_report"]["share_prefix"] is True and off["patch_report"]["share_prefix"] is False
