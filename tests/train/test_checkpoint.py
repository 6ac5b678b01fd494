"""Atomic checkpoints and output-dir protection: a write killed half-way leaves the previous
checkpoint complete and loadable; a directory holding a run is never overwritten."""
from __future__ import annotations

import json

import pytest
import torch

from fastlora.train import checkpoint as ckpt
from tests.helpers import assert_close, requires_bnb


def _tiny_peft(model_dir, seed=0):
    from fastlora.train.model import add_lora, load_base

    base = load_base(model_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(seed)
    return add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _optim(model):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    return opt, get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)


def _train_step(model, opt, sched):
    x = torch.randint(0, 1000, (2, 9))
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


@requires_bnb
def test_checkpoint_roundtrip_and_kill_mid_write(tiny_model_dir, tmp_path, monkeypatch):
    model = _tiny_peft(tiny_model_dir)
    opt, sched = _optim(model)
    _train_step(model, opt, sched)
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"micro": 1, "note": "first"}, keep=2)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    expected_draw = torch.rand(3)  # the first draw after the saved RNG state

    # A second save killed half-way through writing (after the adapter, before the state).
    _train_step(model, opt, sched)

    def dying_save(*a, **k):
        raise KeyboardInterrupt

    # the optimizer state is written with safetensors (no pickle) after the adapter
    monkeypatch.setattr("safetensors.torch.save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {"micro": 2}, keep=1)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000001"]

    # A fresh model restored from the surviving checkpoint has its weights, optimizer, schedule, RNG.
    fresh = _tiny_peft(tiny_model_dir, seed=7)
    opt2, sched2 = _optim(fresh)
    trainer = ckpt.load_checkpoint(good, fresh, opt2, sched2)
    assert trainer["step"] == 1 and trainer["note"] == "first"
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert_close(p, saved[n], rtol=0, atol=0, msg=n)
    assert sched2.state_dict()["last_epoch"] == 1
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert torch.equal(torch.rand(3), expected_draw)

    # The next successful save prunes the old one and leftover temp dirs.
    ckpt.save_checkpoint(tmp_path, 3, fresh, opt2, sched2, {"micro": 3}, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]


def test_output_dir_holding_a_run_is_refused_and_untouched(tmp_path):
    from fastlora.train.run import RunFinished

    run = tmp_path / "run"
    ckpt.init_output_dir(run, {"config": {"lr": 1}})
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ValueError, match=r"already holds a run.*--resume"):
        ckpt.check_output_dir(run, resume=False)
    # Stopped before its first checkpoint: --resume says there is nothing to continue from,
    # --resume=auto starts it over.
    with pytest.raises(ValueError, match=r"no checkpoint to continue from.*--resume=auto"):
        ckpt.check_output_dir(run, resume=True)
    assert ckpt.check_output_dir(run, resume="auto") is None
    (run / "summary.json").write_text('{"steps": 3}')
    before["summary.json"] = b'{"steps": 3}'
    # A finished run: --resume (either kind) says so and changes nothing.
    for mode in (True, "auto"):
        with pytest.raises(RunFinished, match="is finished") as info:
            ckpt.check_output_dir(run, resume=mode)
        assert info.value.summary == {"steps": 3}
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # An empty or missing dir: fresh start; --resume there says there is no run to resume.
    assert ckpt.check_output_dir(tmp_path / "new", resume=False) is None
    with pytest.raises(ValueError, match=r"no run to resume.*--resume=auto"):
        ckpt.check_output_dir(tmp_path / "new", resume=True)
    assert ckpt.check_output_dir(tmp_path / "new", resume="auto") is None
    (tmp_path / "empty").mkdir()
    assert ckpt.check_output_dir(tmp_path / "empty", resume=False) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ckpt.check_output_dir(tmp_path / "file", resume=False)


def test_resume_refuses_changed_options(tmp_path):
    ckpt.init_output_dir(tmp_path, {"config": {"lr": 1e-3, "seed": 0, "progress": True}})
    ckpt.check_resume_config(tmp_path, {"lr": 1e-3, "seed": 0, "progress": False})  # display only: fine
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        ckpt.check_resume_config(tmp_path, {"lr": 1e-3, "seed": 1, "progress": True})


def test_write_dir_atomic_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "adapter"
    ckpt.write_dir_atomic(target, lambda d: (d / "a.txt").write_text("old"))

    def half(d):
        (d / "a.txt").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.write_dir_atomic(target, half)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dir left behind
    ckpt.write_dir_atomic(target, lambda d: (d / "b.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_jsonl_reader_skips_a_truncated_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    ckpt.append_jsonl(p, {"step": 1})
    ckpt.append_jsonl(p, {"step": 2})
    with open(p, "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-line
    assert ckpt.read_jsonl(p) == [{"step": 1}, {"step": 2}]
    ckpt.write_json_atomic(tmp_path / "s.json", {"a": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}
