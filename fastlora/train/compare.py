"""``fastlora compare``: the PEFT methods side by side on one task, measured.

Each method runs :func:`fastlora.train.sft` with the same data, steps, batch, seed and
evaluation (the embedded healthcare task by default), differing only in ``peft`` and
its learning rate (``peft_methods.DEFAULT_LR``, each method's own). Every run is a
separate process (``multiprocessing`` spawn), so its peak memory (peak resident set
size, the whole process: model, activations, optimizer state) is its own and one
method's leftovers cannot slow the next. The table (``compare.md``, ``compare.json``) and
a plot (``compare.png``) land in ``output_dir``; each method's full run is in
``output_dir/<method>/`` (adapter, metrics, curve, summary).

A method that fails is reported in the table with its error, and the others still run.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from . import checkpoint as ckpt
from .peft_methods import COMPARED, DEFAULT_LR, check_method


@dataclasses.dataclass
class CompareConfig:
    methods: Sequence[str] = COMPARED
    output_dir: str = "runs/compare"
    threads: int = 2  # torch CPU threads per run
    jobs: int = 1  # runs at a time (on a shared machine, more jobs get more of its CPU; times are then per job)
    # passed to every SFTConfig (same data, steps and evaluation for all methods)
    sft_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not self.methods:
            raise ValueError("compare: no method given")
        for m in self.methods:
            check_method(m)
        if self.jobs < 1 or self.threads < 1:
            raise ValueError(f"compare: jobs and threads must be >= 1, got {self.jobs} and {self.threads}")
        bad = sorted({"peft", "output_dir", "resume"} & set(self.sft_options))
        if bad:
            raise ValueError(f"compare: options {bad} are set per method by compare itself")


def _child(method: str, options: dict, threads: int, queue) -> None:
    import resource

    import torch

    torch.set_num_threads(threads)
    from .config import SFTConfig
    from .sft import sft

    try:
        cfg = SFTConfig.from_dict({**options, "peft": method}, source=f"compare[{method}]")
        summary = sft(cfg)
        summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        summary["lr"] = cfg.resolved().lr
        queue.put(("ok", summary))
    except BaseException as e:  # reported in the table; the other methods still run
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _start(method: str, options: dict, threads: int):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(method, options, threads, queue))
    proc.start()
    return proc, queue, time.perf_counter()


def _finish(method: str, proc, queue, t0: float) -> dict:
    import queue as queue_mod

    while True:
        try:
            status, payload = queue.get(timeout=5)
            break
        except queue_mod.Empty:
            if not proc.is_alive():  # killed (e.g. out of memory) before it could report
                status, payload = "error", f"the run's process died with exit code {proc.exitcode}"
                break
    proc.join()
    row: dict[str, Any] = {"method": method, "wall_seconds": time.perf_counter() - t0}
    if status == "ok":
        row.update(payload)
    else:
        row["error"] = payload
    return row


def compare(config: CompareConfig | None = None, **kw) -> list[dict]:
    cfg = config or CompareConfig(**kw)
    out = Path(cfg.output_dir)
    if ckpt.holds_run(out) or (out / "compare.json").exists():
        raise ValueError(f"output dir {str(out)!r} already holds a comparison; choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    methods = list(cfg.methods)
    results: dict[str, dict] = {}
    running: list[tuple[str, Any, Any, float]] = []
    pending = list(methods)
    while pending or running:
        while pending and len(running) < cfg.jobs:
            method = pending.pop(0)
            i = methods.index(method)
            print(f"[compare {i + 1}/{len(methods)}] {method} (lr {DEFAULT_LR[method]:g}) ...", flush=True)
            options = {**cfg.sft_options, "output_dir": str(out / method)}
            running.append((method, *_start(method, options, cfg.threads)))
        method, proc, queue, t0 = running.pop(0)  # in order: the table's rows come in order
        row = _finish(method, proc, queue, t0)
        results[method] = _row(row)
        print(f"[compare] {method}: " + ("error: " + row["error"] if "error" in row else
                                         f"accuracy {_pct(row.get('accuracy_before'))} -> "
                                         f"{_pct(row.get('accuracy_after'))}, {row['wall_seconds']:.0f} s"),
              flush=True)
        rows = [results[m] for m in methods if m in results]
        ckpt.write_json_atomic(out / "compare.json", rows)  # partial results survive an interruption
    rows = [results[m] for m in methods]
    ckpt.write_text_atomic(out / "compare.md", format_table(rows))
    try:
        plot(rows, out / "compare.png")
    except Exception as e:  # a plot must never lose the measured table
        print(f"could not draw the plot: {e}")
    print(format_table(rows))
    return rows


def _row(r: dict) -> dict:
    peft = r.get("peft") or {}
    keys = ("method", "error", "lr", "accuracy_before", "accuracy_after", "retention", "general_qa_before",
            "general_qa_after", "eval_loss", "final_train_loss", "steps", "train_seconds", "train_cpu_seconds",
            "total_seconds", "total_cpu_seconds", "wall_seconds", "peak_rss_mb", "tokens_per_second")
    row = {k: r.get(k) for k in keys}
    row.update(method_used=peft.get("method_used", r["method"]), trainable=peft.get("trainable"),
               total=peft.get("total"), trainable_percent=peft.get("trainable_percent"),
               notes=peft.get("notes", []),
               patch=(r.get("patch_report") or {}).get("text", "").splitlines()[:1])
    return row


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _num(v, fmt="{:.0f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def format_table(rows: list[dict]) -> str:
    head = ("| method | trainable params | % of model | peak RSS (MB) | train time s (CPU s) | lr "
            "| accuracy before → after | retention | eval loss |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        name = r["method"] if r.get("method_used") in (None, r["method"]) else f"{r['method']} → {r['method_used']}"
        if r.get("error"):
            lines.append(f"| {name} | failed: {r['error'][:120]} |" + " |" * 7)
            continue
        lines.append(
            f"| {name} | {_num(r['trainable'], '{:,}')} | {_num(r['trainable_percent'], '{:.3f}')} "
            f"| {_num(r['peak_rss_mb'])} | {_num(r['train_seconds'])} ({_num(r['train_cpu_seconds'])}) "
            f"| {_num(r['lr'], '{:g}')} | {_pct(r['accuracy_before'])} → {_pct(r['accuracy_after'])} "
            f"| {_pct(r['retention'])} | {_num(r['eval_loss'], '{:.3f}')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png_path: str | Path) -> Path:
    """Four panels per method: trainable %, peak memory, train CPU time, accuracy/retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    names = [r["method"] if r["method_used"] == r["method"] else f"{r['method']}\n({r['method_used']})" for r in ok]
    x = range(len(ok))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].bar(x, [r["trainable_percent"] or 0 for r in ok], color="tab:blue")
    axes[0].set_yscale("log")
    axes[0].set_title("trainable parameters (% of model)")
    axes[1].bar(x, [r["peak_rss_mb"] or 0 for r in ok], color="tab:gray")
    axes[1].set_title("peak RSS of the run (MB)")
    # CPU seconds: on a shared machine (or with --jobs > 1) wall times depend on the neighbours
    axes[2].bar(x, [r.get("train_cpu_seconds") or 0 for r in ok], color="tab:orange")
    axes[2].set_title("train time (CPU s of the run)")
    w = 0.27
    axes[3].bar([i - w for i in x], [r["accuracy_before"] or 0 for r in ok], w, label="accuracy before")
    axes[3].bar(list(x), [r["accuracy_after"] or 0 for r in ok], w, label="accuracy after")
    axes[3].bar([i + w for i in x], [r["retention"] or 0 for r in ok], w, label="general retention")
    axes[3].set_ylim(0, 1.1)
    axes[3].legend(fontsize=7, loc="lower right")
    axes[3].set_title("task accuracy and retention")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("fastlora compare: PEFT methods on the same task, data, steps and evaluation")
    fig.tight_layout()
    return ckpt.write_png_atomic(fig, png_path, dpi=100)
