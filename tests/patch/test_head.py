"""The head handler's loss against transformers' ForCausalLMLoss in float64."""
import pytest
import torch

from fastlora.patch import head
from tests.helpers import assert_close


def reference(hidden, w, b, labels, scale, softcap, num_items_in_batch=None, ignore_index=-100,
              shift_labels=None):
    """transformers' ForCausalLMLoss semantics, kept in float64 (it upcasts to fp32)."""
    logits = torch.nn.functional.linear(hidden, w, b) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, w.shape[0]), shift_labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.25, None), (1.0, 3.0), (2.0, 5.0)])
@pytest.mark.parametrize("loss_kw", [{}, {"num_items_in_batch": 9}, {"ignore_index": 7}, {"shift": True}])
def test_causal_lm_loss_matches_transformers(bias, scale, softcap, loss_kw):
    torch.manual_seed(0)
    B, T, H, V = 3, 7, 24, 37  # odd sizes
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, H, dtype=torch.float64) / 3).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    ignore = loss_kw.get("ignore_index", -100)
    labels = torch.randint(0, V, (B, T))
    labels[labels == ignore] = ignore + 1  # ignore only where we mean to
    labels[0, :3] = ignore
    labels[2, -2:] = ignore
    loss_kw = dict(loss_kw)
    if loss_kw.pop("shift", False):
        shift = torch.nn.functional.pad(labels, (0, 1), value=ignore)[:, 1:].clone()
        shift[1, 0] = ignore
        loss_kw["shift_labels"] = shift
    spec = head.HeadSpec(logit_scale=scale, softcap=softcap)
    got = head.causal_lm_loss(hidden, w, b, labels, spec, **loss_kw)
    want = reference(hidden, w, b, labels, scale, softcap, **loss_kw)
    assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = [hidden, w] + ([b] if bias else [])
    g_got = torch.autograd.grad(got, params)
    g_want = torch.autograd.grad(want, params)
    for name, gg, gw in zip(["hidden", "weight", "bias"], g_got, g_want):
        assert gw.abs().max() > 0
        assert_close(gg, gw, rtol=1e-9, atol=1e-12, msg=name)


def test_label_shape_mismatch_is_a_clear_error():
    spec = head.HeadSpec()
    with pytest.raises(ValueError, match=r"labels \(2, 4\) do not match the hidden states \(2, 6\)"):
        head.causal_lm_loss(torch.randn(2, 6, 8), torch.randn(11, 8), None, torch.zeros(2, 4, dtype=torch.long),
                            spec)
