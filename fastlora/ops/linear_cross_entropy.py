"""Cross-entropy of ``hidden @ weight.T (+ bias)`` without ever holding the (N, V) logits.

logits = softcap(logit_scale * (hidden @ weight.T + bias)); the loss semantics are those
of :func:`fastlora.cross_entropy` (see ``fastlora/ops/cross_entropy.py``). The caller
shifts labels; nothing is shifted here.

How (both backends):

1. Rows whose label is ``ignore_index`` are dropped up front (one gather), so no matmul
   or softmax work is ever spent on them and they get exactly zero gradient.
2. The valid rows are processed in chunks of ``chunk_size`` rows: logits chunk = one
   GEMM, then a row kernel computes loss and lse and overwrites the chunk with
   dLoss/dlogits in place, then grad_hidden[chunk] = dlogits @ W and
   grad_W += dlogits.T @ hidden[chunk] (fp32 accumulator), grad_b += dlogits.sum(0).
   Peak extra memory is one (chunk, V) buffer plus the fp32 accumulators, whatever N is.
3. When the loss is reduced to a scalar (``"mean"``, ``"sum"``, ``num_items_in_batch``)
   and a gradient is needed, the gradients are computed during the forward (3 GEMMs in
   all) and backward only multiplies them by the upstream scalar (the Liger scheme).
   With ``reduction="none"`` the upstream gradient differs per row and is only known in
   backward, so the forward saves (N,) lse and backward recomputes each chunk's logits
   (4 GEMMs; 3 instead of 2 with a frozen weight). Precomputing saves that re-run. Measured
   on this project's 2-core CPU (SmolLM2 head: H=576, V=49152, N=2048 with 1/4 of the
   rows masked, frozen weight, fwd+bwd, min of 3, heavily shared machine so +-20%):
   fp32 precompute 0.70x eager time vs recompute 1.17x; bf16 1.1x vs 1.4x. Peak
   RSS at N=8192: 389 MB vs 4534 MB for eager (0.09x); token_logprobs 392 MB vs
   4536 MB for log_softmax(logits).gather (0.09x).

On CUDA the chunk loop runs with the Triton row kernel
(``fastlora/kernels/linear_cross_entropy_triton.py``); on CPU with the torch one.
"""
from __future__ import annotations

import math

import torch

from ..backend import Backend, select
from .cross_entropy import (
    _compute_dtype,
    ce_rows,
    check_labels,
    check_options,
    reduce_rows,
)

__all__ = ["linear_cross_entropy"]


# --------------------------------------------------------------------------- reference
def _reference(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
    num_items_in_batch=None,
    return_extras=False,
):
    """The spec on full logits, plain torch (tests run it in float64)."""
    from .cross_entropy import _reference as ce_ref

    logits = torch.nn.functional.linear(hidden, weight, bias) * logit_scale
    loss = ce_ref(
        logits, labels, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        num_items_in_batch=num_items_in_batch,
    )
    if not return_extras:
        return loss
    x = logits.reshape(-1, logits.shape[-1]).detach()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    t = labels.reshape(-1)
    valid = t != ignore_index
    n = valid.sum().clamp(min=1)
    logp = torch.log_softmax(x, -1)
    ent = -(logp.exp() * logp).sum(-1)
    acc = ((x.argmax(-1) == t) & valid).sum() / n
    return loss, {"accuracy": acc, "entropy": (ent * valid).sum() / n}


# --------------------------------------------------------------------------- chunk loop
# Labels reach the chunk loop compacted to the valid rows (linear_cross_entropy) or as
# tokens checked to lie in [0, V) (token_logprobs): none equals this.
_NO_IGNORE = -100


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    if device.type == "cuda":
        from ..kernels.linear_cross_entropy_triton import default_chunk_rows as cuda_rows

        return cuda_rows(vocab)
    # CPU: ~32M elements per chunk buffer (128 MB in fp32). Each chunk re-reads and
    # re-writes the whole fp32 (V, H) weight-gradient accumulator, so small chunks turn
    # that GEMM memory-bound: 512-row chunks measured ~1.5x faster than 170-row ones
    # at V=49152, H=576 on this project's CPU.
    return max(16, (1 << 25) // max(vocab, 1))


def _acc_mm_(acc, a, b):
    """acc += a @ b with acc in fp32/fp64 and a, b possibly low precision."""
    if a.device.type == "cuda":
        from ..kernels.linear_cross_entropy_triton import acc_mm_

        return acc_mm_(acc, a, b)
    if a.dtype != acc.dtype:
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    acc.addmm_(a, b)


def chunk_loop(
    hidden,
    weight,
    bias,
    labels,
    *,
    scale,
    softcap,
    inv_temp,
    label_smoothing,
    z_loss,
    chunk_size,
    backend,
    need_gh=False,
    need_gw=False,
    need_gb=False,
    lse=None,
    ent=None,
    g_loss=None,
    g_ent=None,
    want_entropy=False,
    want_argmax=False,
):
    """Run the row kernel over chunks of rows of hidden (n, H); see the module docstring.

    Forward: lse None; with any need_* set, g_loss defaults to ones (gradients of the sum).
    Backward: lse (and ent for g_ent) given, g_loss/g_ent the upstream row gradients.
    Returns (loss, lse, entropy, argmax, gh, gw, gb); missing ones are None. gw/gb are
    fp32 (fp64 for fp64 inputs) accumulators, gh has hidden's dtype.
    """
    n, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cdt = _compute_dtype(hidden.dtype)
    grads = need_gh or need_gw or need_gb
    if grads and g_loss is None:
        g_loss = torch.ones(n, dtype=cdt, device=dev)
    step = chunk_size or default_chunk_rows(V, dev)
    loss = torch.empty(n, dtype=cdt, device=dev)
    lse_out = torch.empty(n, dtype=cdt, device=dev) if lse is None else lse
    entropy = torch.empty(n, dtype=cdt, device=dev) if want_entropy else None
    argmax = torch.empty(n, dtype=torch.int64, device=dev) if want_argmax else None
    gh = torch.empty_like(hidden) if need_gh else None
    gw = torch.zeros(V, H, dtype=cdt, device=dev) if need_gw else None
    gb = torch.zeros(V, dtype=cdt, device=dev) if need_gb else None
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e]
        y = torch.nn.functional.linear(h, weight, bias)  # (c, V), overwritten by dL/dy
        sl = slice(s, e)
        out = ce_rows(
            backend, y, labels[sl], ignore_index=_NO_IGNORE,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            scale=scale, inv_temp=inv_temp,
            lse=None if lse is None else lse[sl],
            g_loss=None if g_loss is None else g_loss[sl],
            g_ent=None if g_ent is None else g_ent[sl],
            ent=None if ent is None else ent[sl],
            grad_out=y if grads else None,
            want_entropy=want_entropy, want_argmax=want_argmax, scratch=True,
        )
        if lse is None:  # forward (backward kernels may not return the loss)
            loss[sl] = out[0]
            lse_out[sl] = out[1]
        if want_entropy:
            entropy[sl] = out[2]
        if want_argmax:
            argmax[sl] = out[3]
        if need_gh:
            torch.mm(y, weight, out=gh[sl])
        if need_gw:
            _acc_mm_(gw, y.t(), h)
        if need_gb:
            gb.add_(y.sum(0, dtype=cdt))
    return loss, lse_out, entropy, argmax, gh, gw, gb


def _empty(ref):
    return ref.new_empty(0)


def _opt(t, ref):
    return _empty(ref) if t is None else t


# --------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("fastlora::linear_ce_forward", mutates_args=())
def linear_ce_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scale: float,
    softcap: float | None,
    inv_temp: float,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
    need_gh: bool,
    need_gw: bool,
    need_gb: bool,
    want_entropy: bool,
    want_argmax: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss, lse, entropy, argmax of the valid rows hidden (n, H) and, when
    asked, the gradients of the loss sum: (gh (n, H), gw (V, H) fp32, gb (V,) fp32).
    Outputs not asked for are empty tensors."""
    loss, lse, ent, am, gh, gw, gb = chunk_loop(
        hidden, weight, bias, labels, scale=scale, softcap=softcap, inv_temp=inv_temp,
        label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size or None,
        backend=Backend(backend), need_gh=need_gh, need_gw=need_gw, need_gb=need_gb,
        want_entropy=want_entropy, want_argmax=want_argmax,
    )
    e = _empty(loss)
    return (loss, lse, _opt(ent, loss), am if am is not None else labels.new_empty(0, dtype=torch.int64),
            _opt(gh, hidden), _opt(gw, e), _opt(gb, e))


@linear_ce_forward.register_fake
def _(hidden, weight, bias, labels, scale, softcap, inv_temp, label_smoothing, z_loss,
      chunk_size, need_gh, need_gw, need_gb, want_entropy, want_argmax, backend):
    n, H = hidden.shape
    V = weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    f = lambda *s: hidden.new_empty(s, dtype=cdt)  # noqa: E731
    return (
        f(n), f(n), f(n if want_entropy else 0),
        hidden.new_empty(n if want_argmax else 0, dtype=torch.int64),
        hidden.new_empty((n, H) if need_gh else (0,)),
        f(V, H) if need_gw else f(0), f(V) if need_gb else f(0),
    )


@torch.library.custom_op("fastlora::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor | None,
    g_loss: torch.Tensor,
    g_ent: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    inv_temp: float,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
    need_gh: bool,
    need_gw: bool,
    need_gb: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (gh (n, H), gw (V, H) fp32, gb (V,) fp32) for per-row upstream
    gradients g_loss (and g_ent for the entropy output), recomputing each chunk."""
    _, _, _, _, gh, gw, gb = chunk_loop(
        hidden, weight, bias, labels, scale=scale, softcap=softcap, inv_temp=inv_temp,
        label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size or None,
        backend=Backend(backend), need_gh=need_gh, need_gw=need_gw, need_gb=need_gb,
        lse=lse, ent=ent, g_loss=g_loss, g_ent=g_ent,
    )
    e = _empty(lse)
    return _opt(gh, hidden), _opt(gw, e), _opt(gb, e)


@linear_ce_backward.register_fake
def _(hidden, weight, bias, labels, lse, ent, g_loss, g_ent, scale, softcap, inv_temp,
      label_smoothing, z_loss, chunk_size, need_gh, need_gw, need_gb, backend):
    n, H = hidden.shape
    V = weight.shape[0]
    f = lambda *s: lse.new_empty(s)  # noqa: E731
    return (hidden.new_empty((n, H) if need_gh else (0,)),
            f(V, H) if need_gw else f(0), f(V) if need_gb else f(0))


# --------------------------------------------------------------------------- autograd
def _cast_grads(ctx, gh, gw, gb, weight_dtype, bias_dtype, scale=None):
    """Scale (by the upstream scalar, when precomputed) and cast to the inputs' dtypes."""
    out = []
    for need, g, dt in zip(ctx.needs_input_grad[:3], (gh, gw, gb), (None, weight_dtype, bias_dtype)):
        if not need:
            out.append(None)
            continue
        if scale is not None:
            g = g * scale  # 0-dim upstream gradient: keeps g's dtype
        out.append(g if dt is None else g.to(dt))
    return out


class LinearCrossEntropyFunction(torch.autograd.Function):
    """hidden (n, H) of valid rows only, weight (V, H), bias (V,) or None, labels (n,).
    Returns (loss, entropy rows, argmax rows): loss is the sum over rows when
    ``reduce_sum`` (gradients then computed in forward), else per-row (n,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts, reduce_sum, want_extras, chunk_size, backend, grad_enabled):
        scale, softcap, label_smoothing, z_loss = opts
        # needs_input_grad only reflects requires_grad; under no_grad nothing is needed
        need_gh, need_gw, need_gb = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        ctx.precomputed = reduce_sum and (need_gh or need_gw or need_gb)
        p = ctx.precomputed
        loss, lse, ent, am, gh, gw, gb = linear_ce_forward(
            hidden, weight, bias, labels, scale, softcap, 1.0, label_smoothing, z_loss,
            chunk_size, p and need_gh, p and need_gw, p and need_gb,
            want_extras, want_extras, backend.value,
        )
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if ctx.precomputed:
            ctx.save_for_backward(gh, gw, gb)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
            ctx.opts = (scale, softcap, 1.0, label_smoothing, z_loss, chunk_size, backend.value)
        ctx.mark_non_differentiable(ent, am)
        return (loss.sum() if reduce_sum else loss), ent, am

    @staticmethod
    def backward(ctx, g, _g_ent, _g_am):
        if ctx.precomputed:
            gh, gw, gb = ctx.saved_tensors
            grads = _cast_grads(ctx, gh, gw, gb, *ctx.dtypes, scale=g)
        else:
            hidden, weight, bias, labels, lse = ctx.saved_tensors
            g_rows = g.expand(labels.shape[0]) if g.dim() == 0 else g
            need_gh, need_gw, need_gb = ctx.needs_input_grad[:3]
            scale, softcap, inv_temp, eps, zl, chunk, be = ctx.opts
            gh, gw, gb = linear_ce_backward(
                hidden, weight, bias, labels, lse, None, g_rows.contiguous(), None,
                scale, softcap, inv_temp, eps, zl, chunk, need_gh, need_gw, need_gb, be,
            )
            grads = _cast_grads(ctx, gh, gw, gb, *ctx.dtypes)
        return (*grads, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------- functional
def autocast_inputs(hidden, weight, bias):
    """Under autocast, cast like F.linear would (Trainer(bf16=True) runs the lm_head in
    autocast with fp32 weights); the casts are differentiable, so fp32 leaves get fp32
    gradients as in eager."""
    if not torch.is_tensor(hidden):
        return hidden, weight, bias  # the checks that follow name the problem
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t.to(dt) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def check_linear_inputs(hidden, weight, labels, bias, what="labels"):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if not torch.is_tensor(labels):
        raise TypeError(f"{what} must be an integer tensor, got {type(labels).__name__}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with V >= 1, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden shape {tuple(hidden.shape)} does not match weight shape "
            f"{tuple(weight.shape)}: hidden's last dim must be weight.shape[1]"
        )
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"hidden shape {tuple(hidden.shape)} must be {what} shape {tuple(labels.shape)} + (H,)"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be ({weight.shape[0]},) for weight {tuple(weight.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} != weight dtype {weight.dtype}")
    devs = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devs) > 1:
        raise ValueError(f"hidden, weight, {what} and bias must share one device, got {sorted(map(str, devs))}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items_in_batch=None,
    return_extras: bool = False,
    chunk_size: int | None = None,
    backend=None,
):
    """Cross-entropy of softcap(logit_scale * (hidden @ weight.T + bias)) without the logits.

    hidden: (..., H); weight: (V, H) (same dtype); labels: (...) integer, already
    shifted by the caller; bias: (V,) or None. Returns the loss (float32, float64 for
    float64 inputs): a scalar, or labels.shape for ``reduction="none"`` (0 at ignored
    positions). ``return_extras=True`` returns ``(loss, {"accuracy", "entropy"})``:
    token accuracy and mean entropy of softmax(logits) over valid tokens (no grad).
    ``chunk_size``: rows per chunk (default: by vocab size and device).
    Gradients flow to hidden, weight and bias when they require grad.
    """
    check_options(reduction, label_smoothing, z_loss, softcap, num_items_in_batch)
    if not math.isfinite(float(logit_scale)):
        raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_linear_inputs(hidden, weight, labels, bias)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    V, H = weight.shape
    check_labels(labels, V, ignore_index)
    be = select("linear_cross_entropy", hidden.device, [Backend.TRITON], backend)

    h = hidden.reshape(-1, H)
    t = labels.reshape(-1)
    valid = t != ignore_index
    idx = valid.nonzero().squeeze(1)
    n_valid = idx.numel()
    if n_valid != t.numel():
        h = h.index_select(0, idx)  # (n_valid, H): ignored rows never reach a matmul
        t = t.index_select(0, idx)
    h = h.contiguous()
    reduce_sum = reduction != "none" or num_items_in_batch is not None
    loss, ent, am = LinearCrossEntropyFunction.apply(
        h, weight.contiguous(), None if bias is None else bias.contiguous(), t.long(),
        (float(logit_scale), None if softcap is None else float(softcap), float(label_smoothing), float(z_loss)),
        reduce_sum, bool(return_extras), int(chunk_size or 0), be, torch.is_grad_enabled(),
    )

    def full_rows(per_valid):
        if n_valid == labels.numel():
            return per_valid
        out = per_valid.new_zeros(labels.numel())
        return out.index_put((idx,), per_valid)

    if reduce_sum:
        if num_items_in_batch is not None:
            out = loss / num_items_in_batch
        elif reduction == "mean":
            out = loss / max(n_valid, 1)
        else:
            out = loss
    else:
        out = reduce_rows(loss, labels.shape, n_valid, "none", None, full_rows)
    if not return_extras:
        return out
    with torch.no_grad():
        d = max(n_valid, 1)
        extras = {
            "accuracy": (am == t).sum().to(ent.dtype) / d,
            "entropy": ent.sum() / d,
        }
    return out, extras
