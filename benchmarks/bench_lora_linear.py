"""The QLoRA linear ``y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` with W frozen in NF4 (PEFT layout: A is
[r, in], B is [out, r]).

Modes: ``decode`` (inference forward, M = 1..16 rows: generation), ``fwd`` (training
forward, autograd recording) and ``fwd+bwd`` (forward + backward to x, A and B).
Providers: fastlora per backend; bitsandbytes ``Linear4bit`` + PEFT LoRA (today's
stack); a dense ``nn.Linear`` in the compute dtype + PEFT LoRA (the "same LoRA op on a
bf16 weight" of issue 3); dequantize-then-matmul in torch; Unsloth's ``matmul_lora`` /
``LoRA_W``. Every provider computes on the SAME NF4 bytes (the dense one on their exact
dequantization) and is checked against a float64 reference, forward and every gradient.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from benchmarks import harness as H

PEERS = ("bitsandbytes+peft", "dense+peft", "dequant+matmul", "dense-gemv", "unsloth")
SCALING = 2.0  # lora_alpha / r = 32 / 16


def _cases(preset: H.Preset) -> list[str]:
    out = []
    for i, o in preset.lora_shapes:
        out += [f"{i}x{o}-M{m}-decode" for m in preset.lora_decode_m]
        out += [f"{i}x{o}-M{m}-{mode}" for m in preset.lora_train_m for mode in ("fwd", "fwd+bwd")]
    return out


def pytest_generate_tests(metafunc):
    preset = H.PRESETS[metafunc.config.getoption("--preset")]
    provs = H.fastlora_providers(metafunc.config) + list(PEERS)
    metafunc.parametrize("case_id,provider", [(c, p) for c in _cases(preset) for p in provs])


def _parse(case_id: str):
    shape, m, mode = case_id.split("-", 2)
    i, o = map(int, shape.split("x"))
    return i, o, int(m[1:]), mode


@H.one_case_at_a_time
def _case(env: H.Env, case_id: str) -> H.Case:
    in_f, out_f, M, mode = _parse(case_id)
    r, dt, dev = env.preset.lora_rank, env.dtype, env.device
    train = mode != "decode"
    nf4_bytes = in_f * out_f * (0.5 + 1 / 64)
    set_bytes = nf4_bytes + M * (in_f + out_f) * dt.itemsize + r * (in_f + out_f) * dt.itemsize
    ring = []
    for k in range(env.ring_size(set_bytes)):
        s = 2000 + 10 * k
        w = H.randn((out_f, in_f), seed=s, device=dev, dtype=dt, scale=0.02)
        packed, qs = H.quantize_nf4_inputs(w)
        del w
        inp = types.SimpleNamespace(
            packed=packed,
            qs=qs,
            w_deq=H.nf4_dequantize_eager(packed, qs, dt),  # the exact values the NF4 bytes hold
            x=H.randn((M, in_f), seed=s + 1, device=dev, dtype=dt),
            A=H.randn((r, in_f), seed=s + 2, device=dev, dtype=dt, scale=in_f**-0.5),
            B=H.randn((out_f, r), seed=s + 3, device=dev, dtype=dt, scale=0.02),
            g=H.randn((M, out_f), seed=s + 4, device=dev, dtype=dt, scale=out_f**-0.5) if mode == "fwd+bwd" else None,
            mode=mode,
        )
        for t in (inp.x, inp.A, inp.B):
            t.requires_grad_(train)
        ring.append(inp)
    reference = _reference(ring[0])
    names = ("y", "dx", "dA", "dB") if mode == "fwd+bwd" else ("y",)
    lora_flops = 2 * M * r * (in_f + out_f)
    flops = 2 * M * in_f * out_f + lora_flops
    if mode == "fwd+bwd":  # + input gradient (no weight gradient: W is frozen) + LoRA grads
        flops = 4 * M * in_f * out_f + 3 * lora_flops
    case = H.Case(
        area="lora_linear", id=case_id, ring=ring, reference=reference, output_names=names, dtype=dt,
        unit="GB/s" if mode == "decode" else "TFLOP/s",
        bytes=set_bytes, flops=flops, tokens=M,
        params={"in": in_f, "out": out_f, "M": M, "mode": mode, "rank": r},
    )
    return case


def _reference(inp) -> tuple:
    """float64 autograd on the exact dequantized weight."""
    x = inp.x.detach().double().requires_grad_()
    A = inp.A.detach().double().requires_grad_()
    B = inp.B.detach().double().requires_grad_()
    W = inp.w_deq.double()
    y = x @ W.T + SCALING * (x @ A.T) @ B.T
    if inp.mode != "fwd+bwd":
        return (y.detach(),)
    y.backward(inp.g.double())
    return y.detach(), x.grad, A.grad, B.grad


def _run_mode(inp, f, params=None):
    """The call for this mode; ``params`` are the LoRA tensors whose grads are outputs."""
    A, B = params if params is not None else (inp.A, inp.B)
    if inp.mode == "decode":
        def call():
            with torch.no_grad():
                return (f(inp.x),)
    elif inp.mode == "fwd":
        def call():
            return (f(inp.x),)
    else:
        def call():
            y = f(inp.x)
            y.backward(inp.g)
            return y, inp.x.grad, A.grad, B.grad
    return call


def _reset_grads(*ts):
    for t in ts:
        t.grad = None


def _peft_wrap(base: torch.nn.Module, inp, env: H.Env):
    """``base`` inside a module, with a PEFT LoRA adapter holding inp.A / inp.B."""
    peft = H.require_module("peft")
    holder = torch.nn.Module()
    holder.proj = base
    cfg = peft.LoraConfig(r=env.preset.lora_rank, lora_alpha=SCALING * env.preset.lora_rank,
                          target_modules=["proj"], lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(cfg, holder)
    layer = holder.proj
    la, lb = layer.lora_A["default"], layer.lora_B["default"]
    la.to(device=env.device, dtype=env.dtype)
    lb.to(device=env.device, dtype=env.dtype)
    with torch.no_grad():
        la.weight.copy_(inp.A)
        lb.weight.copy_(inp.B)
    train = inp.mode != "decode"
    la.weight.requires_grad_(train)
    lb.weight.requires_grad_(train)
    holder.train(train)
    return layer, (la.weight, lb.weight)


def _peft_provider(env: H.Env, name: str, family: str, make_base, reset) -> H.Provider:
    """PEFT's LoRA layer over ``make_base(inp)``; its own adapter weights (copies of
    inp.A / inp.B) have their grads reset along with the inputs'."""
    built = {}

    def build(inp):
        layer, params = _peft_wrap(make_base(inp), inp, env)
        built[id(inp)] = params
        return _run_mode(inp, layer, params)

    def reset_all(inp):
        reset(inp)
        _reset_grads(*built.get(id(inp), ()))

    return H.Provider(name, family, build, reset_all)


def _provider(env: H.Env, name: str) -> H.Provider:
    def reset(inp):
        _reset_grads(inp.x, inp.A, inp.B)

    if name.startswith("fastlora-"):
        b = name.split("-", 1)[1]

        def build(inp):
            H.check_backend(env, b)
            W = H.fastlora_attr("NF4Weight").from_bnb((inp.packed, inp.qs))
            lora_linear = H.fastlora_attr("lora_linear")
            return _run_mode(inp, lambda x: lora_linear(x, W, inp.A, inp.B, SCALING, backend=b))

        return H.Provider(name, "fastlora", build, reset)

    if name == "bitsandbytes+peft":
        def nf4_base(inp):
            bnb = H.require_module("bitsandbytes")
            in_f, out_f = inp.qs.shape[1], inp.qs.shape[0]
            lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=env.dtype, compress_statistics=True,
                                    quant_type="nf4", device="meta")
            lin.weight = bnb.nn.Params4bit(data=inp.packed, requires_grad=False, quant_state=inp.qs, blocksize=64,
                                           compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=lin)
            lin.support_avx512bf16_for_cpu = False  # never repack the shared bytes (nf4.md §1.6)
            return lin

        return _peft_provider(env, name, "bitsandbytes+peft", nf4_base, reset)

    if name == "dense+peft":
        def dense_base(inp):
            lin = torch.nn.Linear(inp.qs.shape[1], inp.qs.shape[0], bias=False, device="meta")
            lin.weight = torch.nn.Parameter(inp.w_deq, requires_grad=False)
            return lin

        return _peft_provider(env, name, "torch", dense_base, reset)

    if name == "dequant+matmul":
        def build(inp):
            bF = H.require_module("bitsandbytes.functional", "bitsandbytes")

            def f(x):
                W = bF.dequantize_4bit(inp.packed, inp.qs).to(env.dtype)
                return F.linear(x, W) + SCALING * F.linear(F.linear(x, inp.A), inp.B)

            return _run_mode(inp, f)

        return H.Provider(name, "torch", build, reset)

    if name == "dense-gemv":
        def build(inp):
            if inp.mode != "decode":
                raise H.Unavailable("dense-gemv is the decode-mode (M <= 16) bf16 GEMV row only")
            return _run_mode(inp, lambda x: F.linear(x, inp.w_deq) + SCALING * F.linear(F.linear(x, inp.A), inp.B))

        return H.Provider(name, "torch", build, reset)

    if name == "unsloth":
        def build(inp):
            H.require_cuda(env, "unsloth")
            if inp.mode == "fwd+bwd" or inp.mode == "fwd":
                fl = H.require_module("unsloth.kernels.fast_lora", "unsloth")
                return _run_mode(inp, lambda x: fl.LoRA_W.apply(x, inp.packed, inp.qs, inp.A, inp.B, SCALING))
            ut = H.require_module("unsloth.kernels.utils", "unsloth")
            return _run_mode(inp, lambda x: ut.matmul_lora(x, inp.packed, inp.qs, inp.A, inp.B, SCALING))

        return H.Provider(name, "unsloth", build, reset)
    raise ValueError(f"unknown provider {name!r}")


def test_lora_linear(benchmark, env, case_id, provider):
    H.run(benchmark, env, _case(env, case_id), _provider(env, provider))
