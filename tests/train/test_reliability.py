"""A run is never lost and every environment error names its path: checkpoints without pickle,
fsynced and readable by others, verified by checksums, damaged ones skipped by name; resume
by meaning (moved run dirs, moved or respelled inputs); --resume on nothing / on a finished
run; preflight before the model loads; a full disk at the final save; console output.

A full disk is a real 1-2 MB tmpfs where this process may mount one (root), else the writes
are made to fail with the same OSError; a read-only dir is a tmpfs remounted read-only
(root ignores chmod), else the probe is made to fail the same way."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastlora.train import checkpoint as ckpt
from fastlora.train import run as lifecycle
from tests.helpers import requires_bnb


# ------------------------------------------------------------------ small file systems
@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield bool(ok)
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount_ro(path: Path) -> bool:
    return subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True).returncode == 0


def _fill(path: Path) -> Path:
    """Fill the file system holding ``path`` to the last byte."""
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with contextlib.suppress(OSError):
        with open(filler, "ab") as f:  # the last partial block
            while True:
                f.write(b"\0")
                f.flush()
    return filler


# ------------------------------------------------------------------ tiny models
from tests.train.test_checkpoint import _optim, _tiny_peft  # noqa: E402
from tests.train.test_checkpoint import _train_step as _step  # noqa: E402


@requires_bnb
def test_checkpoints_without_pickle_fsynced_readable_verified(tiny_model_dir, tmp_path, monkeypatch):
    model = _tiny_peft(tiny_model_dir)
    opt, sched = _optim(model)
    _step(model, opt, sched)
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", Path(b).name)) or real_replace(a, b))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", Path(b).name)) or real_rename(a, b))
    trainer = {"micro": 1, "history": [{"step": 1, "loss": 0.1 + 0.2}], "best": None}
    c1 = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, trainer, keep=0)
    monkeypatch.undo()
    expected_draw = torch.rand(3)  # the first draw after the saved RNG state
    # fsync of the files before the checkpoint dir is renamed into place, and after (its parent)
    at = events.index(("rename", "step-000001"))
    assert "fsync" in events[:at] and "fsync" in events[at + 1:]
    json_at = events.index(("replace", ckpt.STATE_FILE))
    assert events[json_at - 1] == "fsync" and events[json_at + 1] == "fsync"  # the file, then its dir

    # No pickle: safetensors + JSON only, and loading never calls torch.load.
    names = sorted(p.relative_to(c1).as_posix() for p in c1.rglob("*") if p.is_file())
    assert names == ["adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     ckpt.MANIFEST, ckpt.TENSORS_FILE, ckpt.STATE_FILE]
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names)
    # The user's umask, not the 0600/0700 of temporary files.
    mask = os.umask(0o022)
    os.umask(mask)
    for p in [c1, c1 / "adapter", *c1.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p

    fresh = _tiny_peft(tiny_model_dir, seed=5)
    opt2, sched2 = _optim(fresh)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    got = ckpt.load_checkpoint(c1, fresh, opt2, sched2)
    monkeypatch.undo()
    assert got["step"] == 1 and got["history"] == trainer["history"] and got["best"] is None
    for (n, p), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, p2), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["betas"] == s1["param_groups"][0]["betas"]
    assert isinstance(s2["param_groups"][0]["betas"], tuple)
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name]), (k, name)
    assert sched2.state_dict() == sched.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)
    rng = torch.get_rng_state()
    _step(model, opt, sched)
    torch.set_rng_state(rng)
    _step(fresh, opt2, sched2)  # same batch, restored state: the same next step
    for (n, p), (_, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, p2), n

    # Damaged checkpoints are named; resume falls back to the newest that verifies.
    c2 = ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {"micro": 2}, keep=0)
    c3 = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"micro": 3}, keep=0)
    assert ckpt.verify_checkpoint(c3) is None
    tensors = c3 / ckpt.TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated
    adapter = c2 / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte, same size
    adapter.write_bytes(bytes(data))
    assert f"{tensors} is damaged" in ckpt.verify_checkpoint(c3)
    assert f"{adapter} is damaged (its sha256" in ckpt.verify_checkpoint(c2)
    with pytest.raises(ckpt.CheckpointError, match=f"{tensors} is damaged"):
        ckpt.load_checkpoint(c3, fresh, opt2, sched2)
    warned = []
    assert ckpt.check_output_dir(tmp_path, resume=True, log=warned.append) == c1
    assert len(warned) == 1 and str(tensors) in warned[0] and str(adapter) in warned[0]
    shutil.rmtree(c1)
    with pytest.raises(ckpt.CheckpointError, match=f"{tensors} is damaged.*no other checkpoint verifies either"):
        ckpt.check_output_dir(tmp_path, resume="auto")
    # A pickled checkpoint of an older fastlora is never unpickled.
    for c in (c2, c3):
        shutil.rmtree(c)
    legacy = tmp_path / "checkpoints" / "step-000004"
    (legacy / "adapter").mkdir(parents=True)
    (legacy / ckpt.LEGACY_STATE_FILE).write_bytes(b"\x80\x04pickle")
    with pytest.raises(ckpt.CheckpointError, match="pickle written by an older fastlora"):
        ckpt.check_output_dir(tmp_path, resume=True)


def test_stale_temp_dirs_are_cleaned_and_interrupted_swaps_undone(tmp_path):
    run = tmp_path / "run"
    ckpt.init_output_dir(run, {"config": {}})
    (run / ".tmp-adapter.x1y2").mkdir()  # killed during the final save
    (run / ".tmp-adapter.x1y2" / "adapter_model.safetensors").write_bytes(b"half")
    (run / ".summary.json.abc.tmp").write_text("{")
    (run / "checkpoints" / ".tmp-step-000004.q").mkdir(parents=True)
    (run / ".old-adapter.123").mkdir()  # killed between the two renames of a replace: the old content
    (run / ".old-adapter.123" / "adapter_config.json").write_text("{}")
    ckpt.clean_stale(run)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "metrics.jsonl", "run.json"]
    assert (run / "adapter" / "adapter_config.json").read_text() == "{}"
    assert list((run / "checkpoints").iterdir()) == []


def test_resume_compares_options_by_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "a"}\n')
    cfg = {"data": ["./data/a.jsonl"], "output_dir": "./runs/x", "lr": 1e-3, "model": None}
    ckpt.init_output_dir("runs/x", lifecycle.run_info(cfg))
    # Other spellings of the same paths, the same number written otherwise: the same run.
    ckpt.check_resume_config("runs/x/", {**cfg, "data": ["data/a.jsonl"], "output_dir": "runs/x/", "lr": 0.001})
    ckpt.check_resume_config("runs/x", {**cfg, "data": [str(tmp_path / "data" / "a.jsonl")]})
    # The run dir and the data moved elsewhere, resumed from another working dir: still the same run.
    shutil.move(str(tmp_path / "runs" / "x"), str(tmp_path / "moved"))
    shutil.copy(tmp_path / "data" / "a.jsonl", tmp_path / "copy.jsonl")
    os.remove(tmp_path / "data" / "a.jsonl")
    monkeypatch.chdir(tmp_path / "data")
    ckpt.check_resume_config(tmp_path / "moved", {**cfg, "data": ["../copy.jsonl"], "output_dir": "../moved"})
    # Other content, or another option: refused, naming it.
    (tmp_path / "copy.jsonl").write_text('{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"other options \(data: \['./data/a.jsonl'\] -> \['../copy.jsonl'\]\)"):
        ckpt.check_resume_config(tmp_path / "moved", {**cfg, "data": ["../copy.jsonl"]})
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.002"):
        ckpt.check_resume_config(tmp_path / "moved", {**cfg, "data": ["../copy.jsonl"], "lr": 2e-3})


def test_preflight_read_only_and_no_space(tmp_path, monkeypatch):
    need, why = lifecycle.estimate_output_bytes(None, lora_r=16, save_every=10, keep_checkpoints=2)
    assert need > 4 << 20 and "3 checkpoints" in why
    lifecycle.preflight(tmp_path / "new" / "run", need_bytes=1)  # creatable: fine, and nothing is written
    assert not (tmp_path / "new").exists()
    with pytest.raises(ckpt.EnvironmentFailure, match=r"not enough free space .* needed \(why\)"):
        lifecycle.preflight(tmp_path / "run", need_bytes=1 << 60, why="why")
    mnt = tmp_path / "ro"
    with _tmpfs(mnt, "1m") as mounted:
        if not (mounted and _remount_ro(mnt)):
            def refuse(*a, **k):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(lifecycle.tempfile, "TemporaryFile", refuse)
        with pytest.raises(ckpt.EnvironmentFailure, match=rf"output dir {mnt}/out \(to be created in {mnt}\) is not "
                                                          r"writable: Read-only file system"):
            lifecycle.preflight(mnt / "out")


def test_environment_errors_are_translated_with_the_path(tmp_path):
    class SafetensorError(Exception):
        pass

    e = ckpt.environment_error(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                               "StorageFull, message: \"No space left on device\" }) (os error 28)"),
                               tmp_path / "adapter")
    assert e.errno == errno.ENOSPC and e.filename == str(tmp_path / "adapter")
    assert ckpt.describe_os_error(e) == (f"No space left on device: {tmp_path / 'adapter'} (errno 28); free some "
                                         "space or choose another --output-dir")
    assert ckpt.environment_error(ValueError("bad value"), tmp_path) is None
    assert ckpt.environment_error(OSError(errno.ENOENT, "x"), tmp_path) is None  # a missing input is not the disk


@requires_bnb
def test_full_disk_at_the_final_save_keeps_the_run(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch, capsys):
    """Training fills the disk; the final save fails; the emergency checkpoint goes to the rescue
    dir; the CLI says where in one line (exit 1); --resume finishes the run from it."""
    from fastlora import cli
    from fastlora.train import sft

    monkeypatch.setattr(lifecycle, "rescue_root", lambda: tmp_path / "rescue")
    out = tmp_path / "disk" / "run"
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(chat_jsonl), "--output-dir", str(out),
            "--max-steps", "3", "--batch-size", "4", "--no-measure-forgetting", "--no-progress", "--no-patch",
            "--lora-r", "2", "--max-length", "48", "--eval-split", "0", "--target-modules", "q_proj", "v_proj"]
    with _tmpfs(tmp_path / "disk", "8m") as mounted:
        filler = []
        if mounted:
            def on_last_step(step, metrics):
                if step == 3:
                    filler.append(_fill(tmp_path / "disk"))
        else:  # the same OSError a full disk gives, for every write into the run dir
            real = ckpt.write_dir_atomic

            def full(target, fill):
                if str(target).startswith(str(out)):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
                return real(target, fill)

            def on_last_step(step, metrics):
                if step == 3:
                    monkeypatch.setattr(ckpt, "write_dir_atomic", full)

        monkeypatch.setattr("fastlora.train.sft", lambda cfg: sft(cfg, on_step=on_last_step))
        assert cli.main(argv) == 1
        err = capsys.readouterr()
        line = [x for x in err.err.splitlines() if x.startswith("fastlora sft: error:")]
        assert len(line) == 1 and "Traceback" not in err.err
        assert f"could not save the adapter to {out / 'adapter'}" in line[0]
        rescue = lifecycle.rescue_dir(out) / "checkpoints" / "step-000003"
        assert f"emergency checkpoint: {rescue / 'adapter'}" in line[0] and "--resume" in line[0]
        assert ckpt.verify_checkpoint(rescue) is None
        assert not (out / "adapter").exists() and not (out / "summary.json").exists()
        assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
        assert not [p for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else True

        # Space again: --resume writes the adapter from the emergency checkpoint, trains nothing more.
        for f in filler:
            f.unlink()
        monkeypatch.undo()
        monkeypatch.setattr(lifecycle, "rescue_root", lambda: tmp_path / "rescue")
        assert cli.main(argv + ["--resume"]) == 0
        out_text = capsys.readouterr().out
        assert "resumed from" in out_text and "step-000003" in out_text
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 3
        from safetensors.torch import load_file

        saved = load_file(out / "adapter" / "adapter_model.safetensors")
        assert saved.keys() and all(torch.isfinite(v).all() for v in saved.values())
        assert not lifecycle.rescue_dir(out).exists()  # cleaned once the run is complete


@requires_bnb
def test_no_progress_output_finished_run_and_moved_run_dir(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch, capsys):
    """--no-progress prints data stats, a line per logged step and the summary; no third-party
    FutureWarning reaches the user; --resume of a finished run changes nothing; a run killed at
    step 3, moved, with its newest checkpoint damaged, resumes from the one before (named) with
    the same losses as the uninterrupted run."""
    import warnings

    from fastlora.train import SFTConfig, sft

    def cfg(out, **kw):
        base = dict(model=str(tiny_model_dir), data=[str(chat_jsonl)], output_dir=str(out), max_steps=4,
                    batch_size=4, lr=5e-3, warmup_steps=1, eval_split=0.0, max_length=48, measure_forgetting=False,
                    progress=False, lora_r=2, lora_alpha=4, lora_dropout=0.1, seed=3, log_every=2,
                    target_modules=["q_proj", "v_proj"], patch=False)
        return SFTConfig(**(base | kw))

    def losses(out):
        return {r["step"]: r["loss"] for r in ckpt.read_jsonl(out / "metrics.jsonl") if "event" not in r}

    a = tmp_path / "a"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft(cfg(a, log_every=1))
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                and "transformers" in w.filename], [str(w.message) for w in caught]
    captured = capsys.readouterr()
    out = captured.out
    assert "Loading weights" not in captured.err  # transformers' model-loading bars are off too
    assert "train data: 24/24 examples kept" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]
    assert f"adapter saved to {a / 'adapter'}" in out and "final train loss" in out
    losses_a = losses(a)

    # --resume on the finished run: says so, returns its summary, touches nothing.
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in a.rglob("*") if p.is_file()}
    summary = sft(cfg(a, resume=True, log_every=1))
    assert summary["steps"] == 4 and "is finished" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in a.rglob("*") if p.is_file()} == before

    # Killed after step 3 (checkpoints at 2 and 3), moved, newest checkpoint damaged.
    b = tmp_path / "b"

    def kill(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sft(cfg(b, save_every=1), on_step=kill)
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(str(b), str(moved))
    damaged = moved / "checkpoints" / "step-000003" / ckpt.TENSORS_FILE
    damaged.write_bytes(damaged.read_bytes()[:64])
    (moved / ".tmp-adapter.stale").mkdir()  # left by a kill during a final save
    capsys.readouterr()
    monkeypatch.chdir(tmp_path / "elsewhere")
    sft(cfg("b/", save_every=1, resume=True, data=[os.path.relpath(chat_jsonl)]))
    out = capsys.readouterr().out
    assert f"b/checkpoints/step-000003/{ckpt.TENSORS_FILE} is damaged" in out
    assert "resumed from b/checkpoints/step-000002 at step 2/4" in out
    assert not (moved / ".tmp-adapter.stale").exists()
    # log_every=2 here: steps 2 (from before the kill) and 4 are logged; their losses are run a's.
    got = losses(moved)
    assert sorted(got) == [2, 4]
    for s in got:
        assert got[s] == pytest.approx(losses_a[s], rel=1e-6, abs=1e-7), (s, got, losses_a)


def test_progress_off_a_terminal_is_plain_lines_at_the_logging_interval():
    import io

    from fastlora.train.console import Console

    out, err = io.StringIO(), io.StringIO()  # a log file: not a terminal
    console = Console(progress=True, stream=out, bar_stream=err)
    assert console.bars is False
    with console.progress(5, desc="sft", log_every=2) as bar:
        for step in range(1, 6):
            bar.update(step, {"loss": 1.0 / step, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_second": 100.0,
                              "reward": 0.25})
        console.log("adapter saved")
    lines = out.getvalue().splitlines()
    assert lines == ["step 2/5  loss 0.5000  lr 1.00e-04  grad_norm 0.500  tok/s 100  reward 0.25",
                     "step 4/5  loss 0.2500  lr 1.00e-04  grad_norm 0.500  tok/s 100  reward 0.25",
                     "step 5/5  loss 0.2000  lr 1.00e-04  grad_norm 0.500  tok/s 100  reward 0.25",
                     "adapter saved"]
    assert err.getvalue() == "" and "\r" not in out.getvalue()


def test_full_disk_during_a_checkpoint_names_the_disk_and_training_goes_on(tmp_path, monkeypatch):
    """Before: ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos``."""
    from safetensors.torch import save_file

    class Adapter:  # writes its weights with safetensors, as PEFT does
        def save_pretrained(self, d):
            Path(d).mkdir(parents=True, exist_ok=True)
            save_file({"w": torch.ones(64, 1024)}, str(Path(d) / "adapter_model.safetensors"))

    param = torch.nn.Parameter(torch.zeros(64, 1024))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones_like(param)
    opt.step()
    out = tmp_path / "disk"
    with _tmpfs(out, "1m") as mounted:
        if mounted:
            _fill(out)
        else:
            real = ckpt.write_dir_atomic
            monkeypatch.setattr(ckpt, "write_dir_atomic", lambda t, f: real(t, lambda d: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))))
        with pytest.raises(OSError) as info:
            ckpt.save_checkpoint(out, 5, Adapter(), opt, None, {"micro": 5})
        assert info.value.errno == errno.ENOSPC and str(out / "checkpoints") in info.value.filename
        assert not [p for p in (out / "checkpoints").iterdir()]  # no half-written checkpoint left
        warned = []

        class Log:
            warn = warned.append

        assert lifecycle.try_checkpoint(lambda: ckpt.save_checkpoint(out, 5, Adapter(), opt, None, {}), log=Log) is None
        assert len(warned) == 1 and "No space left on device" in warned[0] and "training goes on" in warned[0]
