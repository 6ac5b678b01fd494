"""fastlora.linear_cross_entropy against the float64 reference on full logits:
forward, grad wrt hidden / weight / bias, every option, chunking, masks, extras,
bad input, memory (nothing of size N x V saved), torch.library ops, Triton."""
import itertools

import pytest
import torch

import fastlora
from fastlora.backend import Backend
from fastlora.ops import linear_cross_entropy as lce_mod
from tests.helpers import TRITON_DEVICE, assert_close, requires_triton

ref = lce_mod._reference


def _data(n, h, v, dtype=torch.float64, mask_every=3, seed=0, wscale=1.0, lead=None):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) * wscale / h**0.5).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    if mask_every:
        y[::mask_every] = -100
    if lead is not None:
        hid, y = hid.reshape(*lead, h), y.reshape(*lead)
    return hid, w, b, y


def _check(hid, w, b, y, *, use_bias=True, grad_w=True, rtol=None, atol=None, backend=None, **opts):
    dev = TRITON_DEVICE if Backend.parse(backend) is Backend.TRITON else hid.device
    leaves = [hid.detach().clone().to(dev).requires_grad_(), w.detach().clone().to(dev).requires_grad_(grad_w),
              b.detach().clone().to(dev).requires_grad_()]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    bias, rbias = (leaves[2], refs[2]) if use_bias else (None, None)
    out = fastlora.linear_cross_entropy(leaves[0], leaves[1], y.to(dev), bias=bias, backend=backend, **opts)
    opts.pop("chunk_size", None)
    exp = ref(refs[0], refs[1], y.to(dev), bias=rbias, **opts)
    if out.dim():
        wt = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        (out * wt.to(out.device, out.dtype)).sum().backward()
        (exp * wt).sum().backward()
    else:
        out.backward()
        exp.backward()
    dt = hid.dtype
    assert_close(out.cpu(), exp.cpu(), dtype=dt, rtol=rtol, atol=atol, msg="loss")
    names = ["hidden", "weight", "bias"]
    for name, a, e in zip(names, leaves, refs):
        if not a.requires_grad or (name == "bias" and not use_bias):
            assert a.grad is None, name
            continue
        assert a.grad.dtype == dt, name
        assert_close(a.grad.cpu(), e.grad.cpu(), dtype=dt, rtol=rtol, atol=atol, msg=f"grad {name}")
    return out.cpu(), leaves


OPTIONS = [
    dict(reduction=r, label_smoothing=ls, z_loss=z, softcap=sc, logit_scale=s)
    for r, ls, z, sc, s in itertools.product(
        ("mean", "sum", "none"), (0.0, 0.1), (0.0, 1e-3), (None, 3.0), (1.0, 0.5)
    )
    # logit_scale is independent of the loss options: test it with a few of them
    if s == 1.0 or (ls and sc)
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_all_options_float64(opts):
    hid, w, b, y = _data(23, 8, 29)
    _check(hid, w, b, y, chunk_size=7, **opts)  # 23 valid-ish rows: partial last chunk


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("num_items", [6, torch.tensor(13.0)])
def test_num_items_in_batch(reduction, num_items):
    hid, w, b, y = _data(17, 6, 11)
    out, _ = _check(hid, w, b, y, reduction=reduction, num_items_in_batch=num_items, chunk_size=4)
    assert out.dim() == 0


@pytest.mark.parametrize("use_bias,grad_w", [(False, True), (True, False), (False, False)])
def test_optional_bias_and_frozen_weight(use_bias, grad_w):
    hid, w, b, y = _data(19, 5, 13)
    _check(hid, w, b, y, use_bias=use_bias, grad_w=grad_w, chunk_size=6)
    _check(hid, w, b, y, use_bias=use_bias, grad_w=grad_w, chunk_size=6, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_vs_float64(dtype):
    hid, w, b, y = _data(31, 16, 45, dtype=dtype)
    # bf16: the logits chunk is rounded to bf16 exactly as eager F.linear does
    tol = dict(rtol=5e-3, atol=5e-3) if dtype == torch.bfloat16 else {}
    _check(hid, w, b, y, chunk_size=8, label_smoothing=0.1, softcap=20.0, **tol)


def test_batched_leading_dims_and_none_zeros_at_ignored():
    hid, w, b, y = _data(12, 6, 9, lead=(3, 4))
    out, _ = _check(hid, w, b, y, reduction="none", chunk_size=5)
    assert out.shape == (3, 4)
    assert (out[y == -100] == 0).all()


def test_vocab_50257():
    hid, w, b, y = _data(5, 8, 50257, dtype=torch.float32)
    _check(hid, w, b, y, chunk_size=2, z_loss=1e-4)


def test_logits_of_magnitude_1e4():
    hid, w, b, y = _data(13, 8, 21, wscale=3e4)
    out, leaves = _check(hid, w, b, y, reduction="none", label_smoothing=0.1, chunk_size=4)
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_is_exact_zero_with_zero_grads(reduction):
    hid, w, b, y = _data(7, 4, 9, dtype=torch.float32, mask_every=1)
    leaves = [t.clone().requires_grad_() for t in (hid, w, b)]
    out = fastlora.linear_cross_entropy(leaves[0], leaves[1], y, bias=leaves[2], reduction=reduction, z_loss=1e-3)
    assert out.requires_grad and (out == 0).all()
    out.sum().backward()
    for t in leaves:
        assert t.grad is not None and (t.grad == 0).all() and torch.isfinite(t.grad).all()


def test_ignored_rows_get_no_matmul_work(monkeypatch):
    hid, w, b, y = _data(12, 4, 9)
    seen = []
    real = lce_mod.ce_rows

    def spy(backend, yy, labels, **kw):
        seen.append(labels.clone())
        return real(backend, yy, labels, **kw)

    monkeypatch.setattr(lce_mod, "ce_rows", spy)
    fastlora.linear_cross_entropy(hid, w, y, chunk_size=3)
    rows = torch.cat(seen)
    assert rows.numel() == int((y != -100).sum()) and (rows != -100).all()


def test_extras_accuracy_and_entropy():
    hid, w, b, y = _data(25, 6, 7, wscale=5.0)
    loss, ex = fastlora.linear_cross_entropy(hid, w, y, bias=b, return_extras=True, chunk_size=4, softcap=2.0)
    rloss, rex = ref(hid, w, y, bias=b, return_extras=True, softcap=2.0)
    assert_close(loss, rloss)
    assert_close(ex["accuracy"], rex["accuracy"].double())
    assert_close(ex["entropy"], rex["entropy"])
    assert 0 < ex["accuracy"] < 1
    assert not ex["entropy"].requires_grad


def test_chunk_size_does_not_change_result():
    hid, w, b, y = _data(40, 8, 33)
    outs = [fastlora.linear_cross_entropy(hid, w, y, bias=b, chunk_size=c, reduction="none") for c in (1, 7, 40, 1000)]
    for o in outs[1:]:
        assert_close(o, outs[0])


def test_nothing_of_size_n_by_v_is_saved():
    n, h, v = 64, 8, 512
    hid, w, b, y = _data(n, h, v, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (hid, w, b)]
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    for reduction in ("mean", "none"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fastlora.linear_cross_entropy(*leaves[:2], y, bias=leaves[2], reduction=reduction, chunk_size=16)
        out.sum().backward()
    assert sizes and max(sizes) <= max(v * h, n * h) < n * v


def test_out_of_range_labels_raise():
    hid, w, b, y = _data(6, 4, 9)
    y[4] = 9
    with pytest.raises(ValueError, match=r"value 9 .*\[0, 9\)"):
        fastlora.linear_cross_entropy(hid, w, y)


def test_mismatched_shapes_and_dtypes_raise():
    hid, w, b, y = _data(6, 4, 9)
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(5,\)"):
        fastlora.linear_cross_entropy(hid, w, y[:5])
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(9, 5\)"):
        fastlora.linear_cross_entropy(hid, torch.randn(9, 5, dtype=hid.dtype), y)
    with pytest.raises(ValueError, match="float32"):
        fastlora.linear_cross_entropy(hid.float(), w, y)
    with pytest.raises(ValueError, match=r"bias shape \(8,\)"):
        fastlora.linear_cross_entropy(hid, w, y, bias=b[:8])
    with pytest.raises(ValueError, match=r"V >= 1, got shape \(0, 4\)"):
        fastlora.linear_cross_entropy(hid, w[:0], torch.full_like(y, -100))
    with pytest.raises(ValueError, match="logit_scale must be finite, got nan"):
        fastlora.linear_cross_entropy(hid, w, y, logit_scale=float("nan"))


def test_opcheck_library_ops():
    hid, w, b, y = _data(9, 4, 11, dtype=torch.float32, mask_every=0)
    fwd = (hid, w, b, y, 0.5, 3.0, 1.0, 0.1, 1e-3, 4)
    torch.library.opcheck(lce_mod.linear_ce_forward, fwd + (True, True, True, True, True, "reference"))
    torch.library.opcheck(lce_mod.linear_ce_forward, (hid, w, None, y, 1.0, None, 1.0, 0.0, 0.0, 0) + (False,) * 5 + ("reference",))
    lse = torch.randn(9)
    g = torch.randn(9)
    torch.library.opcheck(lce_mod.linear_ce_backward, (hid, w, b, y, lse, None, g, None, 0.5, 3.0, 1.0, 0.1, 1e-3, 4, True, True, True, "reference"))


# --------------------------------------------------------------------------- Triton (interpreted on CPU)
@requires_triton
@pytest.mark.parametrize("opts", [
    dict(),
    dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=3.0, logit_scale=0.5),
    dict(num_items_in_batch=10, label_smoothing=0.1),
], ids=["plain", "none-all-options", "num-items"])
def test_triton_matches_reference(opts):
    hid, w, b, y = _data(11, 16, 200, dtype=torch.float32)
    _check(hid, w, b, y, backend=Backend.TRITON, chunk_size=4, **opts)


@requires_triton
def test_triton_extras():
    hid, w, b, y = _data(10, 8, 70, dtype=torch.float32, wscale=4.0)
    d = TRITON_DEVICE
    loss, ex = fastlora.linear_cross_entropy(hid.to(d), w.to(d), y.to(d), return_extras=True, backend="triton",
                                             chunk_size=3)
    rloss, rex = ref(hid, w, y, return_extras=True)
    assert_close(loss.cpu(), rloss)
    assert_close(ex["accuracy"].cpu(), rex["accuracy"].double())
    assert_close(ex["entropy"].cpu(), rex["entropy"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- GPU
@pytest.mark.cuda
def test_cuda_bf16_matches_reference():
    hid, w, b, y = _data(1031, 256, 50257, dtype=torch.bfloat16)
    _check(hid.cuda(), w.cuda(), b.cuda(), y.cuda(), rtol=5e-2, atol=5e-2, label_smoothing=0.1)


@pytest.mark.cuda
def test_cuda_llama3_size_peak_memory_under_fifth_of_eager():
    """Memory bound only (never timing): N=16384, H=4096, V=128256, bf16, frozen weight."""
    n, h, v = 16384, 4096, 128256
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(v, h, device=dev, dtype=torch.bfloat16, generator=g) * 0.02)
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[: n // 4] = -100

    def peak(fn):
        hid = torch.randn(n, h, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hid).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    eager = peak(lambda hid: torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hid, w).float(), y, ignore_index=-100))
    ours = peak(lambda hid: fastlora.linear_cross_entropy(hid, w, y))
    assert ours <= 0.2 * eager, (ours / 2**30, eager / 2**30)


def test_precomputed_grads_survive_retain_graph_and_scale():
    hid, w, b, y = _data(14, 6, 11)
    h1 = hid.clone().requires_grad_()
    loss = fastlora.linear_cross_entropy(h1, w, y, chunk_size=4)
    (loss * 3.0).backward(retain_graph=True)
    first = h1.grad.clone()
    loss.backward()
    h2 = hid.clone().requires_grad_()
    ref(h2, w, y).backward()
    assert_close(first, 3.0 * h2.grad)
    assert_close(h1.grad, 4.0 * h2.grad)


def test_no_grad_forward_computes_no_gradients(monkeypatch):
    hid, w, b, y = _data(10, 4, 9)
    calls = []
    real = lce_mod.chunk_loop
    monkeypatch.setattr(lce_mod, "chunk_loop", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        fastlora.linear_cross_entropy(hid.requires_grad_(), w.requires_grad_(), y)
    assert not any(calls[0][k] for k in ("need_gh", "need_gw", "need_gb"))


def test_torch_compile_aot_eager():
    hid, w, b, y = _data(12, 8, 30, dtype=torch.float32)
    h1 = hid.clone().requires_grad_()
    fn = lambda h: fastlora.linear_cross_entropy(h, w, y, bias=b, chunk_size=5, softcap=3.0)  # noqa: E731
    out = torch.compile(fn, backend="aot_eager")(h1)
    out.backward()
    h2 = hid.double().requires_grad_()
    exp = ref(h2, w.double(), y, bias=b.double(), softcap=3.0)
    exp.backward()
    assert_close(out, exp)
    assert_close(h1.grad, h2.grad, dtype=torch.float32)


@requires_triton
def test_triton_several_vocab_blocks_with_extras(monkeypatch):
    from fastlora.kernels import cross_entropy_triton as k

    monkeypatch.setattr(k, "MAX_BLOCK_V", 32)  # V=100: 3 full blocks + a partial one
    hid, w, b, y = _data(9, 8, 100, dtype=torch.float32, wscale=6.0)
    _check(hid, w, b, y, backend=Backend.TRITON, chunk_size=4, reduction="none", z_loss=1e-3, softcap=5.0)
    loss, ex = fastlora.linear_cross_entropy(hid, w, y, bias=b, return_extras=True, backend="triton", chunk_size=4)
    _, rex = ref(hid, w, y, bias=b, return_extras=True)
    assert_close(ex["accuracy"], rex["accuracy"].double())
    assert_close(ex["entropy"], rex["entropy"], rtol=1e-5, atol=1e-5)


def test_autocast_casts_like_f_linear():
    hid, w, b, y = _data(10, 8, 20, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (hid, w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastlora.linear_cross_entropy(leaves[0], leaves[1], y, chunk_size=4)
        exp = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hid, w).float(), y)
    out.backward()
    assert leaves[0].grad.dtype == torch.float32 and leaves[1].grad.dtype == torch.float32
    assert_close(out, exp.float(), rtol=1e-4, atol=1e-4)  # the same bf16 logits as eager
    h2, w2 = hid.double().requires_grad_(), w.double().requires_grad_()
    ref(h2, w2, y).backward()
    assert_close(leaves[0].grad, h2.grad, rtol=5e-3, atol=5e-3)
    assert_close(leaves[1].grad, w2.grad, rtol=5e-3, atol=5e-3)


def test_bf16_error_no_worse_than_eager_hf_path():
    """Against float64, our bf16 loss and gradients are as accurate as the eager
    F.linear + F.cross_entropy(logits.float()) path they replace."""
    hid, w, b, y = _data(160, 64, 2048, dtype=torch.bfloat16, mask_every=4, wscale=3.0)
    hd, wd = hid.double().requires_grad_(), w.double().requires_grad_()
    r = ref(hd, wd, y)
    r.backward()

    def run(fn):
        h1, w1 = hid.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(h1, w1)
        loss.backward()
        return [(loss.double() - r).abs().item()] + [
            ((a.grad.double() - e.grad).norm() / e.grad.norm()).item() for a, e in ((h1, hd), (w1, wd))
        ]

    ours = run(lambda h1, w1: fastlora.linear_cross_entropy(h1, w1, y, chunk_size=48))
    eager = run(lambda h1, w1: torch.nn.functional.cross_entropy(torch.nn.functional.linear(h1, w1).float(), y))
    for name, o, e in zip(("loss", "grad hidden", "grad weight"), ours, eager):
        assert o <= 1.5 * e + 1e-6, (name, o, e)
