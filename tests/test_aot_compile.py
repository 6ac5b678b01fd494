"""Every Triton kernel dispatch can launch, and every CUDA source, compiles for sm_90 and
sm_80 on this CPU-only machine, without register spills.

The interpreter that runs the Triton tests here never invokes Triton's code generator,
so a compile error (a reassigned constexpr) or a kernel that spills (every config of the
old fused GEMM did) would otherwise first show up on a GPU. The specs and the resource
read-out live in tests/aot_compile.py; its rows (registers, spill stack, local loads,
shared memory, MMA kind) are printed with ``-s``.

Cost: ~86 Triton compiles (~4 min of CPU). CI reuses the rows recorded in
tests/aot_compile_results.json while their SHA-256 key (every kernel source, the specs,
Triton's version) matches, so it costs ~2 s; after any kernel change the key differs and
the whole set compiles again, in 2 processes (refresh the record with
``python -m tests.aot_compile --update``). The CUDA check costs ~5 s of nvcc per source.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile for real, in the child process
    return env


@pytest.mark.skipif(shutil.which("true") is None, reason="no POSIX tools")
def test_triton_kernels_compile_without_spills(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.aot_compile", "--jobs", "2", "--cached", "--json", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout)
    rows = json.loads(out.read_text())
    kernels = {r["kernel"].split("[")[0] for r in rows}
    assert {"nf4_dequantize", "nf4_quantize", "nf4_quantize_stats", "ce_rows", "nf4_matmul"} <= kernels
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    errors = [f"{r['kernel']} {r['arch']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    spills = [f"{r['kernel']} {r['arch']}: stack {r['stack']} B, {r['ldl']} LDL" for r in rows
              if r["stack"] or r["ldl"] or r["stl"]]
    assert not spills, "register spills:\n" + "\n".join(spills)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Hopper runs the fused GEMM's 64-row tile on wgmma, not the older mma.sync
    big = [r for r in rows if r["kernel"].startswith("nf4_matmul") and "BM64" in r["kernel"] and r["arch"] == "sm_90"]
    assert big and all(r["wgmma"] > 0 for r in big)


def test_aot_check_catches_a_reassigned_constexpr(tmp_path):
    """The check itself: the bug it was written for (a constexpr bound inside
    tl.static_range) must come back as a compile error, not pass."""
    pytest.importorskip("triton")
    src = tmp_path / "bad_kernel.py"
    src.write_text(
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\ndef k(out_ptr):\n"
        "    acc = tl.zeros((16,), dtype=tl.int32)\n"
        "    for s in tl.static_range(2):\n"
        "        step: tl.constexpr = 8 >> s\n"
        "        acc += step\n"
        "    tl.store(out_ptr + tl.arange(0, 16), acc)\n"
    )
    code = (
        "import sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "import bad_kernel, triton\n"
        "from triton.backends.compiler import GPUTarget\nfrom triton.compiler import ASTSource\n"
        "try:\n"
        "    triton.compile(ASTSource(fn=bad_kernel.k, signature={'out_ptr': '*i32'}, constexprs={}),\n"
        "                   target=GPUTarget('cuda', 90, 32))\n"
        "except Exception as e:\n"
        "    print('ERROR', e)\n"
    ) % (str(tmp_path), str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert "constexpr cannot be reassigned" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc").glob("*.cu")))
def test_cuda_sources_compile_for_sm90_without_spills(source, tmp_path):
    proc = subprocess.run(
        ["nvcc", "-arch=sm_90", "-cubin", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v",
         "-I", str(ROOT / "csrc"), "-o", str(tmp_path / "k.cubin"), str(ROOT / "csrc" / source)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert lines, "ptxas -v printed no resource lines:\n" + proc.stderr[-2000:]
    spills = [l for l in lines if l != ("0", "0")]
    assert not spills, f"{source}: {len(spills)} kernels spill registers:\n{proc.stderr[-3000:]}"
