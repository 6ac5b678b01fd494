"""Cross-entropy on logits, fused linear cross-entropy and token log-probs, forward +
backward.

* ``ce``: mean masked CE of given logits [N, V] (a quarter of the labels are -100, as in
  SFT with the prompt masked); outputs the loss and d(logits).
* ``linear_ce``: the same loss of ``hidden·weightᵀ`` with a frozen head (QLoRA);
  outputs the loss and d(hidden). The memory column is the point: eager holds [N, V]
  logits (and their fp32 copy and gradient).
* ``logprobs``: log p(token) per row under ``softmax(hidden·weightᵀ)`` (PPO), and
  d(hidden) of ``sum(g · logp)`` for a random per-row g. Temperature 1: the peers take
  none.

Providers: fastlora per backend (for ``ce`` also with ``inplace_backward=True``); torch eager (the Hugging Face path: logits upcast to
fp32, ``F.cross_entropy`` / ``log_softmax().gather``); Liger-Kernel; cut-cross-entropy;
Unsloth's CE kernel. Checked against a float64 reference computed in row chunks (the
full float64 logits of the large preset would not fit).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from benchmarks import harness as H

PEERS = {
    "ce": ("torch-eager", "liger", "unsloth"),
    "linear_ce": ("torch-eager", "liger", "cut-cross-entropy"),
    "logprobs": ("torch-eager", "cut-cross-entropy"),
}
IGNORE = -100


def pytest_generate_tests(metafunc):
    preset = H.PRESETS[metafunc.config.getoption("--preset")]
    pairs = []
    for op, peers in PEERS.items():
        for n in preset.ce_tokens:
            fl = H.fastlora_providers(metafunc.config)
            if op == "ce":  # the gradient written into the logits buffer (issue 4), as Liger and Unsloth do
                fl = fl + [f"{p}-inplace" for p in fl]
            for p in fl + list(peers):
                pairs.append((f"{op}-N{n}", p))
    metafunc.parametrize("case_id,provider", pairs)


@H.one_case_at_a_time
def _case(env: H.Env, case_id: str) -> H.Case:
    op, n = case_id.split("-N")
    N, Hd, V = int(n), env.preset.ce_hidden, env.preset.ce_vocab
    dt, dev = env.dtype, env.device
    set_bytes = (N * V if op == "ce" else N * Hd + V * Hd) * dt.itemsize
    ring = []
    # the ce case holds [N, V] logits per set (and each provider a private copy): the
    # shortest ring; each set dwarfs any cache anyway
    size = 2 if op == "ce" else env.ring_size(set_bytes)
    for k in range(size):
        s = 3000 + 10 * k
        g = H.generator(s, dev)
        labels = torch.randint(0, V, (N,), generator=g, device=dev)
        if op == "ce":
            labels[torch.rand(N, generator=g, device=dev) < 0.25] = IGNORE
            inp = types.SimpleNamespace(op=op, labels=labels,
                                        logits=H.randn((N, V), seed=s + 1, device=dev, dtype=dt, scale=2.0).requires_grad_())
        else:
            if op == "linear_ce":
                labels[torch.rand(N, generator=g, device=dev) < 0.25] = IGNORE
            inp = types.SimpleNamespace(
                op=op, labels=labels,
                hidden=H.randn((N, Hd), seed=s + 2, device=dev, dtype=dt).requires_grad_(),
                weight=H.randn((V, Hd), seed=s + 3, device=dev, dtype=dt, scale=Hd**-0.5),
                g=H.randn((N,), seed=s + 4, device=dev, dtype=torch.float32) if op == "logprobs" else None,
            )
        ring.append(inp)
    reference, names = _reference(ring[0])
    flops = 0.0 if op == "ce" else 4.0 * N * V * Hd  # forward + d(hidden); the head is frozen
    case = H.Case(area="cross_entropy", id=case_id, ring=ring, reference=reference, output_names=names, dtype=dt,
                  unit="GB/s" if op == "ce" else "TFLOP/s",
                  bytes=2 * N * V * dt.itemsize if op == "ce" else 0.0,  # ce: read logits, write their gradient
                  flops=flops, tokens=N, params={"op": op, "N": N, "H": Hd, "V": V})
    return case


def _reference(inp, rows: int = 1024):
    """float64, in row chunks: loss (or log-probs) and the gradient of the input."""
    if inp.op == "ce":
        x_all, W = inp.logits.detach(), None
    else:
        x_all, W = inp.hidden.detach(), inp.weight.detach().double()
    N = x_all.shape[0]
    valid = inp.labels != IGNORE
    n_valid = int(valid.sum().item())
    grad = torch.empty(x_all.shape, dtype=torch.float32, device=x_all.device)
    losses = torch.zeros(N, dtype=torch.float64, device=x_all.device)
    for i in range(0, N, rows):
        x = x_all[i : i + rows].double()
        logits = x if W is None else x @ W.T
        lab = inp.labels[i : i + rows]
        ok = lab != IGNORE
        safe = torch.where(ok, lab, 0)
        logp = torch.log_softmax(logits, dim=-1)
        tok = logp.gather(1, safe[:, None]).squeeze(1)
        p = logp.exp()
        onehot = torch.zeros_like(p).scatter_(1, safe[:, None], 1.0)
        if inp.op == "logprobs":
            losses[i : i + rows] = tok
            dlogits = inp.g[i : i + rows].double()[:, None] * (onehot - p)
        else:
            losses[i : i + rows] = torch.where(ok, -tok, 0.0)
            dlogits = (p - onehot) * ok[:, None] / max(n_valid, 1)
        grad[i : i + rows] = (dlogits if W is None else dlogits @ W).float()
    if inp.op == "logprobs":
        return (losses, grad), ("logp", "dhidden")
    loss = losses.sum() / max(n_valid, 1)
    return (loss, grad), ("loss", "dlogits" if inp.op == "ce" else "dhidden")


_OWN: dict = {}


def _own(inp):
    """The inputs a provider may use. For ``ce`` that is a private copy of the logits
    (made outside the timing): Liger, Unsloth and fastlora's in-place mode overwrite
    the logits with their gradient, which must not reach the next provider."""
    if inp.op != "ce":
        return inp
    own = types.SimpleNamespace(**{**vars(inp), "logits": inp.logits.detach().clone().requires_grad_()})
    _OWN[id(inp)] = own
    return own


def _call(inp, f):
    """f(inputs) -> loss (ce, linear_ce) or per-row log-probs (logprobs); then backward."""
    inp = _own(inp)
    x = inp.logits if inp.op == "ce" else inp.hidden
    if inp.op == "ce":
        # the logits reach the loss as the output of an op (a view of the leaf), as an
        # lm_head's do; in-place gradient writers refuse a leaf the caller keeps
        per_call = lambda: types.SimpleNamespace(**{**vars(inp), "logits": x.view_as(x)})  # noqa: E731
    else:
        per_call = lambda: inp  # noqa: E731

    def call():
        i = per_call()
        out = f(i)
        (out if inp.op != "logprobs" else (out * inp.g).sum()).backward()
        return out, x.grad

    return call


def _reset(inp):
    inp = _OWN.get(id(inp), inp)
    (inp.logits if inp.op == "ce" else inp.hidden).grad = None


def _forget_own():
    _OWN.clear()


def _eager(inp):
    if inp.op == "ce":
        return F.cross_entropy(inp.logits.float(), inp.labels, ignore_index=IGNORE)
    logits = F.linear(inp.hidden, inp.weight).float()  # (N, V): what the HF head holds
    if inp.op == "linear_ce":
        return F.cross_entropy(logits, inp.labels, ignore_index=IGNORE)
    return torch.log_softmax(logits, dim=-1).gather(-1, inp.labels[:, None]).squeeze(-1)


def _provider(env: H.Env, name: str, op: str) -> H.Provider:
    if name.startswith("fastlora-"):
        b = name.split("-")[1]
        inplace = name.endswith("-inplace")

        def build(inp):
            H.check_backend(env, b)
            if op == "ce":
                fn = H.fastlora_attr("cross_entropy")
                return _call(inp, lambda i: fn(i.logits, i.labels, ignore_index=IGNORE, inplace_backward=inplace,
                                               backend=b))
            if op == "linear_ce":
                fn = H.fastlora_attr("linear_cross_entropy")
                return _call(inp, lambda i: fn(i.hidden, i.weight, i.labels, ignore_index=IGNORE, backend=b))
            fn = H.fastlora_attr("token_logprobs")
            return _call(inp, lambda i: fn(i.hidden, i.weight, i.labels, backend=b))

        return H.Provider(name, "fastlora", build, _reset, _forget_own)
    if name == "torch-eager":
        return H.Provider(name, "torch", lambda inp: _call(inp, _eager), _reset, _forget_own)
    if name == "liger":
        def build(inp):
            H.require_cuda(env, "liger-kernel")
            lt = H.require_module("liger_kernel.transformers", "liger-kernel")
            if op == "ce":
                loss = lt.LigerCrossEntropyLoss(ignore_index=IGNORE)
                return _call(inp, lambda i: loss(i.logits, i.labels))
            loss = lt.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
            return _call(inp, lambda i: loss(i.weight, i.hidden, i.labels))

        return H.Provider(name, "liger-kernel", build, _reset, _forget_own)
    if name == "cut-cross-entropy":
        def build(inp):
            H.require_cuda(env, "cut-cross-entropy")
            cce = H.require_module("cut_cross_entropy", "cut-cross-entropy")
            if op == "linear_ce":
                return _call(inp, lambda i: cce.linear_cross_entropy(i.hidden, i.weight, i.labels, ignore_index=IGNORE))
            return _call(inp, lambda i: -cce.linear_cross_entropy(i.hidden, i.weight, i.labels, reduction="none"))

        return H.Provider(name, "cut-cross-entropy", build, _reset, _forget_own)
    if name == "unsloth":
        def build(inp):
            H.require_cuda(env, "unsloth")
            ul = H.require_module("unsloth.kernels.cross_entropy_loss", "unsloth")
            return _call(inp, lambda i: ul.fast_cross_entropy_loss(i.logits[None], i.labels[None]))

        return H.Provider(name, "unsloth", build, _reset, _forget_own)
    raise ValueError(f"unknown provider {name!r}")


def test_cross_entropy(benchmark, env, case_id, provider):
    case = _case(env, case_id)
    H.run(benchmark, env, case, _provider(env, provider, case.params["op"]))
