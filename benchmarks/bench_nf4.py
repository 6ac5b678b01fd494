"""NF4 dequantize: packed 4-bit weight (bitsandbytes layout, blocksize 64, double-quant)
-> bf16 weight of the original shape.

Providers: fastlora per backend, bitsandbytes ``dequantize_4bit``, a torch-eager
implementation of the same formula, Unsloth's ``fast_dequantize``. Every one must be
BIT-EXACT with the eager formula (tolerance 0) before it is timed. Throughput is bytes
moved (packed weight + statistics read, bf16 weight written) per second, and its
fraction of the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import math

import torch

from benchmarks import harness as H

OUT_DTYPE = torch.bfloat16
# "-out" variants write into one buffer reused across calls (as Unsloth's global buffer
# does): no fresh output allocation, which on CPU means no first-touch page faults
PEERS = ("bitsandbytes", "bitsandbytes-out", "torch-eager", "unsloth")


def pytest_generate_tests(metafunc):
    preset = H.PRESETS[metafunc.config.getoption("--preset")]
    cases = [f"{o}x{i}" for o, i in preset.nf4_shapes]
    fl = H.fastlora_providers(metafunc.config)
    provs = fl + [f"{p}-out" for p in fl] + list(PEERS)
    metafunc.parametrize("case_id,provider", [(c, p) for c in cases for p in provs])


@H.one_case_at_a_time
def _case(env: H.Env, case_id: str) -> H.Case:
    out_f, in_f = map(int, case_id.split("x"))
    n = out_f * in_f
    nbytes = n / 2 + n / 64 + 4 * math.ceil(n / 64 / 256) + n * OUT_DTYPE.itemsize
    ring = []
    for k in range(env.ring_size(nbytes)):
        w = H.randn((out_f, in_f), seed=1000 + k, device=env.device, dtype=OUT_DTYPE, scale=0.02)
        packed, qs = H.quantize_nf4_inputs(w)
        ring.append((packed, qs))
    reference = (H.nf4_dequantize_eager(*ring[0], OUT_DTYPE),)
    case = H.Case(area="nf4", id=case_id, ring=ring, reference=reference, output_names=("weight",),
                  dtype=OUT_DTYPE, unit="GB/s", bytes=nbytes, tolerance=(0.0, 0.0),
                  params={"shape": [out_f, in_f], "blocksize": 64, "double_quant": True})
    return case


def _provider(env: H.Env, name: str) -> H.Provider:
    buffers: dict = {}

    def buffer(qs):  # one output buffer per shape, shared by the ring
        key = tuple(qs.shape)
        if key not in buffers:
            buffers[key] = torch.empty(key, dtype=OUT_DTYPE, device=env.device)
        return buffers[key]

    if name.startswith("fastlora-"):
        b = name.split("-")[1]
        reuse = name.endswith("-out")

        def build(inputs):
            H.check_backend(env, b)
            W = H.fastlora_attr("NF4Weight").from_bnb(inputs)
            if reuse:
                out = buffer(inputs[1])
                return lambda: (W.dequantize(OUT_DTYPE, out=out, backend=b),)
            return lambda: (W.dequantize(OUT_DTYPE, backend=b),)

        return H.Provider(name, "fastlora", build)
    if name == "bitsandbytes-out":
        def build(inputs):
            F = H.require_module("bitsandbytes.functional", "bitsandbytes")
            packed, qs = inputs
            out = buffer(qs)

            def call():
                try:
                    return (F.dequantize_4bit(packed, qs, out=out),)
                except NotImplementedError as e:
                    raise H.Unavailable(f"bitsandbytes has no dequantize_4bit(out=) here: {str(e)[:120]}") from None

            return call

        return H.Provider(name, "bitsandbytes", build)
    if name == "bitsandbytes":
        def build(inputs):
            F = H.require_module("bitsandbytes.functional", "bitsandbytes")
            packed, qs = inputs
            return lambda: (F.dequantize_4bit(packed, qs).to(OUT_DTYPE),)

        return H.Provider(name, "bitsandbytes", build)
    if name == "torch-eager":
        return H.Provider(name, "torch", lambda inputs: (lambda: (H.nf4_dequantize_eager(*inputs, OUT_DTYPE),)))
    if name == "unsloth":
        def build(inputs):
            H.require_cuda(env, "unsloth")
            utils = H.require_module("unsloth.kernels.utils", "unsloth")
            packed, qs = inputs
            return lambda: (utils.fast_dequantize(packed, qs),)

        return H.Provider(name, "unsloth", build)
    raise ValueError(f"unknown provider {name!r}")


def test_dequantize(benchmark, env, case_id, provider):
    H.run(benchmark, env, _case(env, case_id), _provider(env, provider))
