"""Masked cross-entropy on given logits, with the gradient written in place when safe.

Contract (exact, and shared with ``linear_cross_entropy`` and ``token_logprobs``):

- ``softcap`` first replaces the logits by ``softcap * tanh(logits / softcap)``.
- Per valid token (label != ignore_index) the loss is ``lse - x[label]``; with label
  smoothing eps it is ``(1 - eps) * (lse - x[label]) + eps * (lse - mean(x))``, as
  ``torch.nn.functional.cross_entropy`` computes it; ``z_loss * lse**2`` is added.
- ``reduction="mean"`` divides the sum by the number of valid tokens (0 when none),
  ``"sum"`` sums, ``"none"`` gives per-token values (0 at ignored positions).
  ``num_items_in_batch`` given: sum / num_items_in_batch whatever the reduction (the
  Hugging Face gradient-accumulation convention).
- An all-ignored batch gives exactly 0, zero gradients, still connected to the graph.
- Losses are computed in float32 (float64 for float64 logits) and returned in that
  dtype; gradients come back in the logits' dtype.

Gradient (x = softcapped logits, p = softmax(x), y = the raw logits, g = upstream
gradient of the row's loss)::

    dL/dx_j = g * ( p_j * (1 + 2 z lse) - eps / V - (1 - eps) * [j == label] )
    dL/dy_j = dL/dx_j * (1 - (x_j / softcap)**2)        (1 when there is no softcap)

The row kernel (:func:`ce_rows_torch` here, ``ce_rows`` in
``fastlora/kernels/cross_entropy_triton.py``) also serves the chunked linear
cross-entropy and token log-probs: it takes a ``scale`` applied to y before the
softcap and an ``inv_temp`` applied after it, and can return entropy and argmax.

Layout of this file (as flash-attention's cross_entropy.py): reference, row kernels
and their dispatch, ``torch.library`` ops, ``autograd.Function``, functional.
"""
from __future__ import annotations

import math

import torch

from ..backend import Backend, select

__all__ = ["cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- reference
def _reference(
    logits,
    labels,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    num_items_in_batch=None,
):
    """The spec in plain torch on full logits (any float dtype; tests use float64)."""
    x = logits.reshape(-1, logits.shape[-1])
    t = labels.reshape(-1)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(1, safe[:, None]).squeeze(1)
    per = (1 - label_smoothing) * nll + label_smoothing * (lse - x.mean(-1))
    per = per + z_loss * lse * lse
    per = torch.where(valid, per, torch.zeros_like(per))
    if num_items_in_batch is not None:
        return per.sum() / num_items_in_batch
    if reduction == "none":
        return per.reshape(labels.shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------- checks
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_positive(name: str, value, *, allow_none: bool = False) -> None:
    """A finite number > 0 (or None when allowed): inf or NaN here would make every loss NaN."""
    if value is None and allow_none:
        return
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0{' or None' if allow_none else ''}, got {value!r}")


def check_options(reduction, label_smoothing, z_loss, softcap, num_items_in_batch=None):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(float(z_loss)) and float(z_loss) >= 0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    check_positive("softcap", softcap, allow_none=True)
    if num_items_in_batch is not None and not torch.is_tensor(num_items_in_batch):
        if not float(num_items_in_batch) > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int | None, what="labels"):
    """Raise a ValueError naming the first label outside [0, vocab) that is not
    ignore_index. One reduction and one host sync, before any kernel runs, so a bad
    label can never become a device-side assert or a silent wrong loss."""
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{what} must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= vocab)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(labels.reshape(-1)[pos])
        extra = f" and not ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"{what}: value {value} at flat position {pos} is outside [0, {vocab}) "
            f"(vocab size V={vocab}){extra}"
        )


def reduce_rows(per_row, labels_shape, n_valid, reduction, num_items_in_batch, full_rows=None):
    """Apply the reduction to per-row losses (float). ``full_rows`` maps a compacted
    per-valid-row vector back to all rows for ``"none"``."""
    if num_items_in_batch is not None:
        return per_row.sum() / num_items_in_batch
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(n_valid, 1)
    if full_rows is not None:
        per_row = full_rows(per_row)
    return per_row.reshape(labels_shape)


# --------------------------------------------------------------------------- row kernels
def ce_rows_torch(
    y,
    labels,
    *,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    scale=1.0,
    inv_temp=1.0,
    lse=None,
    g_loss=None,
    g_ent=None,
    ent=None,
    grad_out=None,
    want_entropy=False,
    want_argmax=False,
    scratch=False,
):
    """Cross-entropy of a block of rows, the pure-torch row kernel.

    y: (c, V) raw logits (any float dtype), labels: (c,) int. x = softcap(scale*y)*inv_temp.
    Forward (``lse`` None): returns (loss (c,), lse (c,), entropy (c,) or None, argmax
    (c,) or None) in the compute dtype. Backward (``lse`` given, and ``ent`` when
    ``g_ent`` is): the loss is not recomputed and comes back as None.
    With ``g_loss`` (c,) given, writes dLoss/dy (each row's loss weighted by g_loss,
    plus g_ent times the entropy gradient when given) into ``grad_out`` (c, V), which
    may be ``y`` itself. ``scratch=True`` lets the kernel overwrite y (a buffer the
    caller owns, such as a logits chunk), saving a (c, V) copy.

    Written to touch each (c, V) element as few times as possible, since on CPU these
    passes cost as much as the GEMM in bf16: one fused ``log_softmax`` (which also
    upcasts), ``exp_`` in place, then one fused multiply-add that rounds straight into
    ``grad_out``; only the target column is corrected afterwards, in full precision.
    With x - E_p[x] = logp + H the entropy needs no extra copy of x.
    """
    cdt = _compute_dtype(y.dtype)
    V = y.shape[-1]
    t = None
    if scale == 1.0 and softcap is None and inv_temp == 1.0:
        x = y  # read as is: log_softmax / sub upcast on the fly
    else:
        x = y if (scratch and y.dtype == cdt) else y.to(cdt, copy=True)
        if scale != 1.0:
            x.mul_(scale)
        if softcap is not None:
            x.div_(softcap).tanh_()
            if g_loss is not None:
                t = x.clone()  # tanh, for the softcap derivative 1 - tanh**2
            x.mul_(softcap)
        if inv_temp != 1.0:
            x.mul_(inv_temp)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()[:, None]
    loss = argmax = entropy = None
    if lse is None:
        logp = torch.log_softmax(x, -1, dtype=cdt)
        logp_t = logp.gather(1, safe).squeeze(1)
        # lse = x_k - logp_k, taken at the row's max where logp_k ~ 0: at the target
        # logp_t can be -1e4 and the subtraction would cancel digits
        top, top_idx = logp.max(-1)
        lse = x.gather(1, top_idx[:, None]).squeeze(1).to(cdt) - top
        loss = -logp_t
        if label_smoothing:  # lse - mean(x) = -mean(logp)
            loss = (1 - label_smoothing) * loss - label_smoothing * logp.mean(-1)
        if z_loss:
            loss = loss + z_loss * lse * lse
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        if want_argmax:
            argmax = top_idx
    else:
        lse = lse.to(cdt)
        logp = torch.sub(x, lse[:, None]).to(cdt)
    if want_entropy or (g_ent is not None and ent is None):
        entropy = -(torch.exp(logp) * logp).sum(-1)
        if ent is None:
            ent = entropy
    if g_loss is None:
        return loss, lse, entropy, argmax
    chain = scale * inv_temp  # dx/dy, apart from the softcap factor
    g = torch.where(valid, g_loss.to(cdt), torch.zeros((), dtype=cdt, device=logp.device))
    coef = g * (1 + 2 * z_loss * lse) * chain
    smooth = g * (label_smoothing / V) * chain
    hit = g * (1 - label_smoothing) * chain
    e_term = None
    if g_ent is not None:
        # dH/dx = -p (x - E_p[x]) = -p (logp + H)
        e_term = torch.exp(logp).mul_(logp + ent[:, None]).mul_((g_ent.to(cdt) * chain)[:, None])
    p = logp.exp_()
    if t is None and e_term is None:
        p_t = p.gather(1, safe)
        torch.addcmul((-smooth)[:, None], p, coef[:, None], out=grad_out)
        # the target column in full precision: p_t - 1 must not cancel in bf16
        d_t = p_t * coef[:, None] - (smooth + hit)[:, None]
        # index_put_, not scatter_: scatter_ on bf16 costs a full pass over the rows
        rows = torch.arange(safe.shape[0], device=safe.device)
        grad_out.index_put_((rows, safe[:, 0]), d_t[:, 0].to(grad_out.dtype))
        return loss, lse, entropy, argmax
    d = p.mul_(coef[:, None])
    if label_smoothing:
        d.sub_(smooth[:, None])
    d.scatter_add_(1, safe, -hit[:, None])
    if e_term is not None:
        d.sub_(e_term)
    if t is not None:
        d.mul_(t.mul_(t).neg_().add_(1))
    grad_out.copy_(d)
    return loss, lse, entropy, argmax


def _rows_per_chunk(vocab: int, budget_elems: int = 1 << 22) -> int:
    """Rows per chunk so each fp32 temporary stays near 16 MB whatever N is."""
    return max(1, budget_elems // max(vocab, 1))


def _triton_ce_rows():
    from ..kernels.cross_entropy_triton import ce_rows

    return ce_rows


def ce_rows(backend: Backend, y, labels, **kw):
    """Dispatch the row kernel: Triton kernel or the torch one, chunked over rows so
    the fp32 temporaries of the torch kernel stay O(chunk)."""
    if backend is Backend.TRITON:
        kw.pop("scratch", None)
        return _triton_ce_rows()(y, labels, **kw)
    n, V = y.shape
    step = _rows_per_chunk(V)
    if n <= step:
        return ce_rows_torch(y, labels, **kw)
    outs = []
    for s in range(0, n, step):
        sl = slice(s, s + step)
        kws = dict(kw)
        for k in ("lse", "g_loss", "g_ent", "ent"):
            if kws.get(k) is not None:
                kws[k] = kws[k][sl]
        if kws.get("grad_out") is not None:
            kws["grad_out"] = kws["grad_out"][sl]
        outs.append(ce_rows_torch(y[sl], labels[sl], **kws))
    return tuple(None if any(t is None for t in o) else torch.cat(o) for o in zip(*outs))


def _backend_for(op: str, t: torch.Tensor, backend) -> Backend:
    return select(op, t.device, [Backend.TRITON], backend)


# --------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("fastlora::ce_forward", mutates_args=())
def ce_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, per-row lse) of logits (N, V); 0 loss at ignored rows."""
    loss, lse, _, _ = ce_rows(
        Backend(backend), logits, labels, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
    )
    return loss, lse


@ce_forward.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend):
    cdt = _compute_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=cdt), logits.new_empty(n, dtype=cdt)


def _ce_grad_into(out, logits, labels, lse, grad_rows, ignore_index, label_smoothing, z_loss, softcap, backend):
    ce_rows(
        Backend(backend), logits, labels, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        lse=lse, g_loss=grad_rows, grad_out=out,
    )


@torch.library.custom_op("fastlora::ce_backward", mutates_args=())
def ce_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> torch.Tensor:
    """dLoss/dlogits (N, V) in the logits' dtype, in a new buffer."""
    out = torch.empty_like(logits)
    _ce_grad_into(out, logits, labels, lse, grad_rows, ignore_index, label_smoothing, z_loss, softcap, backend)
    return out


@ce_backward.register_fake
def _(logits, labels, lse, grad_rows, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("fastlora::ce_backward_", mutates_args=("logits",))
def ce_backward_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    backend: str,
) -> None:
    """Overwrite logits (N, V) with dLoss/dlogits: no second N x V buffer."""
    _ce_grad_into(logits, logits, labels, lse, grad_rows, ignore_index, label_smoothing, z_loss, softcap, backend)


@ce_backward_.register_fake
def _(logits, labels, lse, grad_rows, ignore_index, label_smoothing, z_loss, softcap, backend):
    return None


# --------------------------------------------------------------------------- autograd
class CrossEntropyFunction(torch.autograd.Function):
    """Per-row losses of logits (N, V); the reduction is plain torch outside, so every
    reduction (including "none" with an arbitrary upstream gradient) shares one
    backward."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, z_loss, softcap, inplace_backward, backend):
        loss, lse = ce_forward(logits, labels, ignore_index, label_smoothing, z_loss, softcap, backend.value)
        ctx.save_for_backward(logits, labels, lse)
        ctx.opts = (ignore_index, label_smoothing, z_loss, softcap, backend.value)
        ctx.inplace_backward = inplace_backward
        ctx.logits_consumed = False
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if ctx.logits_consumed:  # checked before autograd's own, vaguer, version-counter error
            raise RuntimeError(
                "cross_entropy(inplace_backward=True): backward ran twice, but the first "
                "one overwrote the logits with their gradient; use inplace_backward=False "
                "with retain_graph=True"
            )
        logits, labels, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if ctx.inplace_backward:
            ctx.logits_consumed = True
            ce_backward_(logits, labels, lse, grad_loss.contiguous(), *ctx.opts)
            grad = logits
        else:
            grad = ce_backward(logits, labels, lse, grad_loss.contiguous(), *ctx.opts)
        return grad, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- functional
def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    num_items_in_batch=None,
    inplace_backward: bool = False,
    backend=None,
) -> torch.Tensor:
    """Masked cross-entropy with optional label smoothing, z-loss and logit softcap.

    logits: (N, V) or (..., V), any float dtype; labels: (N,) or (...), integer,
    ``ignore_index`` marks positions without loss. Returns a float32 scalar (float64
    for float64 logits), or per-position losses of shape labels.shape for
    ``reduction="none"``. See the module docstring for the exact semantics.

    ``inplace_backward=True`` writes the gradient into the logits buffer instead of a
    new (N, V) one. It is safe only when nothing else reads these logits after the
    loss (the usual ``logits = lm_head(h); loss = cross_entropy(logits, labels)``):
    after backward they hold the gradient. It is an error to use it when the logits
    are a leaf the user keeps, so it defaults to False.
    """
    check_options(reduction, label_smoothing, z_loss, softcap, num_items_in_batch)
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be an integer tensor, got {type(labels).__name__}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape) or logits.shape[-1] == 0:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} must be labels shape {tuple(labels.shape)} + (V,) with V >= 1"
        )
    if logits.device != labels.device:
        raise ValueError(f"logits on {logits.device} but labels on {labels.device}")
    if inplace_backward and logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "cross_entropy(inplace_backward=True) would write the gradient into a leaf tensor "
            "the caller owns (its .grad would alias its data); pass the output of a layer"
        )
    V = logits.shape[-1]
    check_labels(labels, V, ignore_index)
    be = _backend_for("cross_entropy", logits, backend)
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = labels.reshape(-1)
    per_row, _ = CrossEntropyFunction.apply(
        x, t, int(ignore_index), float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), bool(inplace_backward), be,
    )
    n_valid = int((t != ignore_index).sum()) if reduction == "mean" and num_items_in_batch is None else 0
    return reduce_rows(per_row, labels.shape, n_valid, reduction, num_items_in_batch)
