"""fastlora.train.distributed without a process group: every helper is the single-process
identity (the trainers' one code path), and the per-rank slicing of a global batch."""
from __future__ import annotations

import pytest

from fastlora.train import distributed as dist


def test_single_process_identity():
    assert not dist.is_distributed()
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    items = list("abcde")
    assert dist.shard(items) == items
    assert dist.gather_in_order(["x", "y"], 2) == ["x", "y"]
    assert dist.all_sum([1, 2.5]) == [1.0, 2.5]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(7) == 7
    assert dist.agree(lambda: 3, "adding") == 3
    with pytest.raises(KeyError):  # one process: the error itself, not a RankError
        dist.agree(lambda: {}["missing"], "reading")
    with dist.main_writes() as writer:
        assert writer is True
    with pytest.raises(OSError):
        with dist.main_writes():
            raise OSError("disk full")


@pytest.mark.parametrize("rank, expected", [(0, [7, 3]), (1, [9, 1]), (2, [4]), (3, [])])
def test_shard_indices_splits_a_short_last_batch(rank, expected):
    # a global batch of 5 rows over 4 ranks x 2: rank 2 gets one row, rank 3 none (it runs a filler)
    assert dist.shard_indices([7, 3, 9, 1, 4], 2, rank_=rank) == expected


def test_resume_on_another_world_size_is_refused(tmp_path):
    import json

    run = tmp_path / "run.json"
    run.write_text(json.dumps({"world_size": 2}))
    with pytest.raises(ValueError, match="trained on 2 process.*this launch has 1"):
        dist.check_resume_world_size(run)
    run.write_text(json.dumps({"world_size": 1}))
    dist.check_resume_world_size(run)
    dist.check_resume_world_size(tmp_path / "absent.json")  # an older run without the file: nothing to check


def test_global_mean_var_is_the_masked_population_moments_in_one_process():
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, generator=g) * 2 + 50
    mask = torch.rand(3, 7, generator=g) > 0.4
    mean, var = dist.global_mean_var(x, mask)
    ref = x.double()[mask]
    assert mean == pytest.approx(float(ref.mean()), rel=1e-12)
    assert var == pytest.approx(float(ref.var(unbiased=False)), rel=1e-10)
    assert dist.global_mean_var(x) == pytest.approx((float(x.double().mean()), float(x.double().var(unbiased=False))))
    with pytest.raises(ValueError, match="no valid element"):
        dist.global_mean_var(x, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="mask shape"):
        dist.global_mean_var(x, mask[:, :3])
