"""Output directory, atomic checkpoints and the adapter, for every trainer (SFT, reward model, PPO).

Layout of an output directory::

    run.json                  the config that started the run (+ fingerprints of its input files)
    metrics.jsonl             one JSON object per logged step / evaluation (appended)
    checkpoints/step-000050/  adapter/ (PEFT format), optimizer.safetensors (every tensor of the
                              optimizer, scheduler and RNG states), trainer_state.json (the rest,
                              as JSON), checksums.json (sha256 and size of each of those files)
    adapter/                  the final adapter: adapter_model.safetensors + adapter_config.json
    summary.json, curve.png

A checkpoint of an FSDP run (``parallel='fsdp'``) keeps its adapter/ (gathered, PEFT format,
for people and tools) and adds ``sharded/``: the trainable parameters and the optimizer
state as torch.distributed.checkpoint (DCP) writes them with its safetensors storage, one
file per rank holding that rank's shards, each shard's offsets in the file's JSON header.
Every rank writes its own file into the same ``.tmp-*`` dir; rank 0 adds the rest and
renames the whole dir. Resuming reads the shards back with DCP, which reshards them for
another number of ranks (or whole tensors in one process).

What is guaranteed:

- **Atomic and durable.** Every file is written to a temporary name in its final directory,
  fsynced, renamed into place, and the directory is fsynced after the rename; every directory
  (a checkpoint, the adapter) is filled under a ``.tmp-*`` name, each file in it fsynced, then
  renamed. A run killed at any moment leaves the previous complete checkpoint loadable and at
  worst a ``.tmp-*`` leftover, removed by :func:`clean_stale` when the next run starts. Old
  checkpoints are pruned only after the new one is complete.
- **No pickle.** Checkpoints hold safetensors and JSON only; loading one cannot run code
  (DCP's own format pickles its metadata: fastlora uses DCP's safetensors storage instead).
- **Verified.** ``checksums.json`` is written last; a checkpoint whose files do not match it is
  reported by name (:func:`verify_checkpoint`) and never loaded.
- **Readable by others.** Files get the permissions of ``open()`` under the user's umask
  (0644 / 0755 by default), not the 0600 / 0700 of temporary files.
- **Environment errors name the path.** A full disk, a read-only or permission-denied directory
  raise :class:`OSError` with the errno and the path, whatever library was writing
  (safetensors reports ``os error 28`` in a ``SafetensorError``; :func:`environment_error`
  translates it).
"""
from __future__ import annotations

import contextlib
import errno as _errno
import functools
import hashlib
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
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "optimizer.safetensors"
MANIFEST = "checksums.json"
SHARDED_DIR = "sharded"  # FSDP checkpoints: DCP's per-rank safetensors files
LEGACY_STATE_FILE = "trainer_state.pt"  # pickled state of fastlora <= 2026-11-30: never loaded
CHECKPOINT_FORMAT = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
# Files whose presence means a directory already holds a fastlora run.
_RUN_MARKERS = (RUN_FILE, "metrics.jsonl", "summary.json", CHECKPOINTS, "adapter")
# errno values that mean "the machine, not the input, is at fault"
ENV_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.EIO,
                        _errno.EFBIG, _errno.EMFILE, _errno.ENFILE})


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, damaged or does not fit the model; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {str(path)!r}: {problem}")


# ------------------------------------------------------------ environment errors
def environment_error(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """The :class:`OSError` (errno + path) behind ``exc`` when the environment caused it (full
    disk, read-only or permission-denied path), else None.

    safetensors wraps the OS error in a ``SafetensorError`` whose text ends in ``(os error 28)``;
    torch's zip writer only says ``unexpected pos ...``, which means a short write: a full disk
    when the free space at ``path`` is (nearly) gone."""
    if isinstance(exc, EnvironmentFailure):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno not in ENV_ERRNOS:
            return None
        return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), exc.filename or str(path))
    text = str(exc)
    m = re.search(r"os error (\d+)", text)
    if m and int(m.group(1)) in ENV_ERRNOS:
        n = int(m.group(1))
        return OSError(n, os.strerror(n), str(path))
    if "No space left on device" in text or (
            isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text)
            and free_bytes(path) < (1 << 20)):
        return OSError(_errno.ENOSPC, os.strerror(_errno.ENOSPC), str(path))
    return None


class EnvironmentFailure(OSError):
    """An OSError whose message is already a whole sentence for the user (what, where, what to do)."""

    def __init__(self, errno: int, message: str, path: str | os.PathLike | None = None):
        super().__init__(errno, message, None if path is None else str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


_HINTS = {
    _errno.ENOSPC: "free some space or choose another --output-dir",
    _errno.EDQUOT: "free some space or choose another --output-dir",
    _errno.EROFS: "the file system is read-only: choose another --output-dir",
    _errno.EACCES: "check the permissions of that path",
    _errno.EPERM: "check the permissions of that path",
}


def describe_os_error(e: OSError) -> str:
    """One line: what failed, at which path, and what to do."""
    if isinstance(e, EnvironmentFailure):
        return e.message
    what = e.strerror or str(e)
    where = f": {e.filename}" if e.filename else ""
    hint = _HINTS.get(e.errno) if e.errno is not None else None
    return f"{what}{where}" + (f" (errno {e.errno}); {hint}" if hint else "")


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing ancestor)."""
    p = existing_ancestor(path)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


def existing_ancestor(path: str | os.PathLike) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


# ------------------------------------------------------------------ atomic writes
@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # os.umask can only be read by setting it; done once, before any thread of ours writes.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename (or a new file) in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (_errno.EINVAL, _errno.ENOTSUP, _errno.EBADF):
            raise
    finally:
        os.close(fd)


def _seal_tree(root: Path) -> None:
    """Before a directory is renamed into place: every file in it on disk, and the permissions
    of ``open()`` under the umask on everything (safetensors creates its files 0600)."""
    fmode, dmode = file_mode(), dir_mode()
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fchmod(fd, fmode)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(dirpath, dmode)
        fsync_dir(dirpath)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise environment_error(e, path.parent) or e
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        env = environment_error(e, path)
        if env is not None:
            raise env from e
        raise


def write_png_atomic(fig, png_path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Render a matplotlib figure and write it like every other output (temp file, fsync,
    rename, umask permissions); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(png_path, buf.getvalue())
    return Path(png_path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def json_line(obj: dict) -> str:
    return json.dumps(obj, default=str) + "\n"


def append_jsonl(path: str | os.PathLike, obj: dict, *, fsync: bool = True) -> None:
    # One write() of a whole line: a kill leaves at most a truncated last line, which readers skip.
    try:
        with open(path, "a") as f:
            f.write(json_line(obj))
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError as e:
        raise environment_error(e, path) or e


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
    existing ``target`` only once the new content is complete and on disk."""
    target = Path(target)
    tmp = make_tmp_dir(target)
    try:
        fill(tmp)
        commit_dir(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        env = environment_error(e, target)
        if env is not None:
            raise env from e
        raise
    return target


def make_tmp_dir(target: str | os.PathLike) -> Path:
    """A new ``.tmp-<name>.*`` dir next to ``target``, to be filled and then :func:`commit_dir`-ed."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    except OSError as e:
        raise environment_error(e, target.parent) or e


def commit_dir(tmp: Path, target: Path) -> None:
    """Every file of the filled ``tmp`` on disk, then ``tmp`` renamed to ``target`` (replacing it)."""
    _seal_tree(tmp)
    if target.exists():
        # Between the two renames the complete old content sits at .old-*: clean_stale() puts
        # it back if a kill lands there.
        old = target.parent / f".old-{target.name}.{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)


def clean_stale(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what a killed run left behind (``.tmp-*`` dirs, ``.*.tmp`` files) in the output dir
    and its checkpoints; put back a ``.old-<name>.*`` whose replacement never arrived. Returns
    what was removed or restored."""
    touched = []
    for d in (Path(output_dir), Path(output_dir) / CHECKPOINTS):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith(".tmp-") or (p.name.startswith(".") and p.name.endswith(".tmp")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                touched.append(p)
            elif p.name.startswith(".old-"):
                original = d / p.name[len(".old-"):].rsplit(".", 1)[0]
                if original.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.rename(p, original)
                touched.append(p)
    return touched


# ----------------------------------------------------------------- the output dir
def holds_run(output_dir: str | os.PathLike) -> bool:
    d = Path(output_dir)
    return d.is_dir() and any((d / m).exists() for m in _RUN_MARKERS)


def is_finished(output_dir: str | os.PathLike) -> bool:
    return (Path(output_dir) / "summary.json").is_file()


def check_output_dir(output_dir: str | os.PathLike, *, resume: bool | str, log=None) -> Path | None:
    """Refuse an output dir holding another run unless resuming; writes nothing.

    ``resume``: False (the dir must not hold a run), True (a checkpoint must exist) or
    ``"auto"`` (continue from the checkpoint if there is one, else start over). Returns the
    checkpoint to resume from (the newest that verifies; ``log(message)`` hears about the damaged
    ones skipped), or None to start fresh. A finished run raises
    :class:`fastlora.train.run.RunFinished`, which changes nothing.
    """
    from .run import find_resume_checkpoint  # the resume policy lives with the rest of the run lifecycle

    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        raise ValueError(f"output dir {str(d)!r} exists and is not a directory")
    if resume:
        return find_resume_checkpoint(d, required=resume != "auto", log=log)
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
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise environment_error(e, d) or e
    clean_stale(d)
    write_json_atomic(d / RUN_FILE, run_info)
    # A run stopped before its first checkpoint may have left metrics: they belong to no run now.
    write_text_atomic(d / "metrics.jsonl", "")
    return d


# Options that may change between a run and its resumption; any other change would make
# the resumed run a different run (other data, model, order or schedule).
RESUMABLE_CHANGES = frozenset({"resume", "progress", "save_every", "keep_checkpoints", "log_every", "eval_batch_size",
                               "cache_dir", "patch", "device", "output_dir"})
# Options holding paths: compared as resolved paths, then by content (a moved or copied file is the same input).
PATH_OPTIONS = frozenset({"model", "data", "eval_data", "test_data"})


def check_resume_config(output_dir: str | os.PathLike, config: dict, *, path_options=PATH_OPTIONS,
                        resumable=RESUMABLE_CHANGES) -> None:
    """Refuse to resume a run with options that change what it computes.

    Options are compared by meaning: numbers by value, paths (``path_options``) as resolved
    paths, and where a path changed, by the content fingerprints stored in run.json at the
    start (:func:`fastlora.train.run.input_fingerprints`), so a moved or copied file, or a run
    dir resumed from another working directory, is the same input."""
    from .run import same_inputs

    run_file = Path(output_dir) / RUN_FILE
    if not run_file.is_file():
        return
    try:
        info = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(run_file, "run.json is not valid JSON; the run cannot be resumed safely") from None
    old = info.get("config", {})
    changed = []
    for k in sorted(config):
        if k not in old or k in resumable or old[k] == config[k]:
            continue
        if k in path_options and same_inputs(k, old[k], config[k], info.get("inputs", {}).get(k),
                                             base=info.get("cwd")):
            continue
        changed.append(k)
    if changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {config[k]!r}" for k in changed)
        raise ValueError(f"--resume: the run in {str(output_dir)!r} was started with other options ({diffs}); "
                         f"resume with the same options or choose another --output-dir")


# ------------------------------------------------------------------- checkpoints
def checkpoint_dirs(output_dir: str | os.PathLike, *, root: str | os.PathLike | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints (their checksums.json was written last), oldest first. ``root``:
    a checkpoints dir other than ``output_dir/checkpoints`` (an emergency location)."""
    root = Path(root) if root is not None else Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and ((p / MANIFEST).is_file() or (p / LEGACY_STATE_FILE).is_file()):
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


# --- state without pickle: tensors go to safetensors, everything else to tagged JSON
def encode_state(obj: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """JSON-able form of ``obj``; its tensors are moved into ``tensors`` under path-like names.
    Tuples, dicts with non-string keys and numpy arrays are tagged so that they come back as they were."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        name = key or "tensor"
        while name in tensors:
            name += "_"
        # contiguous copies on CPU: safetensors refuses views sharing storage
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{key}.{k}" if key else k) for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors, f"{key}.k{i}"), encode_state(v, tensors, f"{key}.{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
        if isinstance(obj, np.generic):
            return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {key or 'the top'!r} in a checkpoint (safetensors + "
                    f"JSON only, no pickle)")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
        if "__ndarray__" in obj:
            import numpy as np

            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    return obj


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(d: Path) -> None:
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": CHECKPOINT_FORMAT,
                "files": {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in files}}
    write_json_atomic(d / MANIFEST, manifest)


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None when every file of the checkpoint matches checksums.json, else what is wrong (naming the file)."""
    path = Path(path)
    if (path / LEGACY_STATE_FILE).is_file() and not (path / MANIFEST).is_file():
        return (f"{LEGACY_STATE_FILE} is a pickle written by an older fastlora; it is not loaded because "
                f"unpickling can run code: start the run again")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing: the checkpoint is incomplete"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return f"{path / MANIFEST} is damaged"
    # adapter/ holds PEFT's format, fastlora's own (bottleneck, BitFit) or a trainer's
    # (the reward model's sequence-classification export, PPO's roles): any file will do here,
    # each trainer's loader names what it misses.
    if not any(rel.startswith("adapter/") for rel in files):
        return f"{MANIFEST} lists no file of adapter/: the checkpoint is incomplete"
    for required in (TENSORS_FILE, STATE_FILE):
        if required not in files:
            return f"{MANIFEST} does not list {required}: the checkpoint is incomplete"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{f} is damaged ({size} bytes, {meta['size']} expected)"
        if sha256_file(f) != meta["sha256"]:
            return f"{f} is damaged (its sha256 does not match {MANIFEST})"
    return None


def check_checkpoint(path: str | os.PathLike) -> None:
    """:func:`verify_checkpoint`, raising :class:`CheckpointError` on a problem. Under torchrun
    every rank checks and every rank raises when one finds a problem (before a sharded load,
    which is a collective, would leave the others waiting)."""
    from . import distributed as dist

    def check() -> None:
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(path, problem)

    dist.agree(check, f"verifying {path}")


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, optimizer, scheduler, trainer: dict,
                    *, keep: int = 2, root: str | os.PathLike | None = None, extra: dict | None = None,
                    sharded=None) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically (adapter, optimizer/scheduler/RNG state as
    safetensors + JSON, checksums), then prune to the ``keep`` newest (0 keeps all).

    ``root`` writes into another checkpoints dir (emergency checkpoints); ``extra`` is any
    further state (nested dicts/lists of tensors and JSON values, e.g. a second optimizer)
    given back by :func:`load_checkpoint` under ``"extra"``.

    Under torchrun EVERY rank calls it and gets the path (or the same error). Without
    ``sharded`` the main rank writes it all (under DDP every rank holds the same weights).
    ``sharded``: the module (an FSDP2 model, or one holding FSDP2 units) whose trainable
    parameters and optimizer state go to ``sharded/`` through DCP, each rank writing its own
    shards; the main rank then writes the rest, the adapter gathered from the shards."""
    from . import distributed as dist

    root = Path(root) if root is not None else Path(output_dir) / CHECKPOINTS
    target = root / f"step-{step:06d}"
    if sharded is None:
        def save() -> Path:
            _prepare_root(root)
            path = write_dir_atomic(target, lambda tmp: _fill_checkpoint(tmp, step, model, optimizer.state_dict(),
                                                                        scheduler, trainer, extra))
            _prune(output_dir, root, keep)
            return path

        return dist.on_main(save, f"writing the checkpoint {target}")

    tensors, groups = sharded_state(sharded, optimizer)
    tmp = Path(dist.on_main(lambda: (_prepare_root(root), str(make_tmp_dir(target)))[1],
                            f"creating the checkpoint dir in {root}"))
    done = False
    try:
        _dcp(lambda: _dcp_save(tensors, tmp / SHARDED_DIR), tmp, "written")
        info = {"dir": SHARDED_DIR, "world_size": dist.world_size(), "param_groups": groups}

        def finish() -> Path:
            _fill_checkpoint(tmp, step, model, None, scheduler, trainer, extra, sharded=info)
            try:
                commit_dir(tmp, target)
            except OSError as e:
                raise environment_error(e, target) or e
            _prune(output_dir, root, keep)
            return target

        with dist.gathered(sharded):  # the adapter/ of the checkpoint, whole, in PEFT's format
            path = dist.on_main(finish, f"writing the checkpoint {target}")
        done = True
    finally:
        if not done and dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _prepare_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise environment_error(e, root) or e
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def _prune(output_dir, root: Path, keep: int) -> None:
    if keep > 0:
        for _, old in checkpoint_dirs(output_dir, root=root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _fill_checkpoint(tmp: Path, step: int, model, optimizer_state: dict | None, scheduler, trainer: dict,
                     extra: dict | None, sharded: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_trainable(model, tmp / "adapter")
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "optimizer": encode_state(optimizer_state, tensors, "optimizer") if optimizer_state is not None else None,
        "scheduler": encode_state(scheduler.state_dict(), tensors, "scheduler") if scheduler is not None else None,
        "rng": encode_state(rng_state(), tensors, "rng"),
        "extra": encode_state(extra, tensors, "extra") if extra is not None else None,
    }
    doc = {"format": CHECKPOINT_FORMAT, "step": step, "trainer": encode_state(trainer, tensors, "trainer"),
           "state": state}
    if sharded is not None:
        doc["sharded"] = encode_state(sharded, tensors, "sharded")
    save_file(tensors, str(tmp / TENSORS_FILE))
    write_json_atomic(tmp / STATE_FILE, doc)
    _write_manifest(tmp)  # last: its presence marks the checkpoint complete


# ------------------------------------------------------- sharded (FSDP) state: DCP
def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the checkpoint holds DCP shards (written by an FSDP run) instead of whole tensors."""
    return (Path(path) / SHARDED_DIR).is_dir()


def sharded_state(module, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``module``'s trainable parameters and ``optimizer``'s state keyed by parameter name, flat
    for DCP (``model.<name>``, ``optim.<name>.<key>``; FSDP2 shards stay DTensors, which DCP
    saves and loads shard by shard), and the optimizer's param groups (hyperparameters, for
    JSON). An optimizer without state yet gets it (a step with zero learning rate, torch's
    own way), so that a load has tensors to fill."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer)
    flat = {f"model.{n}": p.detach() for n, p in module.named_parameters() if p.requires_grad}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if not torch.is_tensor(v):
                raise TypeError(f"optimizer state {name}.{k} is a {type(v).__name__}; a sharded checkpoint stores "
                                "tensors only")
            flat[f"optim.{name}.{k}"] = v
    return flat, osd["param_groups"]


def _dcp_save(tensors: dict, directory: Path) -> None:
    from . import distributed as dist

    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter
    except ImportError as e:
        raise RuntimeError(f"checkpoints of FSDP runs need torch.distributed.checkpoint's safetensors storage "
                           f"(HuggingFaceStorageWriter), missing in torch {torch.__version__}: upgrade torch") from e
    # save_distributed: each rank writes its own shards (their offsets go in the file's JSON header)
    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True)
    with _one_process_is_meant():
        dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_distributed())


def _dcp_load(tensors: dict, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from . import distributed as dist

    with _one_process_is_meant():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=not dist.is_distributed())


@contextlib.contextmanager
def _one_process_is_meant():
    # DCP warns on every call without a process group even when asked for exactly that
    # (no_dist=True): a parallel='fsdp' run on one process (or resumed on one) is meant.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp(call: Callable[[], Any], path: Path, what: str) -> None:
    """Run a DCP save or load. DCP reports a failure on any rank to every rank as one
    ``CheckpointException`` (a BaseException); it is turned into the first failing rank's
    error: an OSError for the environment (full disk...), else a :class:`CheckpointError`
    (reading) or a RuntimeError (writing)."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        call()
    except CheckpointException as e:
        rank, (exc, _) = sorted(e.failures.items())[0]
        env = environment_error(exc, path)
        if env is not None:
            raise env from None
        why = f"the sharded state could not be {what} (rank {rank}: {type(exc).__name__}: {exc})"
        if what == "written":  # not the input's fault
            raise RuntimeError(f"checkpoint {str(path)!r}: {why}") from None
        raise CheckpointError(path, why) from None


def _load_sharded(path: Path, module, optimizer, info: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    tensors, _ = sharded_state(module, optimizer)
    _dcp(lambda: _dcp_load(tensors, path / info["dir"]), path, "read into this model")
    state: dict[str, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            name, k = key[len("optim."):].rsplit(".", 1)
            state.setdefault(name, {})[k] = v
    groups = info["param_groups"]
    _tuple_hyperparameters(groups, optimizer.state_dict()["param_groups"])
    set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups})


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, *, verify: bool = True) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; return the trainer dict
    (with ``"step"``, and ``"extra"`` when the checkpoint has one). Raises :class:`CheckpointError`
    naming the file when the checkpoint is incomplete, damaged or does not fit the model.
    A sharded checkpoint (an FSDP run's) is read back by DCP into ``model``'s trainable
    parameters, sharded or not: under torchrun every rank calls this."""
    from peft.utils import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .peft_methods import load_trainable_state, own_method

    path = Path(path)
    if verify:
        check_checkpoint(path)
    if is_sharded_checkpoint(path):
        return load_training_state(path, optimizer, scheduler, verify=False, module=model)
    _refuse_shards(path, model)
    if own_method(model) is not None:  # the bottleneck adapter or BitFit: fastlora's own format
        try:
            load_trainable_state(model, path / "adapter")
        except FileNotFoundError as e:
            raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {e})") from None
        return load_training_state(path, optimizer, scheduler, verify=False)
    adapter_file = path / "adapter" / "adapter_model.safetensors"
    try:
        device = next(p.device for p in model.parameters())
        weights = load_file(adapter_file, device=str(device))
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {e})") from None
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(path, f"does not fit this model: unexpected keys {unexpected[:5]}")
    return load_training_state(path, optimizer, scheduler, verify=False)


def load_training_state(path: str | os.PathLike, optimizer, scheduler, *, verify: bool = True,
                        module=None) -> dict:
    """The part of :func:`load_checkpoint` after the adapter weights: optimizer, scheduler, RNG and
    the trainer dict. For trainers whose checkpoint ``adapter/`` is not a plain PEFT adapter (the
    reward model's sequence-classification export): they restore it themselves, then call this.
    A sharded checkpoint restores ``module``'s trainable parameters too (from its shards, not
    from adapter/), and the optimizer state, through DCP: every rank calls this then."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from . import distributed as dist

    path = Path(path)
    if verify:
        check_checkpoint(path)

    def read() -> tuple[dict, dict]:
        try:
            return load_file(path / TENSORS_FILE), json.loads((path / STATE_FILE).read_text())
        except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError) as e:
            raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {e})") from None

    tensors, doc = dist.agree(read, f"reading {path}")  # every rank, before the collective load of shards
    state = decode_state(doc["state"], tensors)
    if doc.get("sharded") is not None:
        if module is None:
            raise CheckpointError(path, "holds sharded state (an FSDP run's) but no module was given to load it into")
        _load_sharded(path, optimizer=optimizer, module=module, info=decode_state(doc["sharded"], tensors))
    else:
        _refuse_shards(path, module)
        _load_optimizer(optimizer, state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    out = decode_state(doc["trainer"], tensors) | {"step": doc["step"]}
    if state.get("extra") is not None:
        out["extra"] = state["extra"]
    return out


def _load_optimizer(optimizer, saved: dict) -> None:
    _tuple_hyperparameters(saved.get("param_groups", []), optimizer.state_dict()["param_groups"])
    optimizer.load_state_dict(saved)


def _tuple_hyperparameters(saved_groups: list[dict], current: list[dict]) -> None:
    # JSON turned tuples of hyperparameters (AdamW's betas) into lists: give them their type back.
    for group, now in zip(saved_groups, current):
        for k, v in now.items():
            if isinstance(v, tuple) and isinstance(group.get(k), list):
                group[k] = tuple(group[k])


def _refuse_shards(path: Path, module) -> None:
    from .distributed import is_shard

    if module is not None and any(is_shard(p) for p in module.parameters() if p.requires_grad):
        raise CheckpointError(path, "holds whole tensors (a run without --parallel fsdp); this run is sharded "
                                    "(FSDP) and resumes only from its own sharded checkpoints")


def save_trainable(model, directory, state_dict: dict | None = None) -> None:
    if state_dict is not None:  # FSDP: the gathered tensors, in PEFT's format
        model.save_pretrained(directory, state_dict=state_dict)
        return
    from .peft_methods import save_trainable as save

    save(model, directory)


def save_adapter(model, target: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """The trained adapter, written atomically: PEFT's format (adapter_model.safetensors +
    adapter_config.json), or fastlora's for the bottleneck adapter and BitFit.
    ``state_dict``: the model's (trainable) tensors when the model's own are shards (FSDP)."""
    return write_dir_atomic(target, lambda tmp: save_trainable(model, tmp, state_dict))
