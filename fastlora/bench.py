"""``fastlora bench``: run the benchmark suite and write its results.

The suite is the pytest-benchmark project in ``benchmarks/`` of the source checkout
(it is not installed with the wheel: benchmarks compare against peers that a user
need not have). :func:`run` runs it in a subprocess (a clean process: peers such as
Liger patch transformers process-wide) and writes, atomically, into ``results_dir``
(default ``benchmarks/results``):

* ``<date>-<device>.json``: pytest-benchmark's JSON plus a ``"fastlora"`` section with
  the device, its measured ceilings, versions, git commit, every equal-result check,
  every skipped provider with its reason, and failures;
* ``<date>-<device>.md``: per-case tables and the ratios against each peer;
* ``<date>-<device>.png``: each provider's time relative to fastlora's, per case.

``<device>`` is the device name in lowercase words joined by ``-``; when the preset is
not the device's usual one (``tiny`` on CPU, ``llama3-8b`` on GPU) ``-<preset>`` is
appended, so a smoke run never overwrites a real one. Running one ``--only`` area into
an existing file of the same day, device and preset replaces that area's results and
keeps the others: a GPU run can go area by area.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["run", "main", "AREAS", "PRESETS", "default_preset", "find_suite", "write_results"]

AREAS = ("nf4", "lora_linear", "cross_entropy", "train_step", "generation", "prefix")
# the order the suite runs in: the training step last, because its Liger provider
# patches transformers process-wide and cannot be undone
_RUN_ORDER = ("nf4", "lora_linear", "cross_entropy", "generation", "prefix", "train_step")
PRESETS = ("tiny", "llama3-8b", "llama3-8b-full", "prefix-cpu")  # benchmarks/harness.py defines them
_VERSIONS = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel",
             "cut-cross-entropy", "unsloth", "pytest", "pytest-benchmark", "fastlora")
# the provider every ratio is taken against, when fastlora has no result for a case
_BASELINE = {"nf4": "bitsandbytes", "lora_linear": "bitsandbytes+peft", "cross_entropy": "torch-eager",
             "train_step": "hf-bnb-peft", "generation": "hf-bnb-peft", "prefix": "plain"}


def find_suite() -> Path:
    """The ``benchmarks/`` folder of the checkout this fastlora was installed from."""
    suite = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (suite / "conftest.py").is_file() or not (suite / "harness.py").is_file():
        raise FileNotFoundError(
            f"fastlora bench needs the benchmarks/ folder of a fastlora source checkout, and there is none at "
            f"{suite}: clone the repository and install it with `pip install -e .` to run the benchmarks"
        )
    return suite


def _areas(only) -> list[str]:
    if only is None:
        return list(_RUN_ORDER)
    items = [only] if isinstance(only, str) else list(only)
    areas = [a.strip() for item in items for a in str(item).split(",") if a.strip()]
    bad = [a for a in areas if a not in AREAS]
    if bad or not areas:
        raise ValueError(f"--only {','.join(map(str, items))!s}: unknown area {bad or items}; choose from {list(AREAS)}")
    return [a for a in _RUN_ORDER if a in areas]


def default_preset(areas: Sequence[str], pytest_args: Sequence[str] = ()) -> str:
    """``tiny`` (the smoke sizes), except for the ``prefix`` area alone on a CPU:
    ``prefix-cpu``, issue 23's batch shapes on SmolLM2-135M's width with 2 layers (the
    tiny preset's prefix cases are short rows, so that the whole smoke run stays short)."""
    if list(areas) != ["prefix"]:
        return "tiny"
    args = [str(a) for a in pytest_args]
    device = next((a.split("=", 1)[1] for a in args if a.startswith("--bench-device=")), None)
    if device is None and "--bench-device" in args[:-1]:
        device = args[args.index("--bench-device") + 1]
    if device in (None, "auto"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "prefix-cpu" if device == "cpu" else "tiny"


def run(preset: str | None = None, only=None, results_dir=None, pytest_args: Sequence[str] = ()) -> int:
    """Run the benchmark suite (or the areas in ``only``) with ``preset`` (default:
    :func:`default_preset`); write the results; return pytest's exit status (0: every
    check passed and every benchmark ran or was skipped with its reason)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    areas = _areas(only)
    if preset is None:
        preset = default_preset(areas, pytest_args)
    suite = find_suite()
    missing = [pip for mod, pip in (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"),
                                    ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise RuntimeError(f"fastlora bench needs {', '.join(missing)}: pip install {' '.join(missing)}")
    root = suite.parent
    out_dir = Path(results_dir) if results_dir is not None else suite / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastlora-bench-") as tmp:
        bench_json = Path(tmp) / "pytest-benchmark.json"
        report_json = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pytest",
            *[str(suite / f"bench_{a}.py") for a in areas],
            "-c", str(suite / "pytest.ini"),
            "--preset", preset,
            "--bench-report", str(report_json),
            f"--benchmark-json={bench_json}",
            "--benchmark-columns=median,rounds",
            "--benchmark-disable-gc",  # a collection inside a timed round is noise, not the op's cost
            "-q", "-rsf",
            *map(str, pytest_args),
        ]
        rc = subprocess.run(cmd, cwd=root).returncode
        if not report_json.is_file():
            print(f"fastlora bench: the suite wrote no report (pytest exit status {rc}); nothing written",
                  file=sys.stderr)
            return rc or 1
        bench = json.loads(bench_json.read_text()) if bench_json.is_file() else {"benchmarks": []}
        report = json.loads(report_json.read_text())
    paths = write_results(bench, report, preset=preset, areas=areas, results_dir=out_dir, root=root,
                          command=" ".join(["fastlora", "bench", "--preset", preset]
                                           + (["--only", ",".join(areas)] if only is not None else [])))
    checks = report.get("checks", [])
    bad = sum(1 for c in checks if not c.get("passed"))
    print(f"fastlora bench: {len(bench.get('benchmarks', []))} results timed; equal-result checks: "
          f"{len(checks) - bad} passed, {bad} failed; {len(report.get('skipped', []))} skipped with a reason; "
          f"{len(report.get('failed', []))} failed")
    for p in paths:
        print(f"fastlora bench: wrote {p}")
    return rc


# ----------------------------------------------------------------------------------------
# Writing the results
# ----------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _versions() -> dict:
    v = {"python": platform.python_version()}
    for name in _VERSIONS:
        try:
            v[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            v[name] = None
    try:
        import torch

        v["torch.cuda"] = torch.version.cuda
    except ImportError:
        pass
    return v


def _git(root: Path) -> dict:
    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def _area_of(test: str) -> str | None:
    m = re.search(r"bench_(\w+?)\.py", test)
    return m.group(1) if m else None


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_results(bench: dict, report: dict, *, preset: str, areas: Iterable[str], results_dir: Path,
                  root: Path, command: str = "", date: str | None = None) -> list[Path]:
    """Merge into (or create) ``<date>-<device>[-preset].json/.md/.png``; returns the paths."""
    areas = list(areas)
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    device = report.get("device") or platform.processor() or "unknown"
    usual = "llama3-8b" if report.get("device_type") == "cuda" else "tiny"
    stem = f"{date}-{_slug(device)}" + ("" if preset == usual else f"-{preset}")
    jpath = results_dir / f"{stem}.json"
    meta = {
        "preset": preset,
        "areas": areas,
        "date": date,
        "device": device,
        "device_type": report.get("device_type"),
        "ceilings": report.get("ceilings"),
        "versions": _versions(),
        "git": _git(root),
        "command": command,
        "exitstatus": report.get("exitstatus"),
        "rounds": report.get("rounds"),
        "loadavg_1min": report.get("loadavg_1min"),
        "cpu_count": report.get("cpu_count"),
        "torch_threads": report.get("torch_threads"),
        "checks": report.get("checks", []),
        "skipped": report.get("skipped", []),
        "failed": report.get("failed", []),
    }
    # keep the areas of an earlier run of the same day, device and preset
    if jpath.is_file():
        try:
            old = json.loads(jpath.read_text())
        except (OSError, ValueError):
            old = None
        om = (old or {}).get("fastlora", {})
        if om.get("preset") == preset and om.get("device") == device:
            keep = lambda area: area not in areas  # noqa: E731
            bench = dict(bench)
            bench["benchmarks"] = [b for b in old.get("benchmarks", [])
                                   if keep(b.get("extra_info", {}).get("area"))] + bench.get("benchmarks", [])
            meta["checks"] = [c for c in om.get("checks", []) if keep(c["case"].split(":")[0])] + meta["checks"]
            for k in ("skipped", "failed"):
                meta[k] = [s for s in om.get(k, []) if keep(_area_of(s["test"]))] + meta[k]
            meta["areas"] = [a for a in AREAS if a in set(om.get("areas", [])) | set(areas)]
            meta["earlier_runs"] = om.get("earlier_runs", []) + [
                {k: om.get(k) for k in ("areas", "git", "ceilings", "exitstatus")}]
    bench["fastlora"] = meta
    paths = [jpath]
    _atomic_write(jpath, json.dumps(bench, indent=1, default=str).encode())
    mpath = results_dir / f"{stem}.md"
    _atomic_write(mpath, markdown(bench).encode())
    paths.append(mpath)
    png = chart(bench, results_dir / f"{stem}.png")
    if png is not None:
        paths.append(png)
    return paths


def _rows(bench: dict) -> list[dict]:
    rows = []
    for b in bench.get("benchmarks", []):
        e = b.get("extra_info", {})
        if "median_s" in e:
            rows.append(e)
    return rows


def _by_case(rows: list[dict]) -> dict:
    cases: dict = {}
    for r in rows:
        cases.setdefault((r["area"], r["case"]), []).append(r)
    order = {a: i for i, a in enumerate(AREAS)}
    return dict(sorted(cases.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])))


_VARIANTS = ("-out", "-inplace")  # a reused output buffer / gradient written over the input


def _fastlora_best(rs: list[dict]) -> dict | None:
    """fastlora's fastest plain call in a case: the variants that reuse a buffer are
    shown beside it, but a ratio compares like with like."""
    fl = [r for r in rs if r.get("family") == "fastlora"]
    plain = [r for r in fl if not r["provider"].endswith(_VARIANTS)]
    pick = plain or fl
    return min(pick, key=lambda r: r["median_s"]) if pick else None


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_bytes(n) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _throughput(r: dict) -> str:
    unit = r.get("unit")
    if unit == "GB/s" and "GBps" in r:
        return f"{r['GBps']:.2f} GB/s"
    if unit == "TFLOP/s" and "TFLOPs" in r:
        return f"{r['TFLOPs']:.3f} TFLOP/s"
    if "tokens_per_s" in r:
        return f"{r['tokens_per_s']:.1f} tok/s"
    return "—"


def _ceiling(r: dict) -> str:
    parts = []
    if "frac_copy_bw" in r:
        parts.append(f"{100 * r['frac_copy_bw']:.1f}% copy BW")
    if "frac_matmul_peak" in r:
        label = "MFU" if r.get("area") == "train_step" else "matmul peak"
        parts.append(f"{100 * r['frac_matmul_peak']:.1f}% {label}")
    return ", ".join(parts) or "—"


def markdown(bench: dict) -> str:
    m = bench.get("fastlora", {})
    rows = _rows(bench)
    cases = _by_case(rows)
    checks = m.get("checks", [])
    n_ok = sum(1 for c in checks if c.get("passed"))
    ceil = m.get("ceilings") or {}
    git = m.get("git") or {}
    v = m.get("versions") or {}
    out = [
        f"# fastlora benchmarks: preset `{m.get('preset')}` on {m.get('device')}",
        "",
        f"- date (UTC): {m.get('date')}; command: `{m.get('command')}`; areas: {', '.join(m.get('areas', []))}",
        f"- git commit: `{git.get('commit')}`" + (" (with uncommitted changes)" if git.get("dirty") else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- device ceilings measured in this run: copy {ceil.get('copy_GBps', float('nan')):.1f} GB/s "
        f"(bytes read + written), {ceil.get('matmul_dtype', '?')} matmul {ceil.get('matmul_TFLOPs', float('nan')):.3f} "
        f"TFLOP/s (n={ceil.get('matmul_n')})",
        f"- equal-result checks: {n_ok} passed, {len(checks) - n_ok} failed; a provider is timed only after "
        "its check passed",
        f"- pytest exit status: {m.get('exitstatus')}; timed rounds per op: {m.get('rounds')}",
    ]
    load = m.get("loadavg_1min") or {}
    if m.get("device_type") == "cpu" and load.get("start") is not None:
        out.append(f"- 1-minute load average at start / end: {load.get('start')} / {load.get('end')} on "
                   f"{m.get('cpu_count')} CPUs (a load above the CPU count means the timings were shared); "
                   f"torch intra-op threads: {m.get('torch_threads')}")
    out += [
        "",
        "Time is the median after warm-up (CUDA events on GPU, perf_counter on CPU), rotating through "
        "distinct input sets. `vs fastlora` = provider time / fastlora's best time (above 1: fastlora is "
        "faster). Peak memory: heap bytes in use (glibc mallinfo2, sampled) on CPU, `max_memory_allocated` on GPU; "
        "'over inputs' subtracts what was allocated before the call.",
        "",
    ]
    current = None
    for (area, case), rs in cases.items():
        if area != current:
            out += [f"## {area}", ""]
            current = area
        best = _fastlora_best(rs)
        out += [f"### {case}", "",
                "| provider | median (min) | throughput | of ceiling | peak mem | peak over inputs | vs fastlora |",
                "|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: r["median_s"]):
            ratio = f"{r['median_s'] / best['median_s']:.3g}x" if best else "—"
            out.append(
                f"| {r['provider']} | {_fmt_time(r['median_s'])} ({_fmt_time(r['min_s'])}) | {_throughput(r)} | {_ceiling(r)} | "
                f"{_fmt_bytes(r.get('peak_mem_bytes'))} | {_fmt_bytes(r.get('peak_mem_over_inputs_bytes'))} | {ratio} |"
            )
        out.append("")
    out += _prefix_section(cases, m.get("device_type"))
    out += ["## Ratios against each peer", "",
            "Peer time / fastlora time (speedup of fastlora's best backend; above 1 is faster) and fastlora peak "
            "memory over inputs / the peer's (below 1 is less memory). fastlora's `-out` (reused output buffer) "
            "and `-inplace` (gradient written into the logits) variants are in the per-case tables, not here.", ""]
    peers = sorted({r["provider"] for r in rows if r.get("family") != "fastlora"})
    if peers and any(_fastlora_best(rs) for rs in cases.values()):
        out += ["| area | case | fastlora | " + " | ".join(peers) + " |",
                "|---|---|---|" + "---|" * len(peers)]
        for (area, case), rs in cases.items():
            best = _fastlora_best(rs)
            if best is None:
                continue
            cells = []
            for p in peers:
                r = next((r for r in rs if r["provider"] == p), None)
                if r is None:
                    cells.append("—")
                    continue
                t = r["median_s"] / best["median_s"]
                mo, mp = best.get("peak_mem_over_inputs_bytes"), r.get("peak_mem_over_inputs_bytes")
                mem = f", mem {mo / mp:.3g}x" if mo is not None and mp and mp > 0 else ""
                cells.append(f"{t:.3g}x{mem}")
            out.append(f"| {area} | {case} | {best['provider']} {_fmt_time(best['median_s'])} | " + " | ".join(cells) + " |")
    else:
        out.append("No case has a fastlora result in this run, so there is no ratio to report.")
    out.append("")
    skipped = m.get("skipped", [])
    out += ["## Providers not measured", "", f"{len(skipped)} benchmarks skipped, each with its reason:", ""]
    if skipped:
        out += ["| benchmark | reason |", "|---|---|"]
        out += [f"| `{s['test'].split('::')[-1]}` | {s['reason'].replace('|', '/')} |" for s in skipped]
    out.append("")
    failed = m.get("failed", [])
    if failed:
        out += ["## FAILURES", ""]
        out += [f"- `{f['test']}` ({f['when']}): {f['message'][:500].replace(chr(10), ' ')}" for f in failed]
        out.append("")
    bad = [c for c in checks if not c.get("passed")]
    if bad:
        out += ["## Failed equal-result checks", ""]
        out += [f"- {c['case']} [{c['provider']}]: " + "; ".join(
            f"{o['name']} max|err| {o.get('max_abs_err')} (tolerance x{o.get('err_over_tol')})" for o in c["outputs"]
            if not o.get("ok")) for c in bad]
        out.append("")
    return "\n".join(out)


def _prefix_section(cases: dict, device_type) -> list[str]:
    """The prefix area side by side: shared against plain, time and both memory figures."""
    pairs = [(case, {r["provider"]: r for r in rs}) for (area, case), rs in cases.items() if area == "prefix"]
    pairs = [(case, by) for case, by in pairs if "shared" in by and "plain" in by]
    if not pairs:
        return []
    peak = ("`max_memory_allocated` minus what was allocated before the step (the model, the batch)"
            if device_type == "cuda" else "the sampled heap (mallinfo2) above what was in use before the step")
    out = ["## Shared prefix: shared against plain", "",
           "One step (forward with labels, backward) of `fastlora.patch(share_prefix=True)` (`shared`) and "
           "`share_prefix=False` (`plain`) on the same model and batch. Speedup = plain time / shared time. "
           "Saved activations: the bytes autograd saves for backward (unique storages, the model's weights and "
           "quantization state excluded), exact on any device: the activation-memory figure the issue's memory "
           f"bar is read on. Peak over inputs: {peak}. Tokens: real tokens of the batch -> positions the "
           "decoder ran (`fastlora.shared_prefix_stats`).", "",
           "| case | tokens in -> run | plain | shared | speedup | saved activations plain -> shared | ratio | "
           "peak over inputs plain -> shared | ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
    for case, by in pairs:
        p, s = by["plain"], by["shared"]

        def ratio(key):
            a, b = s.get(key), p.get(key)
            return f"{a / b:.3g}x" if a is not None and b else "—"

        toks = f"{s['tokens_in']} -> {s['tokens_run']}" if "tokens_in" in s else "—"
        out.append(
            f"| {case} | {toks} | {_fmt_time(p['median_s'])} | {_fmt_time(s['median_s'])} | "
            f"{p['median_s'] / s['median_s']:.3g}x | {_fmt_bytes(p.get('saved_activation_bytes'))} -> "
            f"{_fmt_bytes(s.get('saved_activation_bytes'))} | {ratio('saved_activation_bytes')} | "
            f"{_fmt_bytes(p.get('peak_mem_over_inputs_bytes'))} -> {_fmt_bytes(s.get('peak_mem_over_inputs_bytes'))} | "
            f"{ratio('peak_mem_over_inputs_bytes')} |")
    return out + [""]


def chart(bench: dict, path: Path) -> Path | None:
    """Horizontal bars: each provider's time relative to fastlora's best (log scale)."""
    cases = _by_case(_rows(bench))
    if not cases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    palette = {"fastlora": "#2a7ab0"}
    others = ["#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
    fam_color: dict = {}
    for (area, case), rs in cases.items():
        best = _fastlora_best(rs)
        base = best or next((r for r in rs if r["provider"] == _BASELINE.get(area)), None) or min(
            rs, key=lambda r: r["median_s"])
        for r in sorted(rs, key=lambda r: r["provider"]):
            fam = r.get("family", "?")
            if fam not in palette and fam not in fam_color:
                fam_color[fam] = others[len(fam_color) % len(others)]
            labels.append(f"{area}:{case}  {r['provider']}")
            values.append(r["median_s"] / base["median_s"])
            colors.append(palette.get(fam) or fam_color[fam])
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.22 * len(labels) + 1.2)))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("time / fastlora's best time in the case (log); right of 1 = slower than fastlora", fontsize=8)
    from matplotlib.patches import Patch

    fams = {"fastlora": palette["fastlora"], **fam_color}
    ax.legend(handles=[Patch(color=c, label=f) for f, c in fams.items()], fontsize=7, loc="lower right")
    m = bench.get("fastlora", {})
    ax.set_title(f"fastlora benchmarks, preset {m.get('preset')}, {m.get('device')}, {m.get('date')}", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    _atomic_write(path, png.getvalue())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastlora.bench [--preset P] [--only AREA] [--results-dir D] [-- PYTEST ARGS]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="fastlora bench", description="run the benchmark suite and write its results")
    p.add_argument("--preset", default=None, choices=PRESETS,
                   help="problem sizes (default: tiny; prefix-cpu for --only prefix on a CPU)")
    p.add_argument("--only", default=None, help=f"comma-separated areas among {', '.join(AREAS)}")
    p.add_argument("--results-dir", default=None)
    a = p.parse_args(argv)
    try:
        return run(preset=a.preset, only=a.only, results_dir=a.results_dir, pytest_args=extra)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"fastlora bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
