"""In one process: the pieces the distributed trainers add to the run machinery.

- a sharded checkpoint (DCP's safetensors storage, what an FSDP run writes) round-trips a
  module's trainable parameters and its AdamW state exactly, holds no pickle, verifies, and
  refuses a module it does not fit, naming the checkpoint;
- ``global_whiten`` is ``rl.whiten`` in one process; ``average_gradients`` and the
  collective-safe writers are the single-process identity;
- resuming on another number of processes is allowed exactly when the global batch stays.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastlora.train import checkpoint as ckpt
from fastlora.train import distributed as dist


class _Tiny(torch.nn.Module):
    def __init__(self, seed: int, rows: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Linear(5, rows, bias=False)
        self.frozen = torch.nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(rows, 5, generator=g))

    def save_pretrained(self, path) -> None:  # what save_checkpoint writes as adapter/
        from pathlib import Path

        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"a": self.a.weight.detach().contiguous()}, f"{path}/adapter_model.safetensors")


def _trained(seed: int):
    m = _Tiny(seed)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for i in range(3):
        m.a(torch.randn(4, 5, generator=torch.Generator().manual_seed(i))).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return m, opt, sched


def test_sharded_checkpoint_round_trips_exactly_without_pickle(tmp_path):
    m, opt, sched = _trained(0)
    path = ckpt.save_checkpoint(tmp_path, 3, m, opt, sched, {"micro": 7}, sharded=m)
    assert ckpt.is_sharded_checkpoint(path) and ckpt.verify_checkpoint(path) is None
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files  # no pickle anywhere
    assert "sharded/shard-00001-model-00001-of-00001.safetensors" in files and "adapter/adapter_model.safetensors" in files
    assert not any(p.name.startswith(".tmp-") for p in path.parent.iterdir())

    fresh = _Tiny(1)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    frozen_before = fresh.frozen.weight.clone()
    state = ckpt.load_checkpoint(path, fresh, opt2, sched2)
    assert state["step"] == 3 and state["micro"] == 7
    assert torch.equal(fresh.a.weight, m.a.weight)
    assert torch.equal(fresh.frozen.weight, frozen_before)  # frozen parameters are not the checkpoint's
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]  # lr as the scheduler left it, betas a tuple again
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(s1["state"][0][k], s2["state"][0][k]), k
    assert sched2.state_dict() == sched.state_dict()

    # the same step again from both: the same parameters
    for mod, o in ((m, opt), (fresh, opt2)):
        mod.a(torch.ones(2, 5)).sum().backward()
        o.step()
    assert torch.equal(fresh.a.weight, m.a.weight)

    # a module of another shape: refused, naming the checkpoint; a whole-tensor one: refused by kind
    other = _Tiny(2, rows=4)
    opt3 = torch.optim.AdamW([other.a.weight], lr=0.1)
    with pytest.raises(ckpt.CheckpointError, match="step-000003.*could not be read into this model"):
        ckpt.load_checkpoint(path, other, opt3, None)
    damaged = path / "sharded" / "shard-00001-model-00001-of-00001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ckpt.CheckpointError, match="shard-00001.*sha256"):
        ckpt.load_checkpoint(path, fresh, opt2, sched2)


def test_global_helpers_in_one_process():
    from fastlora import rl

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64) * 2 + 5
    mask = torch.rand(3, 7, generator=g) > 0.3
    x[~mask] = float("nan")  # padding may hold anything
    got = dist.global_whiten(x, mask)
    assert got.dtype == x.dtype and torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    torch.testing.assert_close(got, rl.whiten(x, mask), rtol=1e-12, atol=1e-12)
    assert dist.global_mean(x, mask) == pytest.approx(float(x[mask].mean()), rel=1e-14)

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    q = torch.nn.Parameter(torch.ones(2))
    dist.average_gradients([p, q])  # one process: nothing to average, nothing created
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and q.grad is None
    assert dist.on_main(lambda: 5, "adding") == 5


@pytest.mark.parametrize("old_world, old_batch, new_batch, allowed", [
    (2, 4, 8, {"batch_size"}),  # 2 x 4 -> 1 x 8: the same global batch
    (2, 4, 4, None),  # 2 x 4 -> 1 x 4: refused
    (1, 8, 8, set()),  # same world: nothing to allow (batch_size is checked by check_resume_config)
])
def test_resume_on_another_world_size_keeps_the_global_batch(tmp_path, old_world, old_batch, new_batch, allowed):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"world_size": old_world, "config": {"batch_size": old_batch}}))
    if allowed is None:
        with pytest.raises(ValueError, match=r"trained on 2 process\(es\), this launch has 1.*4 x 2 = 8"):
            dist.check_resume_world_size(run, {"batch_size": new_batch})
        return
    assert dist.check_resume_world_size(run, {"batch_size": new_batch}) == allowed
    if allowed:  # and check_resume_config lets exactly that option change
        (tmp_path / "cfg").mkdir()
        cfg_run = tmp_path / "cfg" / ckpt.RUN_FILE
        cfg_run.write_text(json.dumps({"config": {"batch_size": old_batch, "lr": 0.1}}))
        ckpt.check_resume_config(tmp_path / "cfg", {"batch_size": new_batch, "lr": 0.1},
                                 resumable=ckpt.RESUMABLE_CHANGES | allowed)
        with pytest.raises(ValueError, match="batch_size"):
            ckpt.check_resume_config(tmp_path / "cfg", {"batch_size": new_batch, "lr": 0.1})


def test_a_full_disk_during_a_sharded_checkpoint_is_an_environment_error(tmp_path, monkeypatch):
    """DCP reports a writer's failure as its own CheckpointException (a BaseException): it is
    turned back into the OSError, so that an intermediate checkpoint is skipped with a
    warning (on every rank alike) and nothing is left half-written."""
    import errno
    import os

    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from fastlora.train import run as lifecycle

    m, opt, sched = _trained(0)
    first = ckpt.save_checkpoint(tmp_path, 2, m, opt, sched, {}, sharded=m)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", full)
    with pytest.raises(OSError) as e:
        ckpt.save_checkpoint(tmp_path, 3, m, opt, sched, {}, sharded=m)
    assert e.value.errno == errno.ENOSPC
    warned = []
    assert lifecycle.try_checkpoint(lambda: ckpt.save_checkpoint(tmp_path, 3, m, opt, sched, {}, sharded=m),
                                    log=type("L", (), {"warn": staticmethod(warned.append)})) is None
    assert warned and "No space left" in warned[0]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]  # no .tmp-* left behind
    assert ckpt.verify_checkpoint(first) is None
