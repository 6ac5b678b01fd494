"""The benchmark harness shared by every ``benchmarks/bench_*.py`` file.

Contract of one benchmark (one pytest test = one case x one provider):

1. the provider's callables are built, one per input set of a small ring of distinct
   input sets (so no provider is timed on data already hot in a cache);
2. BEFORE any timing, the provider's output on ring[0] is compared with the case's
   reference (explicit tolerances; a mismatch fails the test loudly and nothing is
   timed);
3. it is timed with ``benchmark.pedantic`` rotating through the ring: CUDA-event
   timings on GPU (the authoritative figure, pytest-benchmark's own wall times include
   a synchronize), ``perf_counter`` on CPU; the median after warm-up is the result;
4. peak memory of one more call: ``torch.cuda.max_memory_allocated`` on GPU; on CPU
   the heap bytes in use (glibc ``mallinfo2``; RSS where that is missing) sampled by a
   thread;
5. throughput and the fraction of the device ceilings measured in the same session go
   into pytest-benchmark's ``extra_info``, where ``fastlora.bench`` reads them.

A provider that cannot run here raises :class:`Unavailable` (or ``pytest.skip``) with
its reason; the reason lands in the results file. Nothing here reads environment
variables: everything comes from pytest options (see ``conftest.py``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import statistics
import threading
import time
import types
from typing import Any, Callable, Sequence

import pytest
import torch

AREAS = ("nf4", "lora_linear", "cross_entropy", "train_step", "generation", "prefix")

# Every equal-result check of the session (also when it fails); conftest dumps them.
CHECKS: list[dict] = []


# ----------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int
    rank: int
    tie_embeddings: bool = False  # lm_head is the input embedding (SmolLM2, Gemma)


@dataclasses.dataclass(frozen=True)
class PrefixCase:
    """One batch of the shared-prefix benchmark: ``groups`` prompts of ``prompt`` tokens,
    each followed by ``group_size`` different responses of ``response`` tokens (rows =
    groups x group_size, all of ``prompt + response`` tokens). GRPO: a prompt and its
    completions; DPO: a prompt and its chosen and rejected responses."""

    kind: str  # "grpo" or "dpo": the row order the trainer builds (see bench_prefix.py)
    groups: int
    group_size: int
    prompt: int
    response: int

    @property
    def rows(self) -> int:
        return self.groups * self.group_size

    @property
    def seq(self) -> int:
        return self.prompt + self.response


def smollm2_135m(layers: int, cases: Sequence[PrefixCase]) -> TrainShape:
    """SmolLM2-135M's shapes (a Llama: RoPE, RMSNorm, SwiGLU, GQA 9/3 heads of 64, tied
    embeddings), with ``layers`` of its 30 decoder layers, LoRA r = 16; ``seq`` and
    ``batch`` are the longest row and the most rows of ``cases``."""
    return TrainShape(hidden=576, intermediate=1536, layers=layers, heads=9, kv_heads=3, vocab=49152,
                      seq=max(c.seq for c in cases), batch=max(c.rows for c in cases), rank=16,
                      tie_embeddings=True)


# Issue 23's shapes: a GRPO step (4 prompts x 8 completions, 512 + 128 tokens) and a DPO
# step (8 pairs, a 256-token prompt, chosen and rejected responses of 128).
PREFIX_ISSUE_CASES = (PrefixCase("grpo", groups=4, group_size=8, prompt=512, response=128),
                      PrefixCase("dpo", groups=8, group_size=2, prompt=256, response=128))
# The smoke run's: the same structure, short rows.
PREFIX_TINY_CASES = (PrefixCase("grpo", groups=2, group_size=4, prompt=48, response=16),
                     PrefixCase("dpo", groups=2, group_size=2, prompt=32, response=16))


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    cuda_only: bool
    ring: int  # minimum number of distinct input sets per case
    ring_max: int  # ... and the most (the ring grows to twice the last-level cache)
    warmup: int
    rounds: int
    heavy_warmup: int  # train step / generation
    heavy_rounds: int
    nf4_shapes: tuple  # (out, in)
    lora_shapes: tuple  # (in, out)
    lora_rank: int
    lora_train_m: tuple  # token counts timed as fwd and fwd+bwd
    lora_decode_m: tuple  # token counts timed as inference forwards
    ce_hidden: int
    ce_vocab: int
    ce_tokens: tuple
    train: TrainShape
    gen_batch: int
    gen_prompt: int
    gen_new: int
    prefix_model: TrainShape  # the shared-prefix benchmark's model ...
    prefix_cases: tuple  # ... and its batches (PrefixCase)


PRESETS = {
    "tiny": Preset(
        name="tiny",
        cuda_only=False,
        ring=2,
        ring_max=3,  # a smoke run: rotation is exercised, not cache-proof
        warmup=1,
        rounds=5,
        heavy_warmup=1,
        heavy_rounds=2,
        # 1024x4096 is Llama-3-8B's k/v projection: the CPU dequantize figure of issue 2;
        # 96x320 is odd on purpose (blocks span rows)
        nf4_shapes=((1024, 4096), (96, 320)),
        lora_shapes=((256, 512), (320, 96)),
        lora_rank=16,
        lora_train_m=(129,),
        lora_decode_m=(1,),
        ce_hidden=64,
        ce_vocab=1000,
        ce_tokens=(257,),
        train=TrainShape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2,
                         vocab=512, seq=32, batch=2, rank=8),
        gen_batch=2,
        gen_prompt=8,
        gen_new=4,
        prefix_model=smollm2_135m(2, PREFIX_TINY_CASES),
        prefix_cases=PREFIX_TINY_CASES,
    ),
    # The shapes of issues 2-5: Llama-3-8B (H=4096, I=14336, V=128256, GQA 32/8).
    "llama3-8b": Preset(
        name="llama3-8b",
        cuda_only=True,
        ring=3,
        ring_max=32,
        warmup=5,
        rounds=25,
        heavy_warmup=2,
        heavy_rounds=5,
        nf4_shapes=((4096, 4096), (1024, 4096), (14336, 4096)),
        lora_shapes=((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)),
        lora_rank=16,
        lora_train_m=(4096, 16384),
        lora_decode_m=(1, 16),
        ce_hidden=4096,
        ce_vocab=128256,
        ce_tokens=(4096, 16384),
        train=TrainShape(hidden=4096, intermediate=14336, layers=4, heads=32, kv_heads=8,
                         vocab=128256, seq=2048, batch=1, rank=16),
        gen_batch=16,
        gen_prompt=128,
        gen_new=64,
        # the whole SmolLM2-135M (30 layers): the GPU run of issue 23's shapes
        prefix_model=smollm2_135m(30, PREFIX_ISSUE_CASES),
        prefix_cases=PREFIX_ISSUE_CASES,
    ),
}
# The whole 32-layer model in 4-bit (issue 5: "if memory allows"), for the model areas:
# `--preset llama3-8b-full --only train_step,generation` (about 45 GB on the GPU).
PRESETS["llama3-8b-full"] = dataclasses.replace(
    PRESETS["llama3-8b"], name="llama3-8b-full",
    train=dataclasses.replace(PRESETS["llama3-8b"].train, layers=32),
)
# Issue 23's shapes on a CPU: SmolLM2-135M whole, all 30 decoder layers (with fewer, the
# vocabulary-49152 head, the same work with and without sharing, hides what sharing saves:
# at 2 layers it is half the shared step). A plain GRPO step is ~80 s on 2 cores, the whole
# area ~12 minutes; the other areas run the tiny sizes. This is what
# `fastlora bench --only prefix` runs on a CPU when no preset is given.
PRESETS["prefix-cpu"] = dataclasses.replace(
    PRESETS["tiny"], name="prefix-cpu", heavy_rounds=2,
    prefix_model=smollm2_135m(30, PREFIX_ISSUE_CASES), prefix_cases=PREFIX_ISSUE_CASES,
)


# ----------------------------------------------------------------------------------------
# The environment of one session
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Env:
    preset: Preset
    device: torch.device
    dtype: torch.dtype  # compute dtype of the matmul benchmarks
    ceilings: dict  # copy_GBps, matmul_TFLOPs, matmul_dtype
    cache_bytes: int  # last-level cache, for sizing the input ring

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def ring_size(self, bytes_per_set: float) -> int:
        """Enough distinct sets that the ring is at least twice the last-level cache."""
        need = math.ceil(2 * self.cache_bytes / max(bytes_per_set, 1.0))
        return int(min(max(self.preset.ring, need), self.preset.ring_max))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    for idx in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size") as f:
                txt = f.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        return int(txt.rstrip("KMG")) * mult
    return 32 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and dense matmul throughput
    (bf16 on GPU, fp32 on CPU), measured now, on this device, in this process."""
    if device.type == "cuda":
        n_copy, mm, mm_dtype, reps = 1 << 29, 8192, torch.bfloat16, 10  # 1 GiB of bf16
    else:
        n_copy, mm, mm_dtype, reps = (1 << 23 if quick else 1 << 26), (1024 if quick else 2048), torch.float32, 5
    src = torch.empty(n_copy, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    t_copy = _best_time(lambda: dst.copy_(src), device, reps)
    copy_bytes = 2 * src.numel() * src.element_size()
    src = dst = None  # free the copy buffers (1 GiB each on GPU) before the matmul
    a = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    b = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    t_mm = _best_time(lambda: torch.mm(a, b), device, reps)
    return {
        "copy_GBps": copy_bytes / t_copy / 1e9,
        "matmul_TFLOPs": 2 * mm**3 / t_mm / 1e12,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "copy_bytes": copy_bytes,
        "matmul_n": mm,
    }


def _best_time(fn: Callable, device: torch.device, reps: int) -> float:
    """The fastest of ``reps`` runs: a ceiling is what the device can do at best (a
    median would let a busy shared CPU lower it)."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


# ----------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------
class Unavailable(Exception):
    """The provider cannot run on this machine; the message says why."""


@dataclasses.dataclass
class Provider:
    """One implementation of a case.

    ``build(inputs) -> call``: done once per ring entry, outside the timing; ``call()``
    runs the op once and returns the outputs to check (a tuple of tensors).
    ``reset(inputs)``, if given, runs after each call outside the timing (e.g. drop
    the gradients so that the next call does not accumulate).
    """

    name: str
    family: str  # "fastlora" or the peer's name ("torch", "bitsandbytes+peft", ...)
    build: Callable[[Any], Callable[[], tuple]]
    reset: Callable[[Any], None] | None = None
    cleanup: Callable[[], None] | None = None  # after the test, whatever happened (e.g. unpatch)
    info: dict = dataclasses.field(default_factory=dict)  # filled by build; lands in extra_info


def require_module(name: str, pip_name: str | None = None):
    """Import ``name`` or raise Unavailable saying how to get it."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        raise Unavailable(f"{pip_name or name} is not installed")
    try:
        return importlib.import_module(name)
    except Exception as e:  # a broken peer must not break the suite
        raise Unavailable(f"{pip_name or name} failed to import: {type(e).__name__}: {e}") from None


def require_cuda(env: Env, who: str) -> None:
    if not env.is_cuda:
        raise Unavailable(f"{who} runs on CUDA only (this run is on {env.device.type})")


def fastlora_attr(name: str):
    """``fastlora.<name>``, or Unavailable if that part of fastlora is not there yet."""
    import fastlora

    try:
        return getattr(fastlora, name)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"fastlora.{name} is not available: {type(e).__name__}: {e}") from None


def collection_device(config) -> str:
    """The device of this session, known at collection time (from the options)."""
    d = config.getoption("--bench-device")
    return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d


def fastlora_providers(config) -> list[str]:
    """One fastlora provider per backend that can run on this session's device."""
    gpu = collection_device(config) == "cuda"
    return [f"fastlora-{b}" for b in (("triton", "cuda", "reference") if gpu else ("cpp", "reference"))]


def check_backend(env: Env, backend: str) -> None:
    from fastlora import backend as fb

    ok, why = fb.available(fb.Backend(backend))
    if not ok:
        raise Unavailable(f"fastlora backend {backend} cannot run here: {why}")


def unsupported_call(e: Exception) -> bool:
    """True for the dispatcher's 'this backend has no implementation for this call'."""
    return isinstance(e, ValueError) and "backend for this call" in str(e)


# ----------------------------------------------------------------------------------------
# Equal-result checks
# ----------------------------------------------------------------------------------------
# (rtol, atol as a fraction of max|reference|) of a provider against the reference.
TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol_rel: float) -> dict:
    """Elementwise |a - e| <= atol_rel * max|e| + rtol * |e|, in float64, in chunks (the
    tensors can be [16384, 128256]). NaN or Inf in ``actual`` fails."""
    if tuple(actual.shape) != tuple(expected.shape):
        return {"name": name, "ok": False, "why": f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"}
    a = actual.detach().reshape(-1)
    e = expected.detach().reshape(-1).to(a.device)
    ref_max = 0.0
    step = 1 << 24
    for i in range(0, e.numel(), step):
        ref_max = max(ref_max, e[i : i + step].double().abs().max().item())
    atol = atol_rel * ref_max
    worst, worst_ratio, bad = 0.0, 0.0, 0
    for i in range(0, a.numel(), step):
        ac = a[i : i + step].double()
        ec = e[i : i + step].double()
        err = (ac - ec).abs()
        allowed = atol + rtol * ec.abs()
        nonfinite = ~torch.isfinite(ac)
        bad += int(((err > allowed) | nonfinite).sum().item())
        if err.numel():
            worst = max(worst, float(torch.nan_to_num(err, nan=math.inf).max().item()))
            ratio = torch.nan_to_num(err / allowed.clamp_min(1e-300), nan=math.inf)
            worst_ratio = max(worst_ratio, float(ratio.max().item()))
    return {
        "name": name,
        "ok": bad == 0,
        "mismatched": bad,
        "numel": a.numel(),
        "max_abs_err": worst,
        "max_abs_ref": ref_max,
        "err_over_tol": worst_ratio,  # <= 1 passes
        "rtol": rtol,
        "atol": atol,
    }


def check_outputs(case_id: str, provider: str, names: Sequence[str], actual: Sequence, expected: Sequence,
                  rtol: float, atol_rel: float, per_output: dict | None = None) -> dict:
    """Compare every output; record the check; fail loudly on any mismatch."""
    if len(actual) != len(expected):
        raise AssertionError(f"{case_id} [{provider}]: {len(actual)} outputs, reference has {len(expected)}")
    per_output = per_output or {}
    results = [compare(n, a, e, *per_output.get(n, (rtol, atol_rel))) for n, a, e in zip(names, actual, expected)]
    record = {"case": case_id, "provider": provider, "passed": all(r["ok"] for r in results), "outputs": results}
    CHECKS.append(record)
    if not record["passed"]:
        bad = [r for r in results if not r["ok"]]
        lines = "; ".join(
            f"{r['name']}: " + (r["why"] if "why" in r else
                                f"{r['mismatched']}/{r['numel']} elements off, max|err|={r['max_abs_err']:.3g} "
                                f"(max|ref|={r['max_abs_ref']:.3g}, rtol={r['rtol']:g}, atol={r['atol']:.3g})")
            for r in bad
        )
        raise AssertionError(f"EQUAL-RESULT CHECK FAILED for {case_id} [{provider}]: {lines}")
    return record


# ----------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's ``mallinfo2`` (public since glibc 2.33), or None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


def _heap_in_use() -> int:
    m = _mallinfo2()()
    return int(m.uordblks + m.hblkhd)  # malloc'd bytes in use + mmapped chunks


def _rss_reader() -> Callable[[], int]:
    """RSS in bytes: psutil when installed, else Linux's /proc/self/statm."""
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def read():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read


class _CpuMemSampler:
    """Peak CPU memory of this process while a block runs, sampled every ``interval`` s:
    RSS, and (with glibc) the heap bytes in use. RSS misses an allocation served from
    memory an earlier call freed; the heap figure does not, so it is the one reported."""

    def __init__(self, interval: float = 2e-4):
        self._rss = _rss_reader()
        self._interval = interval
        self._heap = _mallinfo2() is not None
        self._stop = threading.Event()

    def _read(self):
        return self._rss(), (_heap_in_use() if self._heap else 0)

    def __enter__(self):
        self.base_rss, self.base_heap = self._read()
        self.peak_rss, self.peak_heap = self.base_rss, self.base_heap
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        rss, heap = self._read()
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_heap = max(self.peak_heap, heap)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


def measure_memory(call: Callable[[], Any], reset: Callable[[], None] | None, device: torch.device) -> dict:
    """Peak memory of one call: absolute, and above what was allocated before it."""
    if reset is not None:
        reset()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = call()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        res = {"peak_mem_bytes": int(peak), "peak_mem_over_inputs_bytes": int(peak - base),
               "mem_method": "torch.cuda.max_memory_allocated"}
    else:
        with _CpuMemSampler() as s:
            out = call()  # held until the sampler stops: the outputs are part of the peak
        del out
        res = {"peak_rss_bytes": int(s.peak_rss), "peak_rss_over_inputs_bytes": int(s.peak_rss - s.base_rss)}
        if s._heap:
            res.update(peak_mem_bytes=int(s.peak_heap), peak_mem_over_inputs_bytes=int(s.peak_heap - s.base_heap),
                       mem_method="glibc heap in use (mallinfo2), sampled every 0.2 ms")
        else:
            res.update(peak_mem_bytes=res["peak_rss_bytes"], peak_mem_over_inputs_bytes=res["peak_rss_over_inputs_bytes"],
                       mem_method="RSS sampled every 0.2 ms (allocator reuse hides part of the growth)")
    if reset is not None:
        reset()
    return res


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (str(st.device), st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage
        return ("tensor", id(t)), t.numel() * t.element_size()


def saved_for_backward(call: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> tuple[Any, dict]:
    """``(call(), bytes)``: what autograd saves for backward while ``call`` runs
    (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once however
    many views of it are saved. Storages of ``exclude`` (the model's own weights) are
    counted apart: ``saved_activation_bytes`` is the rest, exact and the same figure
    on any device. Tensors an autograd function keeps as attributes instead of
    ``save_for_backward`` are not seen."""
    skip = {_storage_key(t)[0] for t in exclude}
    acts: dict = {}
    weights: dict = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        (weights if key in skip else acts)[key] = nbytes
        return t.detach()  # an alias sharing storage and version counter; holds no graph

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    return out, {"saved_activation_bytes": int(sum(acts.values())), "saved_weight_bytes": int(sum(weights.values())),
                 "saved_method": "torch.autograd.graph.saved_tensors_hooks, unique storages"}


def one_case_at_a_time(build: Callable[["Env", str], "Case"]) -> Callable[["Env", str], "Case"]:
    """Memoize a suite's ``build(env, case_id) -> Case`` for the current case only: the
    providers of one case reuse its inputs, and a new case frees the previous one before
    building (the large preset's inputs do not fit in memory twice)."""
    held: dict = {}

    @functools.wraps(build)
    def get(env: "Env", case_id: str) -> "Case":
        if case_id not in held:
            held.clear()
            if env.is_cuda:
                torch.cuda.empty_cache()
            held[case_id] = build(env, case_id)
        return held[case_id]

    return get


# ----------------------------------------------------------------------------------------
# One benchmark
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One workload: the reference outputs and what one call does (for throughput).

    ``bytes`` is the minimum traffic of the op (inputs read + outputs written once);
    ``flops`` the useful floating-point work. ``unit`` names the headline throughput:
    "GB/s", "TFLOP/s" or "tokens/s".
    """

    area: str
    id: str
    ring: list
    reference: tuple
    output_names: tuple
    dtype: torch.dtype
    unit: str
    bytes: float = 0.0
    flops: float = 0.0
    tokens: float = 0.0
    params: dict = dataclasses.field(default_factory=dict)
    tolerance: tuple | None = None  # (rtol, atol_rel); default from TOLERANCE[dtype]
    tolerances: dict | None = None  # output name -> (rtol, atol_rel), overrides the above


def run(benchmark, env: Env, case: Case, provider: Provider, *, heavy: bool = False) -> dict:
    """Build, check, time and measure one provider on one case (see the module doc)."""
    try:
        return _run(benchmark, env, case, provider, heavy)
    finally:
        if provider.cleanup is not None:
            provider.cleanup()


def _run(benchmark, env: Env, case: Case, provider: Provider, heavy: bool) -> dict:
    benchmark.group = f"{case.area}:{case.id}"
    try:
        calls = [provider.build(inputs) for inputs in case.ring]
    except Unavailable as e:
        pytest.skip(f"{provider.name}: {e}")
    resets = [(lambda inp=inp: provider.reset(inp)) if provider.reset else None for inp in case.ring]

    # 1. equal results, before anything is timed
    try:
        out = calls[0]()
    except Unavailable as e:
        pytest.skip(f"{provider.name}: {e}")
    except ValueError as e:
        if unsupported_call(e):
            pytest.skip(f"{provider.name}: {e}")
        raise
    sync(env.device)
    rtol, atol_rel = case.tolerance or TOLERANCE[case.dtype]
    record = check_outputs(f"{case.area}:{case.id}", provider.name, case.output_names, out, case.reference,
                           rtol, atol_rel, case.tolerances)
    del out
    if resets[0]:
        resets[0]()

    # 2. time, rotating through the ring
    warmup = env.preset.heavy_warmup if heavy else env.preset.warmup
    rounds = env.preset.heavy_rounds if heavy else env.preset.rounds
    state = {"i": 0}
    events: list = []

    def setup():
        i = state["i"] % len(calls)
        state["i"] += 1
        return (i,), {}

    def teardown(i):
        if resets[i]:
            resets[i]()

    if env.is_cuda:
        def target(i):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            calls[i]()
            e.record()
            e.synchronize()
            events.append((s, e))
    else:
        def target(i):
            calls[i]()

    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=warmup, iterations=1)
    for r in resets:  # a disabled benchmark ran once without its teardown
        if r:
            r()
    if env.is_cuda:
        times = [s.elapsed_time(e) / 1e3 for s, e in events[warmup:]]
        timer = "cuda-event"
    else:
        stats = getattr(benchmark, "stats", None)
        times = list(stats.stats.data) if stats is not None else []
        timer = "perf_counter"
    if not times:  # --benchmark-disable: checked, not timed
        return record
    median = statistics.median(times)

    # 3. memory of one more call
    mem = measure_memory(calls[0], resets[0], env.device)

    info = {
        "area": case.area,
        "case": case.id,
        "provider": provider.name,
        "family": provider.family,
        "preset": env.preset.name,
        "device": device_name(env.device),
        "dtype": str(case.dtype).replace("torch.", ""),
        "timer": timer,
        "median_s": median,
        "min_s": min(times),
        "rounds": len(times),
        "ring": len(case.ring),
        "unit": case.unit,
        "check_passed": record["passed"],
        "check": [{k: r.get(k) for k in ("name", "max_abs_err", "err_over_tol")} for r in record["outputs"]],
        **case.params,
        **provider.info,
        **mem,
    }
    if case.bytes:
        info["GBps"] = case.bytes / median / 1e9
        info["frac_copy_bw"] = info["GBps"] / env.ceilings["copy_GBps"]
    if case.flops:
        info["TFLOPs"] = case.flops / median / 1e12
        info["frac_matmul_peak"] = info["TFLOPs"] / env.ceilings["matmul_TFLOPs"]
        if case.area == "train_step":  # model FLOPs (no recompute) over the measured matmul peak
            info["MFU"] = info["frac_matmul_peak"]
    if case.tokens:
        info["tokens_per_s"] = case.tokens / median
    benchmark.extra_info.update(info)
    return record


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape, *, seed: int, device, dtype, scale: float = 1.0) -> torch.Tensor:
    g = generator(seed, torch.device(device))
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


@functools.lru_cache(maxsize=1)
def _bnb():
    return require_module("bitsandbytes")


def quantize_nf4_inputs(w: torch.Tensor):
    """(packed, quant state) of ``w`` from fastlora's own quantizer (NF4, blocksize 64,
    double quant), bit-exact with bitsandbytes' (tests/test_nf4.py): so the inputs exist
    on a host without bitsandbytes. The state is bitsandbytes' ``QuantState`` when it is
    installed (its providers read it), else a namespace with the same fields, which is
    all ``NF4Weight.from_bnb`` and the torch-eager peer read."""
    from fastlora.nf4 import quantize_nf4

    q = quantize_nf4(w, 64, double_quant=True)
    if importlib.util.find_spec("bitsandbytes") is not None:
        return q.packed, q.to_bnb().quant_state
    state2 = types.SimpleNamespace(absmax=q.state2_absmax, code=q.state2_code, blocksize=q.state2_blocksize)
    qs = types.SimpleNamespace(
        absmax=q.absmax, shape=q.shape, code=q.code, blocksize=q.blocksize, quant_type="nf4", dtype=q.dtype,
        offset=q.offset, nested=True, state2=state2, packing_format_for_cpu=False,
    )
    return q.packed, qs


def nf4_dequantize_eager(packed: torch.Tensor, qs, dtype: torch.dtype) -> torch.Tensor:
    """Plain torch eager NF4 dequantize (the formula of nf4.md §1.4/§1.7): a peer, and
    the exact reference of the dequantize benchmark."""
    shape = tuple(qs.shape)
    n = math.prod(shape)
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        idx = torch.arange(absmax.numel(), device=absmax.device) // s2.blocksize
        # two separately rounded fp32 operations, as bitsandbytes computes them
        absmax = s2.code[absmax.long()] * s2.absmax[idx]
        absmax = absmax + qs.offset
    p = packed.reshape(-1)
    nib = torch.stack(((p >> 4), (p & 0x0F)), dim=-1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(qs.blocksize)[:n]
    return (qs.code.float()[nib] * scale).to(dtype).reshape(shape)


def protect_bnb(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking NF4 bytes in place on AVX512-BF16 CPUs (nf4.md §1.6):
    every provider shares these bytes, and a repacked weight reads as garbage."""
    try:
        protect = importlib.import_module("fastlora.patch").protect_bnb_weights
    except (ImportError, AttributeError):
        protect = None  # not written yet: the attribute below is what it sets
    if protect is not None:
        protect(model)
    bnb = _bnb()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False

