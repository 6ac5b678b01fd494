"""fastlora.cross_entropy against the float64 reference: forward and gradient, every
option, masks, odd vocab sizes, large logits, bad input, torch.library ops, Triton."""
import itertools

import pytest
import torch

import fastlora
from fastlora.backend import Backend
from fastlora.ops import cross_entropy as ce_mod
from tests.helpers import TRITON_DEVICE, assert_close, requires_triton

ref = ce_mod._reference

# Low-precision logits: the math runs in fp32 on exact inputs and the gradient is
# rounded once to the storage dtype, so one ulp relative (2**-10 fp16, 2**-7 bf16)
# bounds the error with a 2x margin.
ONE_ULP = {torch.float32: {}, torch.float16: dict(rtol=1e-3, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-6)}


def _data(n, v, dtype=torch.float64, mag=3.0, mask_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * mag).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    if mask_every:
        y[::mask_every] = -100
    return x, y


def _check(x, y, *, rtol=None, atol=None, backend=None, upstream_seed=1, **opts):
    """Forward and gradient of fastlora vs the float64 reference, with a random
    upstream gradient for reduction='none' so every row's gradient is checked."""
    dev = TRITON_DEVICE if Backend.parse(backend) is Backend.TRITON else x.device
    x1 = x.detach().clone().to(dev).requires_grad_()
    x2 = x.detach().double().requires_grad_()
    out = fastlora.cross_entropy(x1, y.to(dev), backend=backend, **opts)
    exp = ref(x2, y, **opts)
    if out.dim():
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
        (out * w.to(out.device, out.dtype)).sum().backward()
        (exp * w).sum().backward()
    else:
        out.backward()
        exp.backward()
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert_close(out.cpu(), exp, dtype=x.dtype, rtol=rtol, atol=atol, msg="loss")
    assert x1.grad.dtype == x.dtype
    assert_close(x1.grad.cpu(), x2.grad, dtype=x.dtype, rtol=rtol, atol=atol, msg="grad logits")
    return out.cpu(), x1.grad.cpu()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_reference_is_torch_cross_entropy(reduction, label_smoothing, ignore_index):
    # Every other test trusts ``_reference``: pin it to an oracle it shares no code with.
    x, y = _data(29, 37, mask_every=3 if ignore_index == -100 else 0)
    y[1::4] = 5
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)
    exp = torch.nn.functional.cross_entropy(x, y, **opts)
    assert_close(ref(x, y, **opts), exp)
    # softcap and z-loss, which torch lacks, written out from their definitions
    cap, z = 4.0, 1e-3
    xc = cap * torch.tanh(x / cap)
    lse = torch.logsumexp(xc, -1)
    per = torch.nn.functional.cross_entropy(xc, y, reduction="none", label_smoothing=label_smoothing,
                                            ignore_index=ignore_index)
    per = per + torch.where(y != ignore_index, z * lse**2, 0.0)
    got = ref(x, y, softcap=cap, z_loss=z, reduction="none", label_smoothing=label_smoothing,
              ignore_index=ignore_index)
    assert_close(got, per)
    assert_close(ref(x, y, softcap=cap, z_loss=z, num_items_in_batch=7, ignore_index=ignore_index,
                     label_smoothing=label_smoothing), per.sum() / 7)


OPTIONS = [
    dict(reduction=r, label_smoothing=ls, z_loss=z, softcap=sc)
    for r, ls, z, sc in itertools.product(("mean", "sum", "none"), (0.0, 0.1), (0.0, 1e-3), (None, 4.0))
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_all_options_float64(opts):
    x, y = _data(29, 37)
    _check(x, y, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_items", [5, torch.tensor(11.0)])
def test_num_items_in_batch_overrides_reduction(reduction, num_items):
    x, y = _data(23, 19)
    out, _ = _check(x, y, reduction=reduction, num_items_in_batch=num_items, label_smoothing=0.1)
    per = ref(x, y, reduction="none", label_smoothing=0.1)
    assert_close(out, per.sum() / num_items, msg="sum / num_items")
    assert out.dim() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_vs_float64(dtype):
    x, y = _data(33, 41, dtype=dtype)
    _check(x, y, label_smoothing=0.05, z_loss=1e-4, softcap=10.0, **ONE_ULP[dtype])


def test_batched_shape_and_none_zeros_at_ignored():
    x, y = _data(2 * 7, 13)
    x3, y3 = x.reshape(2, 7, 13), y.reshape(2, 7)
    out = fastlora.cross_entropy(x3, y3, reduction="none")
    assert out.shape == (2, 7)
    assert (out[y3 == -100] == 0).all()
    _check(x3, y3, reduction="none")


def test_vocab_50257_float32():
    x, y = _data(4, 50257, dtype=torch.float32, mask_every=0)
    _check(x, y, label_smoothing=0.1, z_loss=1e-4)


def test_many_rows_cross_row_chunks():
    # more rows than one chunk of the torch row kernel: partial last chunk
    v = 1000
    n = ce_mod._rows_per_chunk(v) * 2 + 17
    x, y = _data(n, v, dtype=torch.float32)
    _check(x, y, reduction="none", softcap=5.0)


def test_logits_of_magnitude_1e4():
    x, y = _data(17, 31, mag=1e4)
    out, g = _check(x, y, label_smoothing=0.1, z_loss=1e-6, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    x32 = x.float()
    out32, g32 = _check(x32, y, rtol=1e-5, atol=1e-4)  # lse ~1e4: fp32 spacing there is ~1e-3
    assert torch.isfinite(g32).all()


def test_custom_ignore_index():
    x, y = _data(19, 23, mask_every=0)
    y[::4] = 5
    _check(x, y, ignore_index=5, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_masked_is_exact_zero_and_connected(reduction, dtype):
    x = torch.randn(6, 11, dtype=dtype, requires_grad=True)
    y = torch.full((6,), -100)
    out = fastlora.cross_entropy(x, y, reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
    assert out.requires_grad
    assert (out == 0).all()
    out.sum().backward()
    assert x.grad is not None and (x.grad == 0).all()


def test_inplace_backward_matches_and_reuses_buffer():
    x, y = _data(21, 17, dtype=torch.float32)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf buffer nobody else reads, as lm_head's output
    ptr = logits.data_ptr()
    captured = {}

    def hook(g):
        captured["ptr"] = g.data_ptr()

    logits.register_hook(hook)
    fastlora.cross_entropy(logits, y, inplace_backward=True, label_smoothing=0.1).backward()
    x2 = x.double().requires_grad_()
    ref(x2, y, label_smoothing=0.1).backward()
    assert_close(leaf.grad, x2.grad, dtype=torch.float32, msg="inplace grad")
    assert captured["ptr"] == ptr, "gradient was not written into the logits buffer"


def test_out_of_range_labels_raise():
    x, y = _data(5, 10)
    y[2] = 10
    with pytest.raises(ValueError, match=r"value 10 .*\[0, 10\)"):
        fastlora.cross_entropy(x, y)
    y[2] = -7
    with pytest.raises(ValueError, match="-7"):
        fastlora.cross_entropy(x, y)


def test_mismatched_shapes_and_dtypes_raise():
    x, y = _data(5, 10)
    with pytest.raises(ValueError, match=r"\(5, 10\).*\(4,\)"):
        fastlora.cross_entropy(x, y[:4])
    with pytest.raises(TypeError, match="integer"):
        fastlora.cross_entropy(x, y.float())
    with pytest.raises(TypeError, match="labels must be an integer tensor, got list"):
        fastlora.cross_entropy(x, y.tolist())
    with pytest.raises(TypeError, match="floating"):
        fastlora.cross_entropy(y, y)
    with pytest.raises(ValueError, match="reduction"):
        fastlora.cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"\(5, 0\).*V >= 1"):
        fastlora.cross_entropy(x[:, :0], y)
    # a non-finite option would turn every loss into NaN: refused up front
    with pytest.raises(ValueError, match="softcap must be a finite number > 0 or None, got inf"):
        fastlora.cross_entropy(x, y, softcap=float("inf"))
    with pytest.raises(ValueError, match="z_loss must be a finite number >= 0, got nan"):
        fastlora.cross_entropy(x, y, z_loss=float("nan"))


def test_opcheck_library_ops():
    x, y = _data(7, 13, dtype=torch.float32)
    lse = torch.logsumexp(x, -1)
    g = torch.randn(7)
    args = (y, -100, 0.1, 1e-3, 3.0, "reference")
    torch.library.opcheck(ce_mod.ce_forward, (x, *args))
    torch.library.opcheck(ce_mod.ce_backward, (x, y, lse, g, *args[1:]))
    torch.library.opcheck(ce_mod.ce_backward_, (x.clone(), y, lse, g, *args[1:]))


# --------------------------------------------------------------------------- Triton (interpreted on CPU)
@requires_triton
@pytest.mark.parametrize("opts", [
    dict(),
    dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
    dict(reduction="sum", num_items_in_batch=9, label_smoothing=0.2),
], ids=["plain", "all-options", "num-items"])
def test_triton_matches_reference(opts):
    x, y = _data(9, 300, dtype=torch.float32)  # 300: not a multiple of the vocab block
    _check(x, y, backend=Backend.TRITON, **opts)


@requires_triton
def test_triton_large_logits_and_all_masked():
    x, y = _data(5, 130, dtype=torch.float32, mag=1e4)
    _check(x, y, backend=Backend.TRITON, rtol=1e-5, atol=1e-4, reduction="none")
    x = torch.randn(4, 70, device=TRITON_DEVICE, requires_grad=True)
    out = fastlora.cross_entropy(x, torch.full((4,), -100, device=TRITON_DEVICE), backend="triton")
    out.backward()
    assert out.item() == 0 and (x.grad == 0).all()


@requires_triton
def test_triton_inplace_backward():
    x, y = _data(6, 77, dtype=torch.float32)
    leaf = x.clone().to(TRITON_DEVICE).requires_grad_()
    fastlora.cross_entropy(leaf * 1.0, y.to(TRITON_DEVICE), inplace_backward=True, backend="triton", z_loss=1e-3).backward()
    x2 = x.double().requires_grad_()
    ref(x2, y, z_loss=1e-3).backward()
    assert_close(leaf.grad.cpu(), x2.grad, dtype=torch.float32)


# --------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    x, y = _data(257, 50257, dtype=dtype)
    _check(x.cuda(), y.cuda(), label_smoothing=0.1, z_loss=1e-4, softcap=30.0)


def test_inplace_backward_refuses_leaf_and_second_backward():
    x, y = _data(5, 9, dtype=torch.float32)
    leaf = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="leaf"):
        fastlora.cross_entropy(leaf, y, inplace_backward=True)
    loss = fastlora.cross_entropy(leaf * 2.0, y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_non_contiguous_shifted_logits():
    # the Hugging Face pattern: logits[:, :-1] against labels[:, 1:]
    x, y = _data(3 * 8, 21, dtype=torch.float32, mask_every=5)
    x3, y3 = x.reshape(3, 8, 21), y.reshape(3, 8)
    _check(x3[:, :-1], y3[:, 1:], label_smoothing=0.1)


def test_torch_compile_aot_eager():
    x, y = _data(10, 17, dtype=torch.float32)
    x = x.requires_grad_()
    fn = lambda a: fastlora.cross_entropy(a * 1.0, y, z_loss=1e-3)  # noqa: E731
    out = torch.compile(fn, backend="aot_eager")(x)
    (g,) = torch.autograd.grad(out, x)
    x2 = x.detach().double().requires_grad_()
    exp = ref(x2, y, z_loss=1e-3)
    exp.backward()
    assert_close(out, exp)
    assert_close(g, x2.grad, dtype=torch.float32)


@requires_triton
def test_triton_several_vocab_blocks(monkeypatch):
    from fastlora.kernels import cross_entropy_triton as k

    monkeypatch.setattr(k, "MAX_BLOCK_V", 64)  # V=300: 4 full blocks + a partial one
    x, y = _data(7, 300, dtype=torch.float32, mag=20.0)
    _check(x, y, backend=Backend.TRITON, reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=15.0)


@requires_triton
def test_triton_vocab_50257():
    x, y = _data(3, 50257, dtype=torch.float32, mask_every=0)
    _check(x, y, backend=Backend.TRITON, label_smoothing=0.1)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_storage(dtype):
    x, y = _data(6, 129, dtype=dtype)
    _check(x, y, backend=Backend.TRITON, softcap=5.0, **ONE_ULP[dtype])


@requires_triton
def test_triton_launcher_refuses_bad_layouts():
    # the launcher's own checks (not asserts: they must survive python -O)
    from fastlora.kernels.cross_entropy_triton import ce_rows

    x, y = _data(4, 10, dtype=torch.float32, mask_every=0)
    x, y = x.to(TRITON_DEVICE), y.to(TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"strides \(1, 4\)"):
        ce_rows(x.t().contiguous().t(), y)
    with pytest.raises(ValueError, match=r"labels \(3,\)"):
        ce_rows(x, y[:3])
    with pytest.raises(ValueError, match=r"grad_out of shape \(4, 10\)"):
        ce_rows(x, y, g_loss=torch.ones(4))
