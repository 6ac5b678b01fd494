"""The shared base on a tiny random Llama loaded 4-bit through transformers + bitsandbytes + PEFT.

- the reference role is bit-identical to the same base loaded with no adapter at all;
- a role's gradients reach only its own adapter and head;
- heads survive every switch (roles, PEFT's disable_adapter, set_adapter) and a save/load;
- left padding scores the same tokens as no padding (positions from the mask);
- the memory report is exact: the meta-device estimate equals the loaded model's bytes.
"""
from __future__ import annotations

import pytest
import torch

from fastlora.rl import SharedBase, last_token_index
from fastlora.rl.base import HEADS_FILE
from tests.helpers import assert_close, requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny.save_random("llama", tmp_path_factory.mktemp("rl_tiny") / "llama")


def _base(path, patch=True, roles=("policy", "critic", "reward")) -> SharedBase:
    base = SharedBase.from_model(tiny.load_4bit(path), patch=patch)
    for i, role in enumerate(roles):
        # random (non-zero) LoRA B so that every adapter changes the output
        base.add_role(role, tiny.lora_config(), seed=10 + i)
    return base


def _batch(B=3, L=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tiny.VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -4:] = 0  # right padding
    ids[1, -4:] = 0
    return ids, mask


def _plain_logprobs(model, ids, mask):
    """log p(ids[:, 1:]) from the plain model's own logits (full log-softmax)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp * (mask[:, :-1] * mask[:, 1:])


@pytest.mark.parametrize("patch", [True, False])
def test_reference_is_bit_identical_to_the_base(tiny_path, patch):
    from fastlora.ops.token_logprobs import token_logprobs

    ids, mask = _batch()
    plain = tiny.load_4bit(tiny_path)
    plain.eval()
    with torch.no_grad():
        h = plain.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        valid = (mask[:, :-1] * mask[:, 1:]).bool()
        want = torch.zeros(valid.shape).masked_scatter(
            valid, token_logprobs(h[:, :-1][valid], plain.lm_head.weight, ids[:, 1:][valid]))

    base = _base(tiny_path, patch=patch)
    base.eval()
    with torch.no_grad():
        ref = base("reference", ids, mask)
        pol = base("policy", ids, mask)
        ref_again = base("reference", ids, mask)  # after another role ran
    assert ref.shape == (3, 10) and ref.dtype == torch.float32
    assert torch.equal(ref, want), "reference role differs from the base model with no adapter"
    assert torch.equal(ref_again, want)
    assert not torch.allclose(pol, ref), "the policy adapter changed nothing: the test would not see a leak"
    # and the log-probs are the model's: the same as a log-softmax of its logits
    assert_close(ref, _plain_logprobs(plain, ids, mask), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), base.activate("policy") as m:
        m.eval()
        assert_close(pol, _plain_logprobs(m, ids, mask), rtol=1e-5, atol=1e-5)


def _grads(base):
    return {n: p.grad for n, p in base.named_parameters() if p.grad is not None}


def test_gradients_reach_only_the_role_own_adapter_and_head(tiny_path):
    base = _base(tiny_path)
    base.train()
    ids, mask = _batch()
    owned = {r: {id(p) for p in base.parameters_of(r)} for r in ("policy", "critic", "reward")}
    names = {id(p): n for n, p in base.named_parameters()}
    assert all(owned.values()) and not (owned["policy"] & owned["critic"]) and not (owned["critic"] & owned["reward"])
    # only adapters and heads train
    assert {id(p) for p in base.parameters() if p.requires_grad} == set().union(*owned.values())
    for role in ("policy", "critic", "reward"):
        base.zero_grad(set_to_none=True)
        out = base(role, ids, mask)
        (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
        got = {id(p) for p in base.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == owned[role], (role, sorted(names[i] for i in got ^ owned[role])[:6])
    # the reference role trains nothing
    base.zero_grad(set_to_none=True)
    out = base("reference", ids, mask)
    assert not out.requires_grad


def test_heads_survive_every_switch_and_a_save(tiny_path, tmp_path):
    base = _base(tiny_path)
    base.eval()
    ids, mask = _batch()
    heads = {r: (base.heads[r], base.heads[r].weight.detach().clone()) for r in ("critic", "reward")}
    with torch.no_grad():
        score = base("reward", ids, mask)
        values = base("critic", ids, mask)
        for role in ("policy", "reference", "critic", "reward", "reference"):
            base(role, ids, mask)
        with base.model.disable_adapter():  # PEFT's own switch, as users call it
            base.lm(input_ids=ids)
        base.model.set_adapter("policy")
        for r, (mod, w) in heads.items():
            assert base.heads[r] is mod and torch.equal(mod.weight, w), r
        assert torch.equal(base("reward", ids, mask), score)
        assert torch.equal(base("critic", ids, mask), values)
    assert score.shape == (3,) and values.shape == (3, 11)
    # values are 0 on padding; the score is the value at the last valid token
    assert (values[1, -4:] == 0).all()
    assert_close(score, base.head_values("reward", base.hidden_states("reward", ids, mask), mask)
                 .gather(1, last_token_index(mask)[:, None]).squeeze(1))

    base.save(tmp_path / "ckpt")
    fresh = SharedBase.from_model(tiny.load_4bit(tiny_path))
    assert fresh.load(tmp_path / "ckpt") == ["reference", "policy", "critic", "reward"]
    fresh.eval()
    with torch.no_grad():
        for role in ("policy", "reference", "critic", "reward"):
            assert torch.equal(fresh(role, ids, mask), base(role, ids, mask)), role
    assert fresh.roles == base.roles


def test_wrong_head_size_is_refused_and_nothing_changes(tiny_path, tmp_path):
    from safetensors.torch import load_file, save_file

    base = _base(tiny_path)
    base.save(tmp_path / "ckpt")
    heads = load_file(str(tmp_path / "ckpt" / HEADS_FILE))
    heads["reward.weight"] = torch.zeros(1, 64)
    save_file(heads, str(tmp_path / "ckpt" / HEADS_FILE))
    before = {r: h.weight.detach().clone() for r, h in base.heads.items()}
    lora_before = [p.detach().clone() for p in base.parameters_of("policy")]
    with torch.no_grad():
        base.heads["critic"].weight.add_(1.0)  # so a partial load would show
    before["critic"] += 1.0
    with pytest.raises(ValueError, match=r"heads.safetensors: head of role 'reward' has shape \(1, 64\).*\(1, 128\)"):
        base.load(tmp_path / "ckpt")
    for r, w in before.items():
        assert torch.equal(base.heads[r].weight, w), r
    for p, w in zip(base.parameters_of("policy"), lora_before):
        assert torch.equal(p, w)


def test_padding_left_or_right_scores_the_same_tokens(tiny_path):
    base = _base(tiny_path, roles=("policy", "reward"))
    base.eval()
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(3, tiny.VOCAB, (1, 7), generator=g)
    pad = torch.zeros(1, 3, dtype=torch.long)
    ones, zeros = torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    left_ids, left_mask = torch.cat([pad, seq], 1), torch.cat([zeros, ones], 1)
    right_ids, right_mask = torch.cat([seq, pad], 1), torch.cat([ones, zeros], 1)
    with torch.no_grad():
        lp = base("policy", seq, ones)
        s = base("reward", seq, ones)
        for ids, mask, sl in ((left_ids, left_mask, slice(3, 9)), (right_ids, right_mask, slice(0, 6))):
            assert_close(base("reward", ids, mask), s, rtol=1e-5, atol=1e-5)
            got = base("policy", ids, mask)
            assert_close(got[:, sl], lp, rtol=1e-5, atol=1e-5)
            assert (got * (1 - (mask[:, :-1] * mask[:, 1:]))).abs().sum() == 0
    with pytest.raises(ValueError, match=r"rows \[0\] of the batch have no valid token"):
        base("reward", seq, torch.zeros_like(seq))


def test_shared_critic_on_the_policy_adapter_and_frozen_reference_adapter(tiny_path):
    base = _base(tiny_path, roles=("policy",))
    base.add_role("critic", adapter="policy", seed=5)  # PPO's critic: shared
    base.add_role("sft", tiny.lora_config(), kind="lm", trainable=False, seed=7)
    base.add_role("reference", adapter="sft")  # the reference is a frozen adapter
    assert base.roles["critic"].adapter == "policy" and base.roles["critic"].trainable
    assert not base.roles["reference"].trainable
    params = base.trainable_parameters()
    assert {id(p) for p in params} == {id(p) for p in base.parameters_of("policy")} | \
        {id(p) for p in base.heads["critic"].parameters()}
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(base("reference", ids, mask), base("sft", ids, mask))


def test_bad_roles_and_names(tiny_path):
    base = _base(tiny_path, roles=("policy",))
    with pytest.raises(KeyError, match="unknown role 'critic'"):
        base("critic", *_batch())
    with pytest.raises(ValueError, match="kind=None"):
        base.add_role("judge")
    with pytest.raises(ValueError, match="name 'model' is not allowed"):
        base.add_role("model", kind="lm")
    with pytest.raises(ValueError, match=r"attention_mask \(3, 4\) does not match input_ids \(3, 11\)"):
        base("policy", _batch()[0], torch.ones(3, 4))


def test_memory_report_is_exact(tiny_path):
    from fastlora.rl.memory import format_memory, memory_estimate, nf4_param_bytes

    base = _base(tiny_path, roles=("policy", "critic", "reward"))
    got = base.memory_report()
    est = memory_estimate(base.lm.config, lora_r=8, dtype=torch.float32)
    assert got["base"] == est["base"]
    assert got["roles"] == est["roles"]
    assert got["shared"] == est["shared"] and got["separate"] == est["separate"]
    # the arithmetic by hand: 4 bases + 3 adapters + 2 heads vs 1 base + 3 adapters + 2 heads
    a = got["roles"]["policy"]["adapter_bytes"]
    h = got["roles"]["reward"]["head_bytes"]
    assert h == 128 * 4 and a == 8 * sum(i + o for i, o in _linear_shapes()) * 4
    assert got["separate"]["bytes"] == 4 * got["base"]["bytes"] + 3 * a + 2 * h
    assert got["shared"]["bytes"] == got["base"]["bytes"] + 3 * a + 2 * h
    assert nf4_param_bytes(128 * 128) == 8192 + 256 + 64 + 4 + 4 + 1024
    assert "shared / separate" in format_memory(got)


def _linear_shapes():
    # q, k, v, o, gate, up, down of the tiny Llama, per layer (hidden 128, kv 2 heads of 32, inter 256)
    per_layer = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)]
    return per_layer * tiny.LAYERS


def test_pairs_share_their_prompt_inside_the_decoder(tiny_path):
    """Preference pairs scored as whole rows on a base patched with shared prefixes: the
    same scores and gradients as without, the prompts run once (one mechanism, in patch)."""
    import fastlora
    from fastlora.patch import prefix

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, tiny.VOCAB, (n,), generator=g) for n in (5, 3)]
    conts = [torch.randint(3, tiny.VOCAB, (n,), generator=g) for n in (2, 4, 1, 3)]  # 2 per prompt
    whole = [torch.cat([prompts[i // 2], conts[i]]) for i in range(4)]
    ids = torch.zeros(4, 9, dtype=torch.long)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for i, w in enumerate(whole):
        ids[i, :len(w)], mask[i, :len(w)] = w, 1
    wts = torch.tensor([1.0, -2.0, 0.5, 3.0])
    out = {}
    for share in (True, False):
        base = SharedBase.from_model(tiny.load_4bit(tiny_path), share_prefix=share)
        base.add_role("reward", tiny.lora_config(), seed=10)
        prefix.set_min_saving(base, float("-inf"))
        base.train()
        params = base.trainable_parameters()
        s = base("reward", ids, mask)
        out[share] = (s, torch.autograd.grad((s * wts).sum(), params), fastlora.shared_prefix_stats(base))
    (got, g_got, stats), (want, g_want, off) = out[True], out[False]
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):  # fp32 sums in another order: relative to the gradient's norm
        assert b.abs().max() > 0 and ((a - b).norm() / b.norm()).item() <= 1e-5
    assert stats["shared_calls"] == 1 and stats["tokens_run"] < stats["tokens_in"], stats
    assert off["calls"] == 0
