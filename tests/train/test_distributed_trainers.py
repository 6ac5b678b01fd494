"""The reward-model and PPO trainers on 2 ranks, and FSDP checkpoints (torchrun, gloo, CPU).

Three torchrun launches, chained so that each resumes the run the one before killed:

1. reward model, DDP and FSDP2, 2 ranks x batch 2 (grad_accum 2, a short last global batch
   that leaves rank 1 nothing) == 1 process x batch 4: losses, accuracies, grad norms,
   held-out scores (sharded, gathered in order) and the adapter; the FSDP run stopped
   (Ctrl-C on every rank) after step 3 and resumed from its sharded checkpoint ==
   uninterrupted. PPO (GAE with the adaptive KL controller, and GRPO) 2 ranks x b == 1
   process x 2b on the same rollouts (:func:`tests.train.dist_worker.fixed_rollout`;
   sampled rollouts differ by rank, see ppo.py): every logged loss and statistic, the KL
   coefficient, the adapters. Then an FSDP SFT run with checkpoints, and the same run
   killed on rank 1 after step 3;
2. that FSDP run resumed on 2 ranks (DCP shards) == uninterrupted, adapter within 1e-6;
   a PPO run killed on rank 1;
3. the PPO run resumed == uninterrupted; ``rlhf`` (its three stages on the 2 ranks, each
   on the tiny model for a step or two); then a bad preference file on rank 1: the CLI's
   exit code 2, rank 1 naming the file and line, rank 0 naming rank 1.

In this process: the 1-process references, and the killed FSDP SFT run resumed on ONE
process with batch 4 (DCP reshards 2 -> 1; the global batch is the same), or refused with
batch 2 (it is not).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close, requires_bnb
from tests.train.conftest import classification_records
from tests.train.test_distributed import _adapter, _assert_same_adapter, _metrics, _torchrun
from tests.train.test_ppo import toy_dir  # noqa: F401 - the toy PPO model, a fixture
from tests.train.test_reward import _pairs

pytestmark = requires_bnb

REL = 1e-5  # 2 ranks vs 1 process: the same float32 math up to the order of the reductions
# Adapters after 4 AdamW steps: an element whose gradient is near 0 gets an update of about lr
# whatever its size (m / sqrt(v)), so the reductions' rounding moves it by up to ~1e-5 x lr-ish
ADAPTER_ATOL = 1e-5
# The values near 0 that are differences of O(1)-O(10) float32 numbers (a mean margin; a KL, a
# sum over tokens of log-prob differences): compared within 1e-5 absolute
ABS = 1e-5


def _rm_cfg(model, data, out, **kw) -> dict:
    base = dict(model=str(model), data=[str(data)], output_dir=str(out), max_steps=4, batch_size=2, grad_accum=2,
                lr=1e-3, warmup_steps=0, eval_split=0.25, progress=False, lora_r=4, lora_alpha=8, seed=0,
                eval_batch_size=4)
    base.update(kw)
    return base


def _ppo_cfg(toy, out, **kw) -> dict:
    base = dict(model=str(toy), data=[str(toy / "prompts.jsonl")], test_data=[str(toy / "test.jsonl")],
                reward_fn=f"{toy / 'toy_reward.py'}:first_word", output_dir=str(out), max_steps=4, batch_size=4,
                mini_batch_size=2, ppo_epochs=2, max_new_tokens=4, lr=3e-3, lora_r=8, lora_alpha=16, kl_coef=0.05,
                kl_target=0.5, kl_horizon=50, progress=False, measure_forgetting=False, seed=0, sample_every=0)
    base.update(kw)
    return base


def _sft_cfg(model, data, out, **kw) -> dict:
    base = dict(model=str(model), data=[str(data)], output_dir=str(out), max_steps=4, batch_size=2, lr=5e-3,
                warmup_steps=1, eval_split=0.25, max_length=64, measure_forgetting=False, progress=False,
                lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=3, parallel="fsdp", save_every=2)
    base.update(kw)
    return base


def _steps(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _metrics(out) if "event" not in r}


def _events(out: Path) -> dict[str, dict]:
    return {r["event"]: r for r in _metrics(out) if "event" in r}


def _same_numbers(got: dict, ref: dict, keys, what, rel=REL, present=True) -> None:
    for k in keys:
        if not present and k not in ref and k not in got:
            continue
        assert k in ref and k in got, (what, k)
        if ref[k] is None:
            assert got[k] is None, (what, k)
        else:
            assert got[k] == pytest.approx(ref[k], rel=rel, abs=ABS), (what, k, ref[k], got[k])


def _same_run(got: Path, ref: Path, step_keys, event_keys=()) -> None:
    sg, sr = _steps(got), _steps(ref)
    assert sorted(sg) == sorted(sr) == list(range(1, len(sr) + 1)), (got, sorted(sg))
    for s in sr:
        _same_numbers(sg[s], sr[s], step_keys, (got.name, s))
    eg, er = _events(got), _events(ref)
    assert sorted(eg) == sorted(er)
    for e in er:
        _same_numbers(eg[e], er[e], event_keys, (got.name, e), present=False)


def _ppo_reference(cfg: dict, monkeypatch) -> None:
    import fastlora.train.ppo as ppo_mod
    from fastlora.train.ppo_config import PPOConfig
    from tests.train.dist_worker import fixed_rollout

    monkeypatch.setattr(ppo_mod, "make_rollout", fixed_rollout)
    ppo_mod.ppo(PPOConfig(**cfg))
    monkeypatch.undo()


def test_rm_and_ppo_on_two_ranks_and_fsdp_checkpoints(tiny_model_dir, toy_dir, tmp_path, monkeypatch):  # noqa: F811
    from safetensors.torch import load_file

    from fastlora.train import SFTConfig, sft
    from fastlora.train.reward import RewardConfig, reward

    prefs = tmp_path / "prefs.jsonl"  # 24 pairs: 18 to train (global batches 4, 4, 4, 4, 2), 6 held out
    prefs.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    (toy_dir / "test.jsonl").write_text("".join(json.dumps({"prompt": f"question {c} say something", "completion": c})
                                                + "\n" for c in "abcde"))  # 5: unequal shares (3 + 2)
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in classification_records(17)))
    t = tmp_path
    ppo_gae = dict(advantage="gae", batch_size=4, mini_batch_size=2, save_every=2)
    ppo_grpo = dict(advantage="grpo", group_size=4, batch_size=2, mini_batch_size=4, kl_target=None)

    run_a = _torchrun(t, "a", [
        {"trainer": "rm", "cfg": _rm_cfg(tiny_model_dir, prefs, t / "rm_ddp")},
        {"trainer": "rm", "cfg": _rm_cfg(tiny_model_dir, prefs, t / "rm_fsdp", parallel="fsdp", save_every=2)},
        {"trainer": "rm", "stop_at": 3, "cfg": _rm_cfg(tiny_model_dir, prefs, t / "rm_stopped", parallel="fsdp",
                                                       save_every=2)},
        {"trainer": "rm", "cfg": _rm_cfg(tiny_model_dir, prefs, t / "rm_stopped", parallel="fsdp", save_every=2,
                                         resume=True)},
        {"trainer": "ppo", "fixed_rollouts": True, "cfg": _ppo_cfg(toy_dir, t / "ppo_gae", **ppo_gae)},
        {"trainer": "ppo", "fixed_rollouts": True, "cfg": _ppo_cfg(toy_dir, t / "ppo_grpo", **ppo_grpo)},
        {"cfg": _sft_cfg(tiny_model_dir, sft_data, t / "sft_straight")},
        {"cfg": _sft_cfg(tiny_model_dir, sft_data, t / "sft_killed"), "die_at": 3, "die_rank": 1},
    ])
    assert run_a.returncode != 0, "rank 1 was killed: the launch must fail"
    for d in ("rm_ddp", "rm_fsdp", "ppo_gae", "ppo_grpo", "sft_straight"):
        assert (t / d / "summary.json").is_file(), (d, run_a.stderr[-3000:])
    for r in (0, 1):  # every patched module ran fused on every rank
        assert json.loads((t / f"a.json.fallbacks.{r}.json").read_text()) == []

    # --- the reward model: 2 x 2 (DDP, FSDP2) == 1 x 4
    reward(RewardConfig(**_rm_cfg(tiny_model_dir, prefs, t / "rm_one", batch_size=4)))
    for name in ("rm_ddp", "rm_fsdp"):
        # tokens run: FSDP scores whole sequences, the others run each pair's prompt once
        _same_run(t / name, t / "rm_one", ("loss", "accuracy", "mean_margin", "grad_norm", "pairs")
                  + (("tokens",) if name == "rm_ddp" else ()), ("accuracy", "mean_margin", "chosen_mean", "rejected_mean"))
        got, ref = (json.loads((t / d / "scores.json").read_text()) for d in (name, "rm_one"))
        for when in ("before", "after"):  # the held-out scores, gathered back in their order
            for side in ("chosen", "rejected"):
                assert_close(torch.tensor(got[when][side]), torch.tensor(ref[when][side]), rtol=REL, atol=1e-6,
                             msg=(name, when, side))
        _assert_same_adapter(t / name, t / "rm_one", rtol=REL, atol=ADAPTER_ATOL)
        assert json.loads((t / name / "summary.json").read_text())["world_size"] == 2
    assert (t / "rm_fsdp" / "checkpoints" / "step-000002" / "sharded").is_dir()
    _same_run(t / "rm_stopped", t / "rm_fsdp", ("loss", "accuracy", "grad_norm"), ("accuracy", "mean_margin"))
    _assert_same_adapter(t / "rm_stopped", t / "rm_fsdp", rtol=1e-6, atol=1e-7)

    # --- PPO: 2 ranks x b == 1 process x 2b on the same rollouts (GAE + adaptive KL, GRPO)
    ppo_keys = ("score", "score_std", "kl", "non_score_reward", "response_length", "policy_loss", "entropy",
                "clip_frac", "approx_kl", "ratio", "grad_norm", "beta", "truncated")
    _ppo_reference(_ppo_cfg(toy_dir, t / "ppo_gae_one", **{**ppo_gae, "batch_size": 8, "mini_batch_size": 4}),
                   monkeypatch)
    # not vf_clip_frac: it counts tokens where old + (v - old) rounds above v, a coin flip of rounding
    _same_run(t / "ppo_gae", t / "ppo_gae_one", ppo_keys + ("value_loss", "value_error", "value_mean", "return_mean",
                                                              "reward"), ("accuracy", "reward"))
    _ppo_reference(_ppo_cfg(toy_dir, t / "ppo_grpo_one", **{**ppo_grpo, "batch_size": 4, "mini_batch_size": 8}),
                   monkeypatch)
    _same_run(t / "ppo_grpo", t / "ppo_grpo_one", ppo_keys + ("kl_loss",), ("accuracy", "reward"))
    betas = [r["beta"] for r in _steps(t / "ppo_gae").values()]
    assert len(set(betas)) == len(betas), betas  # the adaptive controller moved β at every step
    for name in ("ppo_gae", "ppo_grpo"):
        _assert_same_adapter(t / name, t / f"{name}_one", rtol=REL, atol=ADAPTER_ATOL)
        got, ref = (json.loads((t / d / "test_outputs.json").read_text()) for d in (name, f"{name}_one"))
        assert [d["reference"] for d in got] == [d["reference"] for d in ref] == list("abcde")

    # --- FSDP SFT killed after step 3 (checkpoint at step 2: DCP shards + the gathered adapter)
    killed = t / "sft_killed"
    assert not (killed / "summary.json").exists()
    ck = killed / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (ck / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert set(load_file(ck / "adapter" / "adapter_model.safetensors")) == set(_adapter(t / "sft_straight"))
    one_proc = t / "sft_killed_one"
    shutil.copytree(killed, one_proc)
    one_proc_refused = t / "sft_killed_refused"
    shutil.copytree(killed, one_proc_refused)

    run_b = _torchrun(t, "b", [
        {"cfg": _sft_cfg(tiny_model_dir, sft_data, killed, resume=True)},
        {"trainer": "ppo", "fixed_rollouts": True, "die_at": 3, "die_rank": 1,
         "cfg": _ppo_cfg(toy_dir, t / "ppo_killed", **ppo_gae)},
    ])
    assert run_b.returncode != 0 and (killed / "summary.json").is_file(), run_b.stderr[-3000:]
    _same_run(killed, t / "sft_straight", ("loss", "grad_norm", "trained_tokens"), ("eval_loss",))
    _assert_same_adapter(killed, t / "sft_straight", rtol=1e-6, atol=1e-7)

    # the same checkpoint on ONE process with batch 4 (the same global batch): DCP reshards it
    sft(SFTConfig(**_sft_cfg(tiny_model_dir, sft_data, one_proc, batch_size=4, resume=True)))
    _same_run(one_proc, t / "sft_straight", ("loss", "grad_norm", "trained_tokens"), ("eval_loss",))
    _assert_same_adapter(one_proc, t / "sft_straight", rtol=REL, atol=ADAPTER_ATOL)
    with pytest.raises(ValueError, match=r"trained on 2 process\(es\), this launch has 1.*batch-size 2 x 2 = 4"):
        sft(SFTConfig(**_sft_cfg(tiny_model_dir, sft_data, one_proc_refused, resume=True)))

    bad = t / "bad.jsonl"
    bad.write_text(json.dumps(_pairs(1)[0]) + "\n{not json\n")
    args = ["rm", "--model", str(tiny_model_dir), "--output-dir", str(t / "rm_bad"), "--max-steps", "2",
            "--no-progress", "--data"]
    tiny = dict(model=str(tiny_model_dir), lora_r=4, lora_alpha=8, max_new_tokens=4)
    small = {"sft": dict(tiny, max_steps=2, batch_size=2, test_max_examples=4, eval_max_examples=4,
                         measure_forgetting=False),
             "rm": dict(model=str(tiny_model_dir), lora_r=4, lora_alpha=8, max_steps=2, batch_size=2,
                        eval_max_examples=4),
             "ppo": dict(tiny, max_steps=1, batch_size=2, mini_batch_size=2, test_max_examples=4,
                         measure_forgetting=False)}
    run_c = _torchrun(t, "c", [
        {"trainer": "ppo", "fixed_rollouts": True, "cfg": _ppo_cfg(toy_dir, t / "ppo_killed", resume=True, **ppo_gae)},
        {"rlhf": str(t / "rlhf"), "small": small},
        {"cli": args + [str(prefs)], "cli_rank": {"1": args + [str(bad)]}},
    ])
    assert (t / "ppo_killed" / "summary.json").is_file(), run_c.stderr[-3000:]
    _same_run(t / "ppo_killed", t / "ppo_gae", ppo_keys + ("value_loss",), ("accuracy", "reward"))
    _assert_same_adapter(t / "ppo_killed", t / "ppo_gae", rtol=1e-6, atol=1e-7)
    # rlhf: the three stages, each on the 2 processes, PPO on the SFT adapter and the reward model
    stages = {k: json.loads((t / "rlhf" / k / "summary.json").read_text()) for k in ("sft", "rm", "ppo")}
    assert all(s["world_size"] == 2 for s in stages.values()), stages
    assert str(t / "rlhf" / "rm") in stages["ppo"]["reward"] and "frozen SFT adapter" in stages["ppo"]["reference"]
    # the bad file on rank 1: every rank exits 2, rank 1 naming the file and line, rank 0 naming rank 1
    # (torchrun itself exits 1 and reports each worker's exit code; it may stop the second one first)
    assert run_c.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", run_c.stderr), run_c.stderr[-3000:]
    assert "bad.jsonl" in run_c.stderr and "line 2" in run_c.stderr, run_c.stderr[-3000:]
    assert "rank 1 failed while checking the output dir and reading the data" in run_c.stderr, run_c.stderr[-3000:]
    assert not (t / "rm_bad").exists()
