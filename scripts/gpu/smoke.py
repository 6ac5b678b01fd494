"""First minute on a GPU: every kernel once against its reference at one real shape, then
the timings the speed claims rest on. Meant for scripts/gpu/run_gpu.sh (60-90 s on an
H200); every result is appended to the JSON file as soon as it exists, so a run killed
at any point still returns what it measured.

    python scripts/gpu/smoke.py --out smoke.json            # on a GPU
    python scripts/gpu/smoke.py --out smoke.json --dry-run  # on CPU, tiny shapes (CI)

Checks (float64 references, relative error ‖out − ref‖ / ‖ref‖, or bits):
  NF4 quantize (Triton) and dequantize (CUDA, Triton) bit-exact with the CPU reference;
  the decode GEMV, the fused GEMM (forward and dx) and the dequantize-into-a-buffer +
  matmul path against float64; the cross-entropy kernel against torch.
Timings (CUDA-event medians over many repetitions, triton.testing.do_bench):
  dequantize vs a device copy of the same output bytes; the NF4 GEMV vs a bf16 GEMV
  (F.linear at M=1); at M=4096 on Llama-3-8B shapes, fwd+bwd of the fused GEMM vs the
  buffer + cuBLAS path vs the dense bf16 LoRA op; the fused-vs-buffer crossover in M.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

RESULTS: dict = {"checks": [], "timings": [], "errors": []}


def save(path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1)
    os.replace(tmp, path)


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def bench(fn, device, reps_ms=200):
    """Median seconds of fn(): CUDA events over many repetitions (do_bench), or a host
    clock on CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median") * 1e-3
    t = time.perf_counter()  # the CPU dry run proves the code path, it measures nothing
    fn()
    return time.perf_counter() - t


def step(name, out):
    def deco(f):
        def run(*a):
            t0 = time.perf_counter()
            try:
                f(*a)
            except Exception as e:  # record and go on: the next check may still work
                RESULTS["errors"].append({"step": name, "error": f"{type(e).__name__}: {e}",
                                          "trace": traceback.format_exc()[-2000:]})
                print(f"[smoke] {name}: ERROR {type(e).__name__}: {e}", flush=True)
            print(f"[smoke] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
            save(out)
        return run
    return deco


def check(name, ok, **info):
    RESULTS["checks"].append({"name": name, "passed": bool(ok), **info})
    print(f"[smoke]   {'ok  ' if ok else 'FAIL'} {name} {info}", flush=True)


def timing(name, seconds, **info):
    RESULTS["timings"].append({"name": name, "us": seconds * 1e6, **info})
    print(f"[smoke]   {name}: {seconds * 1e6:.1f} us {info}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter: proves the script")
    a = ap.parse_args(argv)
    dev = "cpu" if a.dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("smoke.py: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2

    from fastlora import lora_linear
    from fastlora.kernels import lora_linear_triton as LT
    from fastlora.nf4 import quantize_nf4
    from fastlora.ops import lora_linear as LL

    RESULTS["device"] = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (dry run)"
    RESULTS["torch"] = torch.__version__
    RESULTS["constants"] = {"GEMV_MAX_M": LL.GEMV_MAX_M, "DENSE_MIN_M": LL.DENSE_MIN_M}
    # Llama-3-8B: hidden 4096, MLP 14336; the dry run uses shapes the interpreter can run
    H, I = (4096, 14336) if dev == "cuda" else (128, 192)
    big_m = 4096 if dev == "cuda" else 20
    tri = "triton"
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16 if dev == "cuda" else torch.float32  # interpreter dots: no bf16
    w_cpu = (torch.randn(I, H, generator=g) * 0.02).to(bf16)
    q_ref = quantize_nf4(w_cpu, 64, backend="cpp")
    st: dict = {}

    @step("nf4", a.out)
    def nf4_checks():
        q = quantize_nf4(w_cpu.to(dev), 64, backend=tri)
        check("quantize triton: packed bytes == CPU reference", torch.equal(q.packed.cpu(), q_ref.packed))
        qd = q_ref.to(dev)
        st["q"] = qd
        ref = q_ref.dequantize(bf16, backend="reference")
        bits = {2: torch.int16, 4: torch.int32}
        src = torch.randn(ref.shape, generator=g).to(dev, bf16)
        dst = torch.empty_like(src)
        tc = bench(lambda: dst.copy_(src), dev)
        copy_bw = 2 * src.numel() * src.element_size() / tc  # bytes read + written
        timing(f"device copy of a {I}x{H} {str(bf16)[6:]} tensor", tc, GBps=copy_bw / 1e9)
        for b in (["cuda", tri] if dev == "cuda" else [tri]):
            out = qd.dequantize(bf16, backend=b)
            same = torch.equal(out.cpu().view(bits[out.element_size()]), ref.view(bits[ref.element_size()]))
            check(f"dequantize {b}: bits == reference", same)
            buf = torch.empty_like(out)
            t = bench(lambda: qd.dequantize(out=buf, backend=b), dev)
            nbytes = out.numel() * (out.element_size() + 0.5) + qd.absmax.numel()  # write W, read packed + stats
            timing(f"dequantize {b} {I}x{H}", t, GBps=nbytes / t / 1e9, of_copy_bandwidth=nbytes / t / copy_bw)
        st["dense"] = ref.to(dev)

    @step("lora_linear", a.out)
    def lora_checks():
        q, dense = st["q"], st["dense"]
        r = 16
        A = (torch.randn(r, H, generator=g) * H**-0.5).to(dev, bf16)
        B = (torch.randn(I, r, generator=g) * 0.02).to(dev, bf16)
        for M in (1, min(64, big_m), big_m):
            what = "decode" if M == 1 else LL._path(LL.Backend.TRITON, dev, M, H, bf16, True, 64)
            x = torch.randn(M, H, generator=g).to(dev, bf16).requires_grad_(what != "decode")
            if what == "decode":
                with torch.no_grad():
                    y = lora_linear(x, q, A, B, 2.0)
                ref = lora_linear(x.double(), dense.double(), A.double(), B.double(), 2.0)
                check(f"lora_linear M={M} ({what}) forward", rel_err(y, ref) < 1e-2, rel_err=rel_err(y, ref))
                continue
            y = lora_linear(x, q, A, B, 2.0, backend=tri)
            dy = torch.randn(y.shape, generator=g).to(dev, bf16)
            y.backward(dy)
            x64 = x.detach().double().requires_grad_()
            ref = lora_linear(x64, dense.double(), A.double(), B.double(), 2.0)
            ref.backward(dy.double())
            e1, e2 = rel_err(y, ref), rel_err(x.grad, x64.grad)
            check(f"lora_linear M={M} ({what}) forward and dx", max(e1, e2) < 1e-2, rel_err_y=e1, rel_err_dx=e2)

        # timings: GEMV vs bf16 GEMV; fused vs buffer vs dense at M=4096; the crossover
        with torch.no_grad():
            x1 = torch.randn(1, H, generator=g).to(dev, bf16)
            t_gemv = bench(lambda: lora_linear(x1, q, A, B, 2.0), dev)
            t_dense = bench(lambda: F.linear(x1, dense), dev)
            timing(f"lora_linear M=1 {I}x{H} (layer call)", t_gemv, vs_bf16_gemv=t_dense / t_gemv)
            timing(f"bf16 GEMV M=1 {I}x{H} (F.linear)", t_dense)
            if dev == "cuda":
                s = LL._nf4_storage(q)[0]
                t_k = bench(lambda: LL._cuda_gemv(x1, s[0], s[2], s[3], s[4], s[5], s[1], I, H, 64, bf16, None), dev)
                timing(f"NF4 GEMV kernel M=1 {I}x{H}", t_k, vs_bf16_gemv=t_dense / t_k)

        def fwd_bwd(fn, x, dy):
            def run():
                x.grad = None
                fn(x).backward(dy)
            return run

        for (n_out, n_in) in ((I, H), (H, I)) if dev == "cuda" else ((I, H),):
            qq = q if (n_out, n_in) == (I, H) else quantize_nf4(torch.randn(n_out, n_in, generator=g).to(dev, bf16) * 0.02, 64)
            dd = qq.dequantize(bf16)
            A2 = (torch.randn(r, n_in, generator=g) * n_in**-0.5).to(dev, bf16)
            B2 = (torch.randn(n_out, r, generator=g) * 0.02).to(dev, bf16)
            x = torch.randn(big_m, n_in, generator=g).to(dev, bf16).requires_grad_()
            dy = torch.randn(big_m, n_out, generator=g).to(dev, bf16)
            LL.release_dequant_buffers()
            t_buf = bench(fwd_bwd(lambda x: lora_linear(x, qq, A2, B2, 2.0, backend=tri), x, dy), dev)
            t_dense = bench(fwd_bwd(lambda x: lora_linear(x, dd, A2, B2, 2.0), x, dy), dev)
            saved = LL.DENSE_MIN_M
            LL.DENSE_MIN_M = 1 << 30  # force the fused GEMM at this M, for the comparison only
            try:
                t_fused = bench(fwd_bwd(lambda x: lora_linear(x, qq, A2, B2, 2.0, backend=tri), x, dy), dev)
            finally:
                LL.DENSE_MIN_M = saved
            timing(f"fwd+bwd M={big_m} {n_in}->{n_out} buffer+matmul", t_buf, vs_dense=t_buf / t_dense,
                   buffer_bytes=LL.dequant_buffer_bytes())
            timing(f"fwd+bwd M={big_m} {n_in}->{n_out} fused GEMM", t_fused, vs_dense=t_fused / t_dense)
            timing(f"fwd+bwd M={big_m} {n_in}->{n_out} dense bf16 LoRA op", t_dense)
        # crossover: forward only, fused vs buffer, over M
        with torch.no_grad():
            for M in ((16, 64, 128, 256, 512, 1024, 2048) if dev == "cuda" else (16,)):
                x = torch.randn(M, H, generator=g).to(dev, bf16)
                saved = LL.DENSE_MIN_M
                try:
                    LL.DENSE_MIN_M = 1 << 30
                    tf = bench(lambda: lora_linear(x, q, A, B, 2.0, backend=tri), dev, 100)
                    LL.DENSE_MIN_M = 0
                    tb = bench(lambda: lora_linear(x, q, A, B, 2.0, backend=tri), dev, 100)
                finally:
                    LL.DENSE_MIN_M = saved
                timing(f"crossover fwd M={M} {H}->{I}", tf, fused_us=tf * 1e6, buffer_us=tb * 1e6, fused_over_buffer=tf / tb)

    @step("cross_entropy", a.out)
    def ce_checks():
        from fastlora import cross_entropy

        V = 128256 if dev == "cuda" else 1000
        n = 512 if dev == "cuda" else 8
        logits = torch.randn(n, V, generator=g).to(dev, bf16)
        labels = torch.randint(0, V, (n,), generator=g).to(dev)
        out = cross_entropy(logits, labels, backend=tri)
        ref = F.cross_entropy(logits.double(), labels)
        check("cross_entropy triton vs torch (float64)", abs(float(out) - float(ref)) < 1e-3 * abs(float(ref)),
              got=float(out), ref=float(ref))

    if not a.dry_run:
        LT.set_autotune(True)
    for f in (nf4_checks, lora_checks, ce_checks):
        f()
    failed = [c for c in RESULTS["checks"] if not c["passed"]]
    print(f"[smoke] {len(RESULTS['checks'])} checks, {len(failed)} failed, {len(RESULTS['errors'])} errors", flush=True)
    save(a.out)
    return 1 if failed or RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
