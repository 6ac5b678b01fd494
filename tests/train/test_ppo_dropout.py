"""PPO's forwards run with dropout off, and its log-probs are tempered consistently.

On the toy Llama of ``test_ppo.py`` with attention dropout 0.1 in its config, an SFT
adapter with lora_dropout 0.05 and a reward model with lora_dropout 0.1:

- at step 0 (policy == reference) the KL is 0 and the first mini-batch's ratio is 1 with
  no clipping, before and after a rollout's generate call (which used to leave the model
  in training mode), while gradients still reach the policy;
- the reward model scores the same rollout identically every time;
- at temperature 0.7 the old, reference and training log-probs are all the tempered ones
  (checked against a float64 log-softmax of the model's own logits), so the ratio is 1
  and the KL 0 at step 0;
- top-k / top-p, whose filtered log-probs PPO does not compute, are refused.

"KL 0" here is up to the one difference between the paths: the old log-probs come from
the decode (KV cache, one token at a time), the reference from a full forward; in fp32
they differ by rounding only (measured on this model at T 1 and 0.7: at most 1.1e-5 per
token, 1.4e-6 per response, ratio - 1 at most 2.4e-7; with the dropout on, as before the
fix: a KL of 3.5 to 6.3 per response and a clip fraction of 0.22 to 0.44).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close, requires_bnb
from tests.patch import tiny
from tests.train.test_ppo import _cfg, _sft_adapter, _steps, toy_dir  # noqa: F401  (toy_dir is a fixture)

pytestmark = requires_bnb

# fp32 rounding between the decode path and a full forward (see the module docstring)
KL_TOL = 1e-4  # per response (a sum over <= 4 tokens)
RATIO_TOL = 1e-5


@pytest.fixture(scope="module")
def dropout_dir(toy_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The toy model with attention_dropout 0.1, an SFT adapter with lora_dropout 0.05
    (random non-zero B, so the adapter and its dropout matter) and a `fastlora rm`-format
    reward model with lora_dropout 0.1."""
    from fastlora.rl.base import SharedBase
    from fastlora.train.model import load_base

    out = tmp_path_factory.mktemp("toy_dropout")
    shutil.copytree(toy_dir, out, dirs_exist_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["attention_dropout"] = 0.1
    (out / "config.json").write_text(json.dumps(cfg))

    _sft_adapter(toy_dir, out / "sft")  # the toy's weights are the same: made for this base
    sft_cfg = json.loads((out / "sft" / "adapter_config.json").read_text())
    sft_cfg.update(lora_dropout=0.05, base_model_name_or_path=str(out))
    (out / "sft" / "adapter_config.json").write_text(json.dumps(sft_cfg))

    lm = load_base(out, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    rm = SharedBase.from_model(lm, patch=False)
    rm.add_role("reward", tiny.lora_config(r=4, lora_alpha=8, lora_dropout=0.1), seed=5, head_init_std=0.5)
    rm.export_sequence_classification("reward", out / "rm" / "adapter")
    assert json.loads((out / "rm" / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    return out


def _setup(d: Path, tmp_path, reward: bool = False, **kw):
    from transformers import AutoTokenizer

    from fastlora.train.model import load_base
    from fastlora.train.ppo import build_base, load_prompts

    cfg = _cfg(d, tmp_path / "run", sft_adapter=str(d / "sft"), batch_size=8, mini_batch_size=4, **kw).resolved()
    tok = AutoTokenizer.from_pretrained(d)
    lm = load_base(d, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    lm.train()  # handed over in training mode: the attention dropout is live too
    base = build_base(cfg, lm, d / "sft", d / "rm" / "adapter" if reward else None)
    items = load_prompts(cfg, tok)["prompts"][:8]
    return cfg, tok, base, items


def _policy_grads(base):
    return [p.grad for p in base.trainable_parameters(["policy"]) if p.grad is not None]


def test_step0_kl_is_0_and_ratio_1_with_dropout_configured(dropout_dir, tmp_path):
    from fastlora.train.ppo import make_rollout, micro_loss, prepare_batch

    cfg, tok, base, items = _setup(dropout_dir, tmp_path)
    for step in range(3):  # every rollout: generation must not switch dropout back on
        ro, _ = make_rollout(base, tok, cfg, items, step)
        batch, st = prepare_batch(base, cfg, ro, torch.zeros(len(items)), beta=0.05)
        assert abs(st["kl"]) <= KL_TOL, st
        loss, mst = micro_loss(base, cfg, batch, [0, 1, 2, 3], beta=0.05)
        assert abs(mst["ratio"] - 1.0) <= RATIO_TOL, mst
        assert mst["clip_frac"] == 0.0 and mst["approx_kl"] <= 1e-10, mst
        assert mst["vf_clip_frac"] == 0.0, mst
        # dropout off does not mean no gradient: the update forward still trains the policy
        loss.backward()
        grads = _policy_grads(base)
        assert grads and any(float(g.abs().max()) > 0 for g in grads)
        for p in base.parameters():
            p.grad = None


def test_first_minibatch_of_a_run_is_unclipped(dropout_dir, tmp_path):
    """The whole loop: one rollout, one epoch of one mini-batch, so the logged ratio and
    clip fraction are the first mini-batch's."""
    from fastlora.train.ppo import ppo

    ppo(_cfg(dropout_dir, tmp_path / "run", sft_adapter=str(dropout_dir / "sft"), max_steps=1, batch_size=8,
             mini_batch_size=8, ppo_epochs=1))
    rec = _steps(tmp_path / "run")[1]
    assert abs(rec["kl"]) <= KL_TOL, rec
    assert abs(rec["ratio"] - 1.0) <= RATIO_TOL and rec["clip_frac"] == 0.0, rec


def test_reward_scores_are_deterministic(dropout_dir, tmp_path):
    from fastlora.train.ppo import Scorer, make_rollout

    cfg, tok, base, items = _setup(dropout_dir, tmp_path, reward=True)
    scorer = Scorer(cfg, base, None, print, tok)
    ro, _ = make_rollout(base, tok, cfg, items, 0)
    first, ok = scorer(ro)
    assert bool(ok.all()) and float(first.std()) > 0
    assert torch.equal(scorer(ro)[0], first)
    make_rollout(base, tok, cfg, items, 1)  # a generate call in between
    assert torch.equal(scorer(ro)[0], first)


def _full_forward_logp(base, ro, temperature: float) -> torch.Tensor:
    """(N, Lr) float64 log-probs of the response tokens from the policy's own logits (a
    plain PEFT forward, no fastlora op), tempered in float64."""
    pos = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with base.activate("policy") as model, torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
    lp = torch.log_softmax(logits.double()[:, ro.P - 1: -1] / temperature, -1)
    return lp.gather(-1, ro.tokens[:, :, None]).squeeze(-1) * ro.mask


def test_tempered_logprobs_throughout(dropout_dir, tmp_path):
    from fastlora.train.ppo import make_rollout, micro_loss, prepare_batch, response_logprobs

    T = 0.7
    cfg, tok, base, items = _setup(dropout_dir, tmp_path, temperature=T)
    ro, _ = make_rollout(base, tok, cfg, items, 0)
    ref64 = _full_forward_logp(base, ro, T)
    assert float((ref64 - _full_forward_logp(base, ro, 1.0)).abs().max()) > 100 * 1e-5  # T matters here
    assert_close(ro.old_logp * ro.mask, ref64, dtype=torch.float32)  # the decode's (old) log-probs
    with torch.no_grad():
        pol = response_logprobs(base, "policy", ro, temperature=T)
    assert_close(pol * ro.mask, ref64, dtype=torch.float32)  # the full-forward ones
    batch, st = prepare_batch(base, cfg, ro, torch.zeros(len(items)), beta=0.05)
    assert_close(batch.ref_logp * ro.mask, ref64, dtype=torch.float32)  # reference == policy at step 0
    assert abs(st["kl"]) <= KL_TOL, st
    _, mst = micro_loss(base, cfg, batch, [0, 1, 2, 3], beta=0.05)
    assert abs(mst["ratio"] - 1.0) <= RATIO_TOL and mst["clip_frac"] == 0.0, mst


def test_top_k_and_top_p_are_refused(tmp_path, capsys):
    from fastlora.cli import main
    from fastlora.train.ppo_config import PPOConfig

    with pytest.raises(ValueError, match="top_k=5 .*PPO"):
        PPOConfig(top_k=5)
    with pytest.raises(ValueError, match="top_p=0.9 .*PPO"):
        PPOConfig(top_p=0.9)
    PPOConfig(top_k=0, top_p=1.0, temperature=0.7)  # the defaults, and any temperature, are fine
    assert main(["ppo", "--top-p", "0.9", "--output-dir", str(tmp_path / "o")]) == 2
    assert "top_p=0.9" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
