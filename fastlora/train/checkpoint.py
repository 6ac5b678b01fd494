"""Output directory, atomic checkpoints and the adapter, for SFT runs.

Layout of an output directory::

    run.json                  the config that started the run (marks the dir as holding a run)
    metrics.jsonl             one JSON object per logged step / evaluation (appended)
    checkpoints/step-000050/  adapter (PEFT format) + trainer_state.pt (optimizer, scheduler, RNG, position)
    adapter/                  the final adapter: adapter_model.safetensors + adapter_config.json
    summary.json, curve.png

Every directory is written under a temporary name in the same parent and renamed
into place, and every file through a temporary file and ``os.replace``: a run killed
mid-write leaves at worst a ``.tmp-*`` directory, which is ignored and cleaned up, and
the previous complete checkpoint stays loadable. Old checkpoints are removed only
after the new one is complete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")
# Files whose presence means a directory already holds a fastlora run.
_RUN_MARKERS = (RUN_FILE, "metrics.jsonl", "summary.json", CHECKPOINTS, "adapter")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def json_line(obj: dict) -> str:
    return json.dumps(obj, default=str) + "\n"


def append_jsonl(path: str | os.PathLike, obj: dict) -> None:
    # One write() of a whole line: a kill leaves at most a truncated last line, which readers skip.
    with open(path, "a") as f:
        f.write(json_line(obj))
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_dir_atomic(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp_dir)`` and then move ``tmp_dir`` to ``target``, replacing an
    existing ``target`` only once the new content is complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            old = target.parent / f".old-{target.name}.{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------- the output dir
def holds_run(output_dir: str | os.PathLike) -> bool:
    d = Path(output_dir)
    return d.is_dir() and any((d / m).exists() for m in _RUN_MARKERS)


def check_output_dir(output_dir: str | os.PathLike, *, resume: bool) -> Path | None:
    """Refuse an output dir holding another run unless resuming; writes nothing.

    Returns the checkpoint to resume from, or None to start fresh."""
    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        raise ValueError(f"output dir {str(d)!r} exists and is not a directory")
    if resume:
        found = latest_checkpoint(d)
        if found is not None:
            return found
        finished = [m for m in ("adapter", "summary.json") if (d / m).exists()]
        if finished:
            raise ValueError(
                f"--resume: output dir {str(d)!r} holds a finished run ({', '.join(finished)}) and no checkpoint "
                f"to resume from; choose another --output-dir"
            )
        # Nothing to resume (a fresh dir, or a run stopped before its first checkpoint): start over.
        return None
    if holds_run(d):
        present = ", ".join(m for m in _RUN_MARKERS if (d / m).exists())
        raise ValueError(
            f"output dir {str(d)!r} already holds a run ({present}); pass --resume to continue it, "
            f"or choose another --output-dir"
        )
    return None


def init_output_dir(output_dir: str | os.PathLike, run_info: dict) -> Path:
    """Create the dir for a fresh run (after :func:`check_output_dir` allowed it)."""
    d = Path(output_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(d / RUN_FILE, run_info)
    # A run stopped before its first checkpoint may have left metrics: they belong to no run now.
    write_text_atomic(d / "metrics.jsonl", "")
    return d


# Options that may change between a run and its resumption; any other change would make
# the resumed run a different run (other data, model, order or schedule).
RESUMABLE_CHANGES = frozenset({"resume", "progress", "save_every", "keep_checkpoints", "log_every", "eval_batch_size",
                               "cache_dir", "patch", "device"})


def check_resume_config(output_dir: str | os.PathLike, config: dict) -> None:
    """Refuse to resume a run with options that change what it computes."""
    run_file = Path(output_dir) / RUN_FILE
    if not run_file.is_file():
        return
    try:
        old = json.loads(run_file.read_text()).get("config", {})
    except json.JSONDecodeError:
        return
    changed = sorted(k for k in config if k in old and k not in RESUMABLE_CHANGES and old[k] != config[k])
    if changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {config[k]!r}" for k in changed)
        raise ValueError(f"--resume: the run in {str(output_dir)!r} was started with other options ({diffs}); "
                         f"resume with the same options or choose another --output-dir")


# ------------------------------------------------------------------- checkpoints
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, optimizer, scheduler, trainer: dict,
                    *, keep: int = 2) -> Path:
    """Write checkpoints/step-<step>/ atomically, then prune to the ``keep`` newest."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)

    def fill(tmp: Path) -> None:
        save_trainable(model, tmp / "adapter")
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "trainer": trainer,
            },
            tmp / STATE_FILE,
        )

    path = write_dir_atomic(root / f"step-{step:06d}", fill)
    if keep > 0:
        for _, old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; return the trainer dict."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .peft_methods import WEIGHTS_FILE, load_trainable_state, own_method

    path = Path(path)
    if own_method(model) is not None:  # the bottleneck adapter or BitFit
        adapter_file = path / "adapter" / WEIGHTS_FILE
        if not adapter_file.is_file() or not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete (missing adapter or {STATE_FILE})")
        load_trainable_state(model, path / "adapter")
        return _load_state(path, optimizer, scheduler)
    adapter_file = path / "adapter" / "adapter_model.safetensors"
    if not adapter_file.is_file() or not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete (missing adapter or {STATE_FILE})")
    device = next(p.device for p in model.parameters())
    result = set_peft_model_state_dict(model, load_file(adapter_file, device=str(device)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model: unexpected keys {unexpected[:5]}")
    return _load_state(path, optimizer, scheduler)


def _load_state(path: Path, optimizer, scheduler) -> dict:
    # weights_only=False: the state holds Python RNG tuples and our own trainer dict.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["trainer"] | {"step": state["step"]}


def save_trainable(model, directory) -> None:
    from .peft_methods import save_trainable as save

    save(model, directory)


def save_adapter(model, target: str | os.PathLike) -> Path:
    """The trained adapter, written atomically: PEFT's format (adapter_model.safetensors +
    adapter_config.json), or fastlora's for the bottleneck adapter and BitFit."""
    return write_dir_atomic(target, lambda tmp: save_trainable(model, tmp))
