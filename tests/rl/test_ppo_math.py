"""fastlora.rl's PPO math against straightforward per-element Python loops, in float64,
on random masked (batch, length) inputs with odd sizes: values and every gradient."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from fastlora import rl
from tests.helpers import assert_close

B, L = 5, 7


def _mask(seed=0, holes=False):
    """Right-padded valid spans of lengths 1..L (and, with holes, a few masked gaps inside)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0], lens[1] = 1, L  # the extremes always present
    m = (torch.arange(L)[None, :] < lens[:, None]).double()
    if holes:
        m[2, 1] = 0.0
        m[3, 0] = 0.0
        m[4, 3] = 0.0
    return m


def _rand(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, generator=g, dtype=torch.float64) * scale


def _poison(x, mask):
    """What sits outside the mask must not matter: put NaN and inf there."""
    x = x.clone()
    x[mask == 0] = float("nan")
    if (mask == 0).any():
        x[(mask == 0).nonzero()[0].tolist()[0], (mask == 0).nonzero()[0].tolist()[1]] = float("-inf")
    return x


def _grad_check(fn, ref, inputs: dict, grad_names):
    """fn and ref on leaf copies; values equal; d(value)/d(input) equal for grad_names."""
    a = {k: (v.clone().requires_grad_(k in grad_names) if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    e = {k: (v.clone().requires_grad_(k in grad_names) if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    out_a, out_e = fn(**a), ref(**e)
    assert_close(out_a, out_e, msg="value")
    if grad_names:
        w = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        (out_a * w).sum().backward()
        (out_e * w).sum().backward()
        for k in grad_names:
            ga = a[k].grad if a[k].grad is not None else torch.zeros_like(a[k])
            ge = e[k].grad if e[k].grad is not None else torch.zeros_like(e[k])
            assert torch.isfinite(ga).all(), k
            assert_close(ga, ge, msg=f"grad {k}")


# ------------------------------------------------------------------------------ KL
def _kl_scalar(lp, rlp, kind):
    d = lp - rlp
    if kind == "k1":
        return d
    if kind == "k3":
        r = torch.exp(rlp - lp)
        return (r - 1) - torch.log(r)
    if kind == "abs":
        return torch.abs(d)
    return 0.5 * d * d


@pytest.mark.parametrize("kind", rl.KL_KINDS)
def test_kl_penalty_matches_loop(kind):
    logp, ref = -_rand(1).abs(), -_rand(2).abs()

    def loop(logp, ref_logp):
        return torch.stack([torch.stack([_kl_scalar(logp[b, t], ref_logp[b, t], kind) for t in range(L)])
                            for b in range(B)])

    _grad_check(lambda logp, ref_logp: rl.kl_penalty(logp, ref_logp, kind), loop,
                {"logp": logp, "ref_logp": ref}, ["logp", "ref_logp"])


def test_kl_penalty_zero_at_equal_and_k3_nonnegative():
    x = -_rand(3).abs()
    for kind in rl.KL_KINDS:
        assert torch.equal(rl.kl_penalty(x, x, kind), torch.zeros_like(x)), kind
    assert (rl.kl_penalty(x, -_rand(4).abs(), "k3") >= 0).all()
    with pytest.raises(ValueError, match="kl kind 'k2'"):
        rl.kl_penalty(x, x, "k2")
    with pytest.raises(ValueError, match=r"shape \(5, 7\) != ref_logp shape \(5, 6\)"):
        rl.kl_penalty(x, x[:, :6], "k1")


# ------------------------------------------------------------------------------ GAE
def _gae_loop(rewards, values, mask, gamma, lam):
    """A_t = sum_l (γλ)^l δ_{t+l} over the run of valid tokens starting at t."""
    adv = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            if not mask[b, t]:
                continue
            a, disc, k = 0.0, 1.0, t
            while k < L and mask[b, k]:
                nv = float(values[b, k + 1]) if k + 1 < L and mask[b, k + 1] else 0.0
                a += disc * (float(rewards[b, k]) + gamma * nv - float(values[b, k]))
                disc *= gamma * lam
                k += 1
            adv[b, t] = a
    ret = torch.where(mask != 0, adv + torch.nan_to_num(values), 0.0)
    return adv, ret


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_loop(gamma, lam, holes):
    mask = _mask(5, holes)
    rewards, values = _rand(6), _rand(7)
    adv, ret = rl.gae(_poison(rewards, mask), _poison(values, mask), mask, gamma=gamma, lam=lam)
    adv_e, ret_e = _gae_loop(rewards, values, mask, gamma, lam)
    assert_close(adv, adv_e, msg="advantages")
    assert_close(ret, ret_e, msg="returns")
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_lambda1_gamma1_returns_are_reward_to_go():
    mask = _mask(8)
    rewards, values = _rand(9), _rand(10)
    _, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = rewards * mask
    togo = r.flip(1).cumsum(1).flip(1) * mask
    assert_close(ret, togo)


# ------------------------------------------------------------------------------ losses
def _policy_loop(logp, old_logp, advantages, mask, clip):
    total, n, clipped, kl = 0.0, 0, 0, 0.0
    for b in range(B):
        for t in range(L):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logp[b, t] - old_logp[b, t])
            a = advantages[b, t]
            u, c = -a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip)
            total = total + torch.maximum(u, c)
            clipped += bool(c > u)
            kl += 0.5 * float(logp[b, t].detach() - old_logp[b, t]) ** 2
            n += 1
    return total / n, clipped / n, kl / n


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_policy_loss_matches_loop(clip, holes):
    mask = _mask(11, holes)
    old = -_rand(12).abs() - 0.5
    logp = old + _rand(13, 0.3)  # ratios around 1, some beyond the clip range
    adv = _rand(14)
    stats = {}

    def fn(logp, old_logp, advantages):
        loss, s = rl.policy_loss(logp, old_logp, advantages, mask, clip=clip)
        stats.update(s)
        return loss

    def ref(logp, old_logp, advantages):
        loss, cf, kl = _policy_loop(logp, old_logp, advantages, mask, clip)
        stats["ref"] = (cf, kl)
        return loss

    _grad_check(fn, ref, {"logp": logp, "old_logp": old, "advantages": adv}, ["logp"])
    cf, kl = stats["ref"]
    assert 0 < cf < 1  # the test exercises both branches
    assert math.isclose(stats["clip_frac"], cf, rel_tol=1e-12)
    assert math.isclose(stats["approx_kl"], kl, rel_tol=1e-10)
    # poisoned masked positions change nothing, and give no NaN gradient
    lp = _poison(logp, mask).requires_grad_()
    loss, s = rl.policy_loss(lp, _poison(old, mask), _poison(adv, mask), mask, clip=clip)
    loss.backward()
    assert math.isclose(float(loss), float(_policy_loop(logp, old, adv, mask, clip)[0]), rel_tol=1e-12)
    assert torch.isfinite(lp.grad).all() and (lp.grad[mask == 0] == 0).all()


def test_policy_loss_gradient_only_through_logp():
    mask = _mask(15)
    old = (-_rand(16).abs()).requires_grad_()
    adv = _rand(17).requires_grad_()
    logp = (old.detach() + 0.1).requires_grad_()
    loss, _ = rl.policy_loss(logp, old, adv, mask)
    loss.backward()
    assert old.grad is None and adv.grad is None and logp.grad is not None


def _value_loop(values, old_values, returns, mask, clip):
    total, n, clipped = 0.0, 0, 0
    for b in range(B):
        for t in range(L):
            if not mask[b, t]:
                continue
            v, vo, r = values[b, t], old_values[b, t], returns[b, t]
            vc = vo + torch.clamp(v - vo, -clip, clip)
            e1, e2 = (v - r) ** 2, (vc - r) ** 2
            total = total + torch.maximum(e1, e2)
            clipped += bool((e2 > e1).detach())
            n += 1
    return 0.5 * total / n, clipped / n


@pytest.mark.parametrize("holes", [False, True])
def test_value_loss_matches_loop(holes):
    mask = _mask(18, holes)
    old, ret = _rand(19), _rand(20)
    values = old + _rand(21, 0.4)
    stats = {}

    def fn(values, old_values, returns):
        loss, s = rl.value_loss(values, old_values, returns, mask, clip=0.2)
        stats.update(s)
        return loss

    def ref(values, old_values, returns):
        loss, cf = _value_loop(values, old_values, returns, mask, 0.2)
        stats["ref"] = cf
        return loss

    _grad_check(fn, ref, {"values": values, "old_values": old, "returns": ret}, ["values"])
    assert 0 < stats["ref"] < 1
    assert math.isclose(stats["vf_clip_frac"], stats["ref"], rel_tol=1e-12)
    v = _poison(values, mask).requires_grad_()
    loss, _ = rl.value_loss(v, _poison(old, mask), _poison(ret, mask), mask)
    loss.backward()
    assert math.isclose(float(loss), float(_value_loop(values, old, ret, mask, 0.2)[0]), rel_tol=1e-12)
    assert torch.isfinite(v.grad).all() and (v.grad[mask == 0] == 0).all()


def test_entropy_bonus_through_token_logprobs():
    """The bonus averages fastlora.token_logprobs' entropy (no logits kept) over valid
    tokens; its gradient equals the full-logits float64 reference's."""
    import fastlora
    from fastlora.ops.token_logprobs import _reference

    mask = _mask(22, holes=True)
    g = torch.Generator().manual_seed(23)
    hidden = torch.randn(B, L, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(29, 16, generator=g, dtype=torch.float64) / 4
    tokens = torch.randint(0, 29, (B, L), generator=g)

    def fn(hidden):
        _, ent = fastlora.token_logprobs(hidden, weight, tokens, return_entropy=True, chunk_size=6)
        return rl.entropy_bonus(ent, mask)

    def ref(hidden):
        _, ent = _reference(hidden, weight, tokens, return_entropy=True)
        total, n = 0.0, 0
        for b in range(B):
            for t in range(L):
                if mask[b, t]:
                    total, n = total + ent[b, t], n + 1
        return total / n

    _grad_check(fn, ref, {"hidden": hidden}, ["hidden"])


# ------------------------------------------------------------------------------ rewards
@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_token_rewards_matches_loop(kind):
    mask = _mask(24, holes=True)
    logp, ref = -_rand(25).abs(), -_rand(26).abs()
    scores = torch.randn(B, generator=torch.Generator().manual_seed(27), dtype=torch.float64)
    rewards, kl = rl.token_rewards(scores, _poison(logp, mask), _poison(ref, mask), mask, beta=0.07, kind=kind)
    exp_r = torch.zeros(B, L, dtype=torch.float64)
    exp_kl = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        last = max(t for t in range(L) if mask[b, t])
        for t in range(L):
            if mask[b, t]:
                exp_kl[b, t] = _kl_scalar(logp[b, t], ref[b, t], kind)
                exp_r[b, t] = -0.07 * exp_kl[b, t] + (float(scores[b]) if t == last else 0.0)
    assert_close(kl, exp_kl)
    assert_close(rewards, exp_r)


def test_zero_length_response_is_an_error():
    mask = _mask(28)
    mask[3] = 0
    x = _rand(29)
    with pytest.raises(ValueError, match=r"response length 0 in row\(s\) \[3\]"):
        rl.token_rewards(torch.zeros(B, dtype=torch.float64), x, x, mask, beta=0.1)
    with pytest.raises(ValueError, match="only 0 and 1"):
        rl.gae(x, x, mask * 2)
    with pytest.raises(ValueError, match=r"values shape \(5, 6\) != mask shape \(5, 7\)"):
        rl.gae(x, x[:, :6], mask)


# ------------------------------------------------------------------------------ GRPO
@pytest.mark.parametrize("k", [2, 3, 5])
def test_group_advantages_match_loop(k):
    n = 4 * k - k  # 3 groups
    s = torch.randn(n, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    s[:k] = 1.5  # one group with no spread: advantage 0
    out = rl.group_advantages(s, k)
    for gi in range(n // k):
        vals = [float(v) for v in s[gi * k:(gi + 1) * k]]
        mu, sd = statistics.fmean(vals), statistics.stdev(vals)
        for j, v in enumerate(vals):
            assert math.isclose(float(out[gi * k + j]), (v - mu) / (sd + 1e-6), rel_tol=1e-9, abs_tol=1e-12)
    assert (out[:k] == 0).all()
    with pytest.raises(ValueError, match="do not divide into groups of"):
        rl.group_advantages(s[:-1], k)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        rl.group_advantages(s, 1)


# ------------------------------------------------------------------------------ KL control
def test_kl_controllers():
    fixed = rl.FixedKLController(0.05)
    assert fixed.update(10.0, 8) == 0.05
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    beta = 0.1
    for kl, n in [(12.0, 64), (6.6, 64), (1.0, 32), (6.0, 16)]:
        err = min(max(kl / 6.0 - 1, -0.2), 0.2)
        beta *= 1 + err * n / 10000
        assert math.isclose(ctl.update(kl, n), beta, rel_tol=1e-15)
    state = ctl.state_dict()
    other = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    other.load_state_dict(state)
    assert other.value == ctl.value
    with pytest.raises(ValueError, match="target and horizon must be > 0"):
        rl.AdaptiveKLController(0.1, target=0.0, horizon=1)


def test_whiten_and_masked_mean_over_valid_tokens():
    mask = _mask(31, holes=True)
    x = _rand(32) * 3 + 1
    vals = [float(x[b, t]) for b in range(B) for t in range(L) if mask[b, t]]
    assert math.isclose(float(rl.masked_mean(_poison(x, mask).nan_to_num(0.0, 0.0, 0.0), mask)),
                        statistics.fmean(vals), rel_tol=1e-12)
    w = rl.whiten(x, mask)
    wv = [float(w[b, t]) for b in range(B) for t in range(L) if mask[b, t]]
    assert abs(statistics.fmean(wv)) < 1e-9
    assert abs(statistics.pstdev(wv) - 1) < 1e-3 or abs(statistics.stdev(wv) - 1) < 1e-3
