"""Compile every Triton kernel of fastlora/kernels/ ahead of time for real GPUs, on a
machine without one, and read each cubin's resource use.

What a first GPU run would otherwise discover (a compile error the interpreter never
sees, register spills that wreck a kernel's speed) is found here instead. The specs
below mirror the launchers: every autotune config dispatch can choose, every dtype the
launchers accept, the constexpr values Llama-3-8B shapes and decode shapes produce, and
the integer specialization Triton's JIT applies (an int argument equal to 1 becomes a
constexpr, so the two orientations of the fused GEMM compile to different code).

    python -m tests.aot_compile [--arch 90,80] [--jobs 2] [--filter nf4_matmul] [--json F]

prints one row per compile (registers, spill stack, local loads, shared memory, MMA
kind) and exits 1 on a compile error or a spill. tests/test_aot_compile.py runs it.

Cost: ~100 compiles of 1-10 s of CPU each (~4 min of CPU, on 2 processes ~2-3 min of
wall time on this project's 2-core machine). So the rows are recorded, with a SHA-256
of every kernel source, this file and Triton's version, in aot_compile_results.json
(``--update``); ``--cached`` (what CI runs) reuses them when that key matches and
compiles everything again when any kernel changed. Triton's own cache
(~/.triton/cache) makes a rerun on one machine cheap as well.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# Compiling needs the real JIT, not the interpreter: decide before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)

ARCHS = (90, 80)

# Llama-3-8B (hidden 4096, MLP 14336, vocab 128256) and the NF4 defaults.
LLAMA_VOCAB = 128256
NF4_BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights
STATS_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize of the double-quant statistics


def _tl():
    import triton.language as tl

    return tl


def specs():
    """(name, kernel, signature, constexprs, num_warps, num_stages) for every variant."""
    tl = _tl()
    from fastlora.kernels import cross_entropy_triton as ce
    from fastlora.kernels import lora_linear_triton as L
    from fastlora.kernels import nf4_triton as nf

    out = []
    fdt = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    # -- NF4 dequantize: every output dtype, plain and double-quantized statistics
    for dname in fdt:
        for nested in (False, True):
            sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                   "s2_absmax_ptr": "*fp32", "s2_code_ptr": "*fp32", "offset_ptr": "*fp32",
                   "out_ptr": f"*{dname}", "n_bytes": "i32", "n": "i32"}
            const = dict(BLOCKSIZE=NF4_BLOCKSIZE, S2_BLOCKSIZE=STATS_BLOCKSIZE, NESTED=nested,
                         BYTES=nf.DEQUANT_BYTES, EXACT_ASM=True)
            out.append((f"nf4_dequantize[{dname},nested={nested}]", nf._nf4_dequantize_kernel, sig, const, 4, 3))
    # -- NF4 quantize (weights in any float dtype) and the double-quant statistics
    for dname in fdt:
        sig = {"x_ptr": f"*{dname}", "mid_ptr": "*fp32", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i32"}
        out.append((f"nf4_quantize[{dname}]", nf._nf4_quantize_kernel, sig, dict(BLOCKSIZE=NF4_BLOCKSIZE), 4, 3))
    sig = {"x_ptr": "*fp32", "thr_ptr": "*fp32", "q_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i32"}
    out.append(("nf4_quantize_stats", nf._nf4_quantize_stats_kernel, sig, dict(BLOCKSIZE=STATS_BLOCKSIZE), 4, 3))
    # -- cross-entropy rows: the flag sets the ops launch (forward; fused forward+grad;
    # backward from a saved lse; with entropy / argmax / softcap), every logits dtype
    block = min(ce.MAX_BLOCK_V, 1 << (LLAMA_VOCAB - 1).bit_length())
    flag_sets = {
        "fwd": dict(LSE_GIVEN=False, COMPUTE_GRAD=False),
        "fwd+grad": dict(LSE_GIVEN=False, COMPUTE_GRAD=True),
        "bwd": dict(LSE_GIVEN=True, COMPUTE_GRAD=True),
        "fwd+ent+argmax+softcap": dict(LSE_GIVEN=False, COMPUTE_GRAD=False, WANT_ENTROPY=True,
                                       WANT_ARGMAX=True, HAS_SOFTCAP=True),
        "bwd+ent": dict(LSE_GIVEN=True, COMPUTE_GRAD=True, HAS_G_ENT=True),
    }
    for dname in fdt:
        for fname, flags in flag_sets.items():
            sig = {"y_ptr": f"*{dname}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
                   "ent_ptr": "*fp32", "argmax_ptr": "*i64", "g_loss_ptr": "*fp32", "g_ent_ptr": "*fp32",
                   "grad_ptr": f"*{dname}", "V": "i32", "stride_y": "i32", "stride_grad": "i32",
                   "ignore_index": "i32", "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32",
                   "scale": "fp32", "inv_temp": "fp32"}
            const = dict(BLOCK_V=block, HAS_SOFTCAP=False, LSE_GIVEN=False, WANT_ENTROPY=False,
                         WANT_ARGMAX=False, COMPUTE_GRAD=False, HAS_G_ENT=False)
            const.update(flags)
            out.append((f"ce_rows[{dname},{fname}]", ce._ce_rows_kernel, sig, const, 8 if block >= 2048 else 4, 3))
    # -- the fused NF4 GEMM: every config dispatch can choose, x dtype = weight dtype
    # (the patched model's case), both orientations (forward: the weight's column
    # stride is 1; backward dx: its row stride is 1), LoRA and bias on (the superset).
    for dname in L.GPU_DTYPES.values():
        for orient in ("fwd", "bwd"):
          # the forward runs on a GPU only with one scale per row and tile (see
          # lora_linear._path); the backward with either
          for one_scale in ((True,) if orient == "fwd" else (True, False)):
            for c in L.dispatch_configs():
                sig = {"x_ptr": f"*{dname}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                       "out_ptr": f"*{dname}", "left_ptr": f"*{dname}", "right_ptr": f"*{dname}",
                       "bias_ptr": f"*{dname}", "M": "i32", "P": "i32", "Q": "i32", "R": "i32", "M_BUCKET": "i32",
                       **{k: "i32" for k in ["stride_xm", "stride_xq", "stride_om", "stride_op", "stride_lm",
                                             "stride_lr", "stride_rr", "stride_rp", "row_stride"]},
                       "scaling": "fp32"}
                const = dict(BLOCKSIZE=NF4_BLOCKSIZE, W_DTYPE=fdt[dname], BF16_RNE_BY_BITS=False,
                             DOT_PRECISION="tf32", LORA_PRECISION="tf32", HAS_BIAS=True, HAS_LORA=True,
                             EVEN_Q=False, TRANS_W=orient == "fwd", BLOCK_R=16)
                # ONE_SCALE: one block scale per weight row and tile (rows of whole blocks,
                # the tile's row extent within one); else a scale per byte
                const["ONE_SCALE"] = one_scale
                # JIT specialization: contiguous x / out / LoRA operands have unit strides
                const.update(stride_xq=1, stride_op=1, stride_lr=1)
                const.update(stride_rr=1 if orient == "fwd" else 0, stride_rp=1 if orient == "bwd" else 0)
                if orient == "fwd":
                    const.pop("stride_rp")
                else:
                    const.pop("stride_rr")
                const.update(c.kwargs)
                k = c.kwargs
                name = (f"nf4_matmul[{dname},{orient},{'one' if one_scale else 'per-byte'} scale,"
                        f"BM{k['BLOCK_M']},BP{k['BLOCK_P']},BQ{k['BLOCK_Q']},"
                        f"w{c.num_warps},s{c.num_stages}]")
                out.append((name, L._nf4_matmul_kernel, sig, const, c.num_warps, c.num_stages))
    return out


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def resources(cubin: bytes) -> dict:
    """Registers, spill stack, shared memory, local loads and MMA instructions of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{res}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(regs=reg, stack=stack, shared=shared, local=local, ldl=sass.count("LDL"),
                stl=sass.count("STL"), wgmma=sass.count("HGMMA"), mma_sync=sass.count("HMMA"))


def _compile_one(job):
    idx, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, sig, const, warps, stages = specs()[idx]
    sig = dict(sig)
    for k in const:
        sig[k] = "constexpr"
    t0 = time.perf_counter()
    row = dict(kernel=name, arch=f"sm_{arch}", warps=warps, stages=stages)
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        row.update(resources(k.asm["cubin"]))
        row["error"] = None
    except Exception as e:  # a compile error is the finding: report it, do not crash
        row["error"] = f"{type(e).__name__}: {str(e).strip()[-600:]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def spilled(row: dict) -> bool:
    return row.get("error") is None and (row["stack"] > 0 or row["ldl"] > 0 or row["stl"] > 0)


def run(archs=ARCHS, jobs: int = 2, name_filter: str = "") -> list[dict]:
    todo = [(i, a) for i, s in enumerate(specs()) if name_filter in s[0] for a in archs]
    if jobs <= 1:
        return [_compile_one(j) for j in todo]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_one, todo))


RESULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_compile_results.json")


def source_key(archs=ARCHS) -> str:
    """What the compile results depend on: every kernel source, these specs, Triton's
    version (its compiler and the ptxas it ships) and the targets."""
    import hashlib
    from importlib.metadata import version

    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    kdir = os.path.join(here, "..", "fastlora", "kernels")
    for path in sorted(os.path.join(kdir, f) for f in os.listdir(kdir) if f.endswith(".py")) + [__file__]:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    h.update(f"triton {version('triton')} archs {sorted(archs)}".encode())
    return h.hexdigest()


def cached_rows(archs=ARCHS):
    """The recorded rows when they were made from exactly these sources, else None."""
    try:
        with open(RESULTS_FILE) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data["rows"] if data.get("key") == source_key(archs) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--filter", default="")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--cached", action="store_true",
                    help=f"reuse {os.path.basename(RESULTS_FILE)} when its source key matches (no compile)")
    ap.add_argument("--update", action="store_true",
                    help=f"record the rows and the source key in {os.path.basename(RESULTS_FILE)}")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    archs = tuple(int(x) for x in a.arch.split(","))
    rows = cached_rows(archs) if a.cached and not a.filter else None
    if rows is not None:
        print(f"source key matches {os.path.basename(RESULTS_FILE)}: {len(rows)} recorded compiles, none redone")
    else:
        rows = run(archs, a.jobs, a.filter)
    bad = 0
    for r in rows:
        if r["error"]:
            bad += 1
            print(f"FAIL {r['kernel']} {r['arch']}: {r['error']}")
            continue
        flag = "SPILL" if spilled(r) else "ok"
        bad += flag != "ok"
        print(f"{flag:5} {r['kernel']:58} {r['arch']} regs={r['regs']:3} stack={r['stack']:4} ldl={r['ldl']:4} "
              f"shared={r['shared']:6} wgmma={r['wgmma']:2} mma_sync={r['mma_sync']:3} {r['seconds']:.1f}s")
    print(f"{len(rows)} compiles, {bad} failed or spilled, {time.perf_counter() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.update and not a.filter and not bad:
        tmp = RESULTS_FILE + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"key": source_key(archs), "rows": rows}, f, indent=1)
        os.replace(tmp, RESULTS_FILE)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
