"""2 processes x 1 thread (torchrun, gloo) against 1 process x 1 thread, on CPU, same data.

    python scripts/measure_ddp_cpu.py [--out runs/ddp-cpu] [--steps 8] [--trainers sft,rm]

For each trainer, on its embedded default data: one process with batch 2b and one thread,
then ``torchrun --nproc_per_node 2`` with batch b and one thread per process: the same
global batches, so the same losses (checked, printed) and the same work. The runs go one
after the other; evaluation is cut to a few examples (it is not what is measured). Prints a
table and writes ``OUT/measure.json``: the training wall time of each (rank 0's, which
includes the waiting in collectives), the CPU time of rank 0, the throughput over all
processes, and the ratio 1-process time / 2-process time.

What the ratio says: how much of the work two processes on two cores take off one, with
gloo's all-reduce of the LoRA gradients and of the step's counts over shared memory. What
it does not say: anything about GPUs (NCCL over NVLink or PCIe, a GPU's own step time) or
about more processes; and on a machine shared with other jobs, nothing at all. Run it on
a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {
    # trainer: (options that cut evaluation to a few examples, its throughput in the summary)
    # (6 test examples: with one, the label-restricted scoring has one label and fails in generate/choices.py)
    "sft": (["--no-measure-forgetting", "--test-max-examples", "6", "--eval-max-examples", "1"], "tokens_per_second"),
    "rm": (["--eval-max-examples", "1"], "pairs_per_second"),
}


def run(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "event" not in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/ddp-cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="per process of the 2-process run (the 1-process run: x 2)")
    ap.add_argument("--trainers", default="sft,rm")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.trainers.split(","):
        extra, rate_key = TRAINERS[name]
        common = [name, "--max-steps", str(args.steps), "--threads", "1", "--no-progress", *extra]
        one, two = out / f"{name}-1proc", out / f"{name}-2proc"
        w1 = run([sys.executable, "-m", "fastlora", *common, "--batch-size", str(2 * args.batch),
                  "--output-dir", str(one)], out / f"{name}-1proc.log")
        w2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "fastlora", *common, "--batch-size", str(args.batch), "--output-dir", str(two)],
                 out / f"{name}-2proc.log")
        s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
        l1, l2 = losses(one), losses(two)
        results[name] = {
            "steps": args.steps, "global_batch": 2 * args.batch,
            "train_seconds_1proc": s1["train_seconds"], "train_seconds_2proc": s2["train_seconds"],
            "train_cpu_seconds_1proc": s1["train_cpu_seconds"], "train_cpu_seconds_2proc_rank0": s2["train_cpu_seconds"],
            f"{rate_key}_1proc": s1[rate_key], f"{rate_key}_2proc": s2[rate_key],
            "speedup": s1["train_seconds"] / s2["train_seconds"],
            "command_seconds_1proc": w1, "command_seconds_2proc": w2,
            "largest_loss_difference": max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(l2, l1)),
            "losses_1proc": l1, "losses_2proc": l2,
        }
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "results": results}
    (out / "measure.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{'trainer':8} {'1 proc x 1 thread':>18} {'2 procs x 1 thread':>19} {'ratio':>6}  largest loss difference")
    for name, r in results.items():
        print(f"{name:8} {r['train_seconds_1proc']:>16.1f} s {r['train_seconds_2proc']:>17.1f} s "
              f"{r['speedup']:>6.2f}  {r['largest_loss_difference']:.1e}")
    print(f"load average at the end: {info['load_average_at_end']} ({info['cpus']} CPUs); written {out / 'measure.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
