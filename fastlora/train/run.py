"""The life cycle of a training run, shared by every trainer (SFT, reward model, PPO).

A trainer adopts it in five calls (``fastlora.train.sft`` is the worked example)::

    from . import checkpoint as ckpt, run as lifecycle
    from .console import Console, quiet_third_party

    console = Console(cfg.progress)
    resume_from = ckpt.check_output_dir(out, resume=cfg.resume, log=console.warn)  # RunFinished if done
    if resume_from is not None:
        ckpt.check_resume_config(out, cfg.to_dict())
    lifecycle.preflight_run(out, cfg, model_path)  # before loading: writable, and room for what the run writes
    ...
    if resume_from is None:
        ckpt.init_output_dir(out, lifecycle.run_info(cfg.to_dict(), ...))    # run.json with input fingerprints
    else:
        ckpt.clean_stale(out)
    ...train, calling ckpt.save_checkpoint / lifecycle.try_checkpoint...
    adapter = lifecycle.save_final_adapter(model, out, log=console,
                                           emergency=lambda root: ckpt.save_checkpoint(..., root=root, keep=0))
    ...write the summary..., then lifecycle.finish(out, log=console)

What each piece guarantees:

- :func:`preflight` fails in a second, before the model loads, when the output dir cannot be
  written or its file system lacks the space the adapter and checkpoints will need.
- :func:`find_resume_checkpoint` (called by ``check_output_dir``) gives ``--resume`` a meaning:
  a finished run raises :class:`RunFinished` and nothing is touched; ``resume=True`` with no
  checkpoint is an error; ``resume="auto"`` starts fresh then; a damaged checkpoint is named and
  the newest one that verifies is used.
- :func:`save_final_adapter` never loses a finished run: when the adapter cannot be written,
  an emergency checkpoint goes to the run's ``checkpoints/`` or, failing that, to a rescue dir
  under the system temp dir that ``--resume`` of the same output dir finds; the error says where.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import checkpoint as ckpt
from .checkpoint import CHECKPOINTS, CheckpointError, EnvironmentFailure, environment_error

RESCUE_FILE = "rescue.json"  # in the output dir: where the emergency checkpoint went
_LARGE = 256 << 20  # files above this are fingerprinted by samples, not hashed whole (model weights)
_SAMPLE = 4 << 20


def start(config_cls, config, overrides: dict, source: str, body: Callable, on_step=None, *, enabled: bool = True):
    """What every trainer's entry point does: build its config (``config`` with ``overrides``
    replacing fields, or ``config_cls(**overrides)``), resolve its task defaults, and run
    ``body(cfg, console, on_step)`` with the shared console and third-party warnings quieted.
    A finished run (``resume`` on it) returns its summary untouched. ``enabled=False`` (the
    non-main ranks of a distributed run) prints nothing."""
    from .console import Console, quiet_third_party

    if config is None:
        cfg = config_cls.from_dict(overrides, source=source)
    else:
        cfg = config_cls.from_dict({**config.to_dict(), **overrides}, source=source) if overrides else config
    cfg = cfg.resolved()
    log = Console(cfg.progress, enabled=enabled)
    with quiet_third_party(bars=log.bars):
        try:
            return body(cfg, log, on_step)
        except RunFinished as done:
            log(str(done))
            return done.summary


class RunFinished(Exception):
    """``--resume`` on a run that already finished: nothing is done, nothing is changed."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        summary = self.output_dir / "summary.json"
        try:
            self.summary = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            self.summary = {}
        super().__init__(f"the run in {str(output_dir)!r} is finished ({summary} exists); nothing to resume. "
                         f"The adapter is in {self.output_dir / 'adapter'}; choose another --output-dir to train again")


class FinalSaveFailed(EnvironmentFailure):
    """The final adapter could not be written where asked; ``rescued`` is where it went instead (or None)."""

    def __init__(self, err: OSError, message: str, rescued: Path | None):
        super().__init__(err.errno or errno.EIO, message, err.filename)
        self.rescued = rescued


def optimizer_step(params, optimizer, scheduler=None, max_grad_norm: float = 0.0) -> float | None:
    """One optimizer step of every trainer: clip the gradients (when ``max_grad_norm`` > 0),
    step the optimizer (and the scheduler), zero the gradients. Returns the gradient norm
    before clipping (a float, gathered from its shards under FSDP), or None unclipped."""
    import torch

    grad_norm = None
    if max_grad_norm > 0:
        grad_norm = clip_grad_norm(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def clip_grad_norm(params, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``, also over a mix of FSDP2 shards and whole tensors
    (the reward model under FSDP: sharded LoRA, a replicated head), which torch's one call
    cannot stack: the norm of each kind, then the norm of the two, then one clip factor."""
    import torch

    from .distributed import is_shard

    params = [p for p in params if p.grad is not None]
    shards = [p for p in params if is_shard(p)]
    if not shards or len(shards) == len(params):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    plain = [p for p in params if not is_shard(p)]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in (shards, plain)]
    norms = [float(n.full_tensor() if hasattr(n, "full_tensor") else n) for n in norms]  # the shards': all ranks
    total = torch.tensor(norms, dtype=torch.float64).norm().float()
    for group in (shards, plain):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- resume policy
def rescue_root() -> Path:
    """Where emergency checkpoints go when the output dir cannot take them."""
    return Path(tempfile.gettempdir()) / "fastlora-rescue"


def rescue_dir(output_dir: str | os.PathLike) -> Path:
    """The rescue dir of one output dir: named after it, so ``--resume`` finds it again."""
    resolved = os.path.realpath(output_dir)
    return rescue_root() / f"{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"


def _rescue_checkpoint_roots(output_dir: Path) -> list[Path]:
    roots = [rescue_dir(output_dir) / CHECKPOINTS]
    marker = output_dir / RESCUE_FILE
    if marker.is_file():
        try:
            roots.insert(0, Path(json.loads(marker.read_text())["checkpoints"]))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            pass
    return list(dict.fromkeys(roots))


def resume_candidates(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of the run, newest first: its own, then emergency ones elsewhere."""
    d = Path(output_dir)
    found = list(ckpt.checkpoint_dirs(d))
    for root in _rescue_checkpoint_roots(d):
        found += ckpt.checkpoint_dirs(d, root=root)
    # Newest step first; at equal steps the run dir's own copy first (sorted is stable).
    return sorted(found, key=lambda sp: -sp[0])


def find_resume_checkpoint(output_dir: str | os.PathLike, *, required: bool,
                           log: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newest that verifies.

    Raises :class:`RunFinished` for a finished run, :class:`CheckpointError` when checkpoints exist
    but none verifies, and ValueError when ``required`` and there is no checkpoint at all."""
    warn = log or _warn
    d = Path(output_dir)
    if ckpt.is_finished(d):
        raise RunFinished(d)
    damaged = []
    for _, path in resume_candidates(d):
        problem = ckpt.verify_checkpoint(path)
        if problem is None:
            if damaged:
                warn(f"resuming from {path}, the newest checkpoint that verifies (skipped: "
                     + "; ".join(f"{p}: {why}" for p, why in damaged) + ")")
            return path
        damaged.append((path, problem))
    if damaged:
        raise CheckpointError(damaged[0][0], damaged[0][1] + (
            "; no other checkpoint verifies either (" + "; ".join(f"{p}: {why}" for p, why in damaged[1:]) + ")"
            if len(damaged) > 1 else "; there is no other checkpoint") +
            ". Start over with another --output-dir")
    if required:
        if ckpt.holds_run(d):
            raise ValueError(f"--resume: the run in {str(d)!r} has no checkpoint to continue from (it stopped before "
                             f"its first --save-every checkpoint); use --resume=auto to start it over in place")
        raise ValueError(f"--resume: there is no run to resume in {str(d)!r}; start without --resume, or use "
                         f"--resume=auto (start if absent, continue if present)")
    return None


# ------------------------------------------------------------ input identity
def fingerprint(path: str | os.PathLike) -> str | None:
    """Content identity of a file or a directory (None if absent). Files up to 256 MiB are hashed
    whole; larger ones (model weights) by size and three 4 MiB samples, so that resuming an 8B run
    does not read 16 GB."""
    p = Path(path)
    if p.is_file():
        size = p.stat().st_size
        if size <= _LARGE:
            return "sha256:" + ckpt.sha256_file(p)
        h = hashlib.sha256(str(size).encode())
        with open(p, "rb") as f:
            for at in (0, size // 2, size - _SAMPLE):
                f.seek(at)
                h.update(f.read(_SAMPLE))
        return f"sampled:{size}:{h.hexdigest()}"
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(f.relative_to(p).as_posix().encode() + b"\0" + (fingerprint(f) or "").encode() + b"\n")
        return "dir:" + h.hexdigest()
    return None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [os.fspath(v) for v in value]
    return [os.fspath(value)]


def input_fingerprints(config: dict, keys=ckpt.PATH_OPTIONS) -> dict[str, list[dict]]:
    """``{option: [{"path": absolute path, "fingerprint": ...}, ...]}`` for the path options of ``config``."""
    out = {}
    for k in sorted(keys):
        paths = _as_list(config.get(k))
        if paths:
            out[k] = [{"path": os.path.abspath(p), "fingerprint": fingerprint(p)} for p in paths]
    return out


def run_info(config: dict, **more: Any) -> dict:
    """What run.json records: the config, the working dir its relative paths meant, and the
    fingerprints of its inputs (so a moved or copied input still resumes)."""
    return {"config": config, "cwd": os.getcwd(), "inputs": input_fingerprints(config), **more}


def same_inputs(key: str, old: Any, new: Any, stored: list[dict] | None, *, base: str | None = None) -> bool:
    """Whether the path option ``key`` names the same inputs as at the start: the same resolved
    paths, or where a path differs, the same content (fingerprint recorded in run.json)."""
    old_l, new_l = _as_list(old), _as_list(new)
    if len(old_l) != len(new_l):
        return False
    for i, (o, n) in enumerate(zip(old_l, new_l)):
        o_abs = stored[i]["path"] if stored and i < len(stored) else os.path.join(base or os.getcwd(), o)
        if os.path.realpath(o_abs) == os.path.realpath(n):
            continue
        fp = stored[i].get("fingerprint") if stored and i < len(stored) else None
        if fp is None or fingerprint(n) != fp:
            return False
    return True


# -------------------------------------------------------------------- preflight
def lora_params(model_config: dict, r: int, target_modules: list[str] | str = "all-linear") -> int | None:
    """LoRA parameters of a decoder (Llama/Mistral/Qwen naming) from its config.json, or None if unknown."""
    cfg = model_config.get("text_config", model_config)
    try:
        h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
    except KeyError:
        return None
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    if target_modules == "all-linear":
        chosen = list(shapes.values())
    else:
        names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        # a name we do not know (fused qkv, ...) counts as the largest projection
        chosen = [shapes.get(n, (max(h, inter), max(h, inter))) for n in names]
    return layers * sum(r * (i + o) for i, o in chosen)


def estimate_output_bytes(model_path: str | os.PathLike | None, *, lora_r: int, target_modules="all-linear",
                          save_every: int = 0, keep_checkpoints: int = 2, optimizer_bytes_per_param: int = 8,
                          copies: int = 1) -> tuple[int, str]:
    """Bytes the output dir needs (final adapter, plus the checkpoints kept and the one being
    written), from the model's config.json and the LoRA sizes; and a short explanation.
    ``copies``: adapters trained at once (PPO's policy and critic)."""
    params = None
    weights = 0
    if model_path is not None:
        mp = Path(model_path)
        try:
            params = lora_params(json.loads((mp / "config.json").read_text()), lora_r, target_modules)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            params = None
        weights = sum(f.stat().st_size for f in mp.glob("*.safetensors")) if mp.is_dir() else 0
    if params is None:
        params = max(weights // 40, 1 << 20)  # LoRA r=16 on a 7B model is ~1/40 of its 4-bit size
    params *= copies
    adapter = params * 4  # fp32 LoRA weights
    checkpoint = adapter + params * optimizer_bytes_per_param
    n_ckpt = (keep_checkpoints or 10) + 1 if save_every else 0
    need = adapter + n_ckpt * checkpoint + (4 << 20)  # + metrics, plots, summaries
    why = (f"{params / 1e6:.1f}M LoRA parameters: adapter {_mb(adapter)}"
           + (f", {n_ckpt} checkpoints of {_mb(checkpoint)}" if n_ckpt else "") + ", 4 MB of logs")
    return need, why


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def preflight_run(output_dir: str | os.PathLike, cfg, model_path, copies: int = 1) -> None:
    """:func:`preflight` with the space a trainer's run of ``cfg`` writes (its ``lora_r``,
    ``target_modules``, ``save_every``, ``keep_checkpoints``; ``copies`` adapters)."""
    need, why = estimate_output_bytes(model_path, lora_r=cfg.lora_r, target_modules=cfg.target_modules,
                                      save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints, copies=copies)
    preflight(output_dir, need_bytes=need, why=why)


def preflight(output_dir: str | os.PathLike, *, need_bytes: int = 0, why: str = "") -> None:
    """Check, writing nothing that stays, that ``output_dir`` (or the dir it will be created in) can
    be written and has ``need_bytes`` free. Raises :class:`EnvironmentFailure` saying what to do."""
    d = Path(output_dir)
    probe_dir = d if d.is_dir() else ckpt.existing_ancestor(d)
    if not probe_dir.is_dir():
        raise ValueError(f"output dir {str(d)!r}: {probe_dir} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe_dir, prefix=".fastlora-probe."):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.EACCES, errno.EPERM):
            reason += " (you lack write permission there)"
        where = str(d) if probe_dir == d else f"{d} (to be created in {probe_dir})"
        raise EnvironmentFailure(e.errno or errno.EIO, f"output dir {where} is not writable: {reason}; "
                                 f"choose another --output-dir", d) from None
    free = ckpt.free_bytes(probe_dir)
    if need_bytes and free < need_bytes:
        raise EnvironmentFailure(errno.ENOSPC, (
            f"not enough free space for {d}: about {_mb(need_bytes)} needed ({why}), {_mb(free)} free on "
            f"{probe_dir}; free some space, choose another --output-dir, or save fewer checkpoints "
            f"(--save-every, --keep-checkpoints)"), d)


# ------------------------------------------------------------- saving at the end
def save_final_adapter(model, output_dir: str | os.PathLike, *, log=None,
                       emergency: Callable[[Path], Path] | None = None, name: str = "adapter",
                       state_dict: dict | None = None, sharded=None) -> Path:
    """Write ``output_dir/<name>`` atomically. If the environment refuses (full disk, read-only,
    permission), the trained weights are not lost: ``emergency(checkpoints_root)`` (a trainer's
    ``save_checkpoint(..., root=root, keep=0)``) writes an emergency checkpoint into the run's
    ``checkpoints/``, else into :func:`rescue_dir`, and :class:`FinalSaveFailed` says where it went
    and that ``--resume`` finishes the run. Without ``emergency`` the adapter alone goes to the
    rescue dir.

    Under torchrun EVERY rank calls it: the main rank writes, the others wait, and a failure
    ends the same way on every rank; ``emergency`` is then called on every rank (a sharded
    checkpoint is a collective; ``checkpoint.save_checkpoint`` is safe to call on all).
    ``sharded``: the FSDP2-sharded module whose trainable parameters ``model`` saves; they
    are gathered on every rank around the write (:func:`distributed.gathered`)."""
    from . import distributed as dist

    out = Path(output_dir)
    target = out / name

    def write(where: Path) -> Path:
        with dist.gathered(sharded) if sharded is not None else contextlib.nullcontext():
            return dist.on_main(lambda: ckpt.save_adapter(model, where, state_dict=state_dict), f"writing {where}")

    try:
        return write(target)
    except Exception as e:
        err = environment_error(e, target)
        if err is None:
            raise
    warn = getattr(log, "warn", None) or _warn
    warn(f"could not save the trained {name}: {ckpt.describe_os_error(err)}")
    attempts = []
    roots = [out / CHECKPOINTS, rescue_dir(out) / CHECKPOINTS] if emergency else [rescue_dir(out)]
    for root in roots:
        try:
            if emergency is not None:
                saved = emergency(root) / "adapter"
                if root != out / CHECKPOINTS and dist.is_main():
                    _write_rescue_marker(out, root)
            else:
                saved = write(root / name)
        except Exception as e2:
            e2env = environment_error(e2, root)
            if e2env is None:
                raise
            attempts.append(ckpt.describe_os_error(e2env))
            continue
        what = "an emergency checkpoint" if emergency is not None else "a rescue copy"
        finish = ("free some space (or fix the permissions) and run the same command with --resume: it writes "
                  f"{target} and finishes the run" if emergency is not None else f"copy it to {target}")
        raise FinalSaveFailed(err, f"could not save the {name} to {target} ({err.strerror}); the trained {name} is "
                                   f"safe in {what}: {saved}. To finish, {finish}", saved.parent) from None
    raise FinalSaveFailed(err, f"could not save the {name} to {target} ({err.strerror}), nor an emergency copy ("
                               + "; ".join(attempts) + "); the trained weights are lost once this process ends", None)


def _write_rescue_marker(out: Path, root: Path) -> None:
    try:  # a few bytes may still fit where megabytes did not; rescue_dir() is found without it anyway
        ckpt.write_json_atomic(out / RESCUE_FILE, {"checkpoints": str(root), "time": time.time()})
    except OSError:
        pass


def report_interrupt(output_dir: str | os.PathLike, step: int, log) -> None:
    """What Ctrl-C (or an exception from ``on_step``) leaves behind, said once by every trainer."""
    last = ckpt.latest_checkpoint(output_dir)
    log(f"interrupted at step {step}; " + (f"last complete checkpoint: {last} (continue with --resume)"
                                           if last else "no checkpoint was saved (set save_every to allow resuming)"))


def try_checkpoint(save: Callable[[], Path], *, log=None) -> Path | None:
    """Run an intermediate ``save_checkpoint``; when the environment refuses (full disk...), warn
    and go on training: the previous checkpoint stays valid and the final save has its fallbacks."""
    try:
        return save()
    except Exception as e:
        err = environment_error(e, "checkpoint")
        if err is None:
            raise
        warn = getattr(log, "warn", None) or _warn
        warn(f"checkpoint not written ({ckpt.describe_os_error(err)}); training goes on from memory")
        return None


def finish(output_dir: str | os.PathLike, *, log=None) -> None:
    """After the final adapter and summary are written: drop the run's emergency copies."""
    import shutil

    out = Path(output_dir)
    for root in _rescue_checkpoint_roots(out):
        if root.is_dir() and root.parent != out:
            shutil.rmtree(root.parent, ignore_errors=True)
    (out / RESCUE_FILE).unlink(missing_ok=True)


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl``; a full disk costs log lines (warned once), never the run."""

    def __init__(self, path: str | os.PathLike, *, log=None, enabled: bool = True):
        self.path = Path(path)
        self.log = log
        self.failed = False
        self.enabled = enabled  # False on the non-main ranks of a distributed run

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        try:
            ckpt.append_jsonl(self.path, rec)
        except OSError as e:
            err = environment_error(e, self.path)
            if err is None:
                raise
            if not self.failed:
                warn = getattr(self.log, "warn", None) or _warn
                warn(f"metrics not logged ({ckpt.describe_os_error(err)}); training goes on")
            self.failed = True
