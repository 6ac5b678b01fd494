"""pytest options and session fixtures of the benchmark suite.

``--preset tiny|llama3-8b`` picks the sizes (see ``harness.PRESETS``); ``--bench-device``
the device (default: CUDA when present); ``--bench-report PATH`` makes the session write
what pytest-benchmark's JSON does not hold: the device ceilings, every equal-result
check, and each skipped provider with its reason. ``fastlora.bench.run`` passes these.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import pytest
import torch

from benchmarks import harness

_SKIPPED: list[dict] = []
_FAILED: list[dict] = []


def pytest_addoption(parser):
    g = parser.getgroup("fastlora benchmarks")
    g.addoption("--preset", default="tiny", choices=sorted(harness.PRESETS), help="benchmark sizes")
    g.addoption("--bench-device", default="auto", choices=["auto", "cpu", "cuda"],
                help="device to benchmark on (auto: cuda when present)")
    g.addoption("--bench-report", default=None, help="write checks, skips and ceilings to this JSON file")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch intra-op threads (torch.set_num_threads); on a CPU shared with other work "
                     "one thread avoids stalls at every parallel barrier")
    g.addoption("--bench-rounds", type=int, default=None,
                help="timed rounds per op benchmark (default: the preset's); more rounds steady a busy CPU")


def pytest_configure(config):
    preset = harness.PRESETS[config.getoption("--preset")]
    dev = config.getoption("--bench-device")
    if dev == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device is visible to torch")
    if preset.cuda_only and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--preset {preset.name} needs a GPU (its shapes take minutes per case on a CPU); "
            "use --preset tiny here"
        )
    if preset.cuda_only and dev == "cpu":
        raise pytest.UsageError(f"--preset {preset.name} is for GPUs; it cannot run with --bench-device cpu")
    threads = config.getoption("--bench-threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def env(pytestconfig) -> harness.Env:
    preset = harness.PRESETS[pytestconfig.getoption("--preset")]
    rounds = pytestconfig.getoption("--bench-rounds")
    if rounds is not None:
        if rounds < 1:
            raise pytest.UsageError(f"--bench-rounds must be at least 1, got {rounds}")
        preset = dataclasses.replace(preset, rounds=rounds)
    dev = pytestconfig.getoption("--bench-device")
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    e = harness.Env(
        preset=preset,
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        ceilings=harness.measure_ceilings(device, quick=not preset.cuda_only),
        cache_bytes=harness.last_level_cache_bytes(device),
    )
    _SESSION["env"] = e
    _SESSION["load_start"] = _loadavg()
    return e


def _loadavg():
    """1-minute load average: context for CPU timings on a shared machine."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


_SESSION: dict = {}


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        _SKIPPED.append({"test": report.nodeid, "reason": reason})
    elif report.failed:
        msg = getattr(report.longrepr, "reprcrash", None)
        _FAILED.append({"test": report.nodeid, "when": report.when,
                        "message": msg.message if msg is not None else str(report.longrepr)[-2000:]})


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--bench-report")
    if not path:
        return
    e = _SESSION.get("env")
    data = {
        "preset": session.config.getoption("--preset"),
        "device": harness.device_name(e.device) if e else None,
        "device_type": e.device.type if e else None,
        "ceilings": e.ceilings if e else None,
        "cache_bytes": e.cache_bytes if e else None,
        "checks": harness.CHECKS,
        "skipped": _SKIPPED,
        "failed": _FAILED,
        "exitstatus": int(exitstatus),
        "rounds": e.preset.rounds if e else None,
        "loadavg_1min": {"start": _SESSION.get("load_start"), "end": _loadavg()},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench-report-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)
