"""fastlora.rl math against straightforward Python loops, in float64: forward and gradients,
masked rows (including a fully masked one), odd sizes, garbage (inf/NaN) under the mask."""
from __future__ import annotations

import math

import pytest
import torch

from fastlora.rl import masked_mean, masked_sum, masked_var, reward_loss, whiten
from tests.helpers import assert_close

SHAPES = [(1, 1), (3, 7), (5, 13)]


def _inputs(shape, seed, *, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    mask = (torch.rand(shape, generator=g) < 0.7).long()
    mask.view(-1)[0] = 1  # at least one valid token
    if empty_row and shape[0] > 2:
        mask[1] = 0  # a fully masked row
    # whatever sits under the mask must not matter, not even inf/NaN
    x = torch.where(mask.bool(), x, torch.tensor(float("nan"), dtype=torch.float64))
    if x.numel() > 2:
        x.view(-1)[-1] = float("inf") if mask.view(-1)[-1] == 0 else x.view(-1)[-1]
    return x.requires_grad_(True), mask


def _loop_valid(x, mask):
    B, L = x.shape
    return [(b, t) for b in range(B) for t in range(L) if mask[b, t]]


def _loop_mean(x, mask):
    vals = [x[b, t] for b, t in _loop_valid(x, mask)]
    return sum(vals) / len(vals)


def _loop_var(x, mask):
    vals = [x[b, t] for b, t in _loop_valid(x, mask)]
    mu = sum(vals) / len(vals)
    return sum((v - mu) ** 2 for v in vals) / len(vals)


def _grad(fn, x):
    (g,) = torch.autograd.grad(fn(x), x)
    return g


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_mean_sum_var(shape):
    x, mask = _inputs(shape, 0)
    assert_close(masked_mean(x, mask), _loop_mean(x, mask))
    assert_close(masked_sum(x, mask), sum(x[b, t] for b, t in _loop_valid(x, mask)))
    assert_close(masked_var(x, mask), _loop_var(x, mask))
    # gradients: d mean / dx = mask / n, exactly 0 (not NaN) under the mask
    g = _grad(lambda v: masked_mean(v, mask), x)
    n = int(mask.sum())
    assert_close(g, mask.double() / n)
    w = torch.randn(shape, dtype=torch.float64)
    g = _grad(lambda v: (masked_var(v, mask) * 2.5), x)
    xv = torch.where(mask.bool(), x.detach(), 0)
    mu = xv.sum() / n
    assert_close(g, 2.5 * 2 * (xv - mu) / n * mask)
    del w


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_mean_per_row(shape):
    x, mask = _inputs(shape, 1)
    got = masked_mean(x, mask, dim=1)
    for b in range(shape[0]):
        vals = [x[b, t] for t in range(shape[1]) if mask[b, t]]
        want = sum(vals) / len(vals) if vals else torch.tensor(0.0, dtype=torch.float64)
        assert_close(got[b], want, msg=f"row {b}")
    g = _grad(lambda v: masked_mean(v, mask, dim=1).sum(), x)
    per_row = mask.sum(1, keepdim=True).clamp(min=1).double()
    assert_close(g, mask / per_row)


def test_masked_mean_float_mask_and_empty():
    x = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    assert masked_mean(x, torch.tensor([[1.0, 0.0, 1.0]])).item() == 2.5
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == 1.5
    assert masked_mean(x, torch.zeros(1, 3)).item() == 0.0  # nothing valid: 0, not NaN
    with pytest.raises(ValueError, match=r"mask \(2, 3\) does not broadcast to x \(1, 3\)"):
        masked_mean(x, torch.ones(2, 3))


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shape, shift_mean):
    x, mask = _inputs(shape, 2)
    eps = 1e-8
    got = whiten(x, mask, shift_mean=shift_mean, eps=eps)
    xd = x.detach()
    mu, var = float(_loop_mean(xd, mask)), float(_loop_var(xd, mask))
    want = torch.zeros(shape, dtype=torch.float64)
    for b, t in _loop_valid(x, mask):
        want[b, t] = (xd[b, t] - mu) / math.sqrt(var + eps) + (0 if shift_mean else mu)
    assert_close(got, want)
    assert torch.isfinite(got).all()
    # whitened valid tokens: mean 0 (or the old mean), unit variance
    assert_close(masked_mean(got, mask), torch.tensor(mu if not shift_mean else 0.0, dtype=torch.float64),
                 atol=1e-10)
    assert_close(masked_var(got, mask), torch.tensor(var / (var + eps), dtype=torch.float64))

    # gradient against the loop formula built from scalars (autograd through the loop)
    w = torch.randn(shape, dtype=torch.float64)

    def loop(v):
        vals = [(b, t) for b, t in _loop_valid(v, mask)]
        n = len(vals)
        m = sum(v[b, t] for b, t in vals) / n
        s2 = sum((v[b, t] - m) ** 2 for b, t in vals) / n
        return sum(w[b, t] * ((v[b, t] - m) / torch.sqrt(s2 + eps) + (0 if shift_mean else m)) for b, t in vals)

    x_clean = torch.where(mask.bool(), x.detach(), 0).requires_grad_(True)
    assert_close(_grad(lambda v: (whiten(v, mask, shift_mean=shift_mean) * w).sum(), x), _grad(loop, x_clean))


def test_whiten_low_precision_computes_in_float32():
    x = (torch.randn(4, 9) * 100).to(torch.bfloat16)
    mask = torch.ones(4, 9)
    out = whiten(x, mask)
    assert out.dtype == torch.float32
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.var(unbiased=False)) - 1) < 1e-4


@pytest.mark.parametrize("B", [1, 5, 16])
@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor"])
@pytest.mark.parametrize("center", [0.0, 0.01])
def test_reward_loss(B, margin_kind, center):
    g = torch.Generator().manual_seed(B)
    rc = (torch.randn(B, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    rr = (torch.randn(B, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    margin = {"none": None, "float": 0.5, "tensor": torch.rand(B, generator=g, dtype=torch.float64)}[margin_kind]

    def loop(c, r):
        total = 0.0
        for i in range(B):
            m = 0.0 if margin is None else (margin if isinstance(margin, float) else margin[i])
            z = c[i] - r[i] - m
            total = total - torch.log(torch.sigmoid(z)) + center * (c[i] + r[i]) ** 2
        return total / B

    got = reward_loss(rc, rr, margin, center=center)
    want = loop(rc, rr)
    assert_close(got, want)
    gc, gr = torch.autograd.grad(got, (rc, rr))
    wc, wr = torch.autograd.grad(want, (rc, rr))
    assert_close(gc, wc)
    assert_close(gr, wr)


def test_reward_loss_fp32_and_extremes():
    rc = torch.tensor([100.0, -100.0], dtype=torch.bfloat16)
    rr = torch.tensor([-100.0, 100.0], dtype=torch.bfloat16)
    loss = reward_loss(rc, rr)
    assert loss.dtype == torch.float32
    # softplus form: exact for large |z| where log(sigmoid) would underflow to -inf
    assert_close(loss, torch.tensor(100.0), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"r_chosen \(2,\) and r_rejected \(3,\)"):
        reward_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"margin \(3,\)"):
        reward_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="no pairs"):
        reward_loss(torch.zeros(0), torch.zeros(0))
