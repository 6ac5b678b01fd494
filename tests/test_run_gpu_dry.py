"""scripts/gpu/run_gpu.sh --dry-run on this CPU machine: the GPU call's deadline handling
and its $OUT files, proven without a GPU.

The dry run executes the real smoke script (tiny shapes, Triton's interpreter), one real
test file with its junit XML, and a step that overruns its budget: the overrunning step
must be killed at its budget, the steps after it skipped for lack of time, the whole run
must end inside its deadline, and $OUT must hold only what the GPU host returns (at most
8 files, at most 2 folders down) with the summary written line by line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_gpu_dry_run_meets_its_deadline_and_fills_out(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out))
    env.pop("TRITON_INTERPRET", None)  # the script sets Triton's switch itself in a dry run
    deadline = 120
    t = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu/run_gpu.sh"), "--dry-run", "--deadline", str(deadline),
         "--python", sys.executable],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=deadline + 60,
    )
    wall = time.monotonic() - t
    assert wall < deadline + 10, f"the run took {wall:.0f} s against a {deadline} s deadline"
    print(proc.stdout[-2000:])

    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    names = {p.name for p in files}
    assert {"summary.txt", "smoke.json", "junit.xml", "logs.tar.gz"} <= names, names

    summary = (out / "summary.txt").read_text().splitlines()
    by_step = {line.split(":")[0]: line for line in summary}
    for ok in ("environment", "smoke", "tests"):
        assert "rc=0" in by_step[ok], (by_step[ok], proc.stdout[-3000:], proc.stderr[-2000:])
    assert "TIMED OUT" in by_step["bench-overrun"] and "budget 10 s" in by_step["bench-overrun"]
    assert "SKIPPED" in by_step["bench-after-deadline"]
    assert "done in" in summary[-1]
    assert proc.returncode == 124  # the overrun is the run's first failure

    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["checks"] and all(c["passed"] for c in smoke["checks"]), smoke
    assert not smoke["errors"], smoke["errors"]
    assert "<testsuite" in (out / "junit.xml").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(n).name for n in tar.getnames()}
    assert {"smoke.log", "tests.log", "bench-overrun.log"} <= logs
