"""The PPO memory benchmark (``benchmarks/ppo_memory.py``): its accounting is exact, and its
two setups run end to end.

- ``AllocationTrace`` gives the peak and net bytes of a known allocation pattern to the
  byte, never counts a block allocated before it (even one freed inside it, even one
  allocated under an earlier trace, which the profiler's own running total would subtract);
- ``live_tensor_bytes`` counts each storage once (views do not add);
- on a tiny Llama, both setups run in their own processes; nothing escapes the count (the
  bytes live after the step = before + the step's net allocations, exactly), the weight
  bytes equal ``memory_estimate``'s, both train the same parameters, and the shared base's
  peak is below the four separate models'.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import ppo_memory as pm
from tests.helpers import requires_bnb


def test_trace_peak_and_net_are_exact_on_a_known_pattern():
    before = torch.empty(777, dtype=torch.uint8)  # allocated before the trace: never counted
    with pm.AllocationTrace() as tr:
        a = torch.empty(1000, dtype=torch.uint8)
        b = torch.empty(5000, dtype=torch.uint8)  # 6000 live
        del a  # 5000
        c = torch.empty(250, dtype=torch.float32)  # 6000
        del before  # freeing an older block lowers nothing in the trace
        d = torch.empty(3000, dtype=torch.uint8)  # 9000: the peak
        del b, c  # 3000
        e = torch.empty(4000, dtype=torch.uint8)  # 7000
        del e  # 3000
    # 14,000 bytes were allocated in all, 9,000 at most at once; d (3,000) is still live
    assert (tr.peak, tr.net, tr.ignored_free_bytes) == (9000, 3000, 0)
    assert tr.events == 9  # 5 allocations and 4 frees: the free of `before` is not even recorded

    with pm.AllocationTrace() as tr2:
        f = torch.empty(100, dtype=torch.uint8)
        del d  # allocated under the first trace: the profiler reports this free, the replay ignores it
        g = torch.empty(60, dtype=torch.uint8)
    assert (tr2.peak, tr2.net, tr2.ignored_free_bytes) == (160, 160, 3000)
    del f, g


def test_replay_refuses_inconsistent_records():
    assert pm.replay([(1, 10), (2, 5), (1, -10), (3, 20), (9, -7)]) == (25, 25, 7)
    with pytest.raises(ValueError, match="free of 4 bytes"):
        pm.replay([(1, 10), (1, -4)])
    with pytest.raises(ValueError, match="while a block of 10 bytes is live"):
        pm.replay([(1, 10), (1, 10)])


def test_live_tensor_bytes_counts_each_storage_once():
    start = pm.live_tensor_bytes()
    x = torch.empty(1234, dtype=torch.uint8)
    views = (x[10:], x.view(2, 617), x[::2])
    y = torch.empty(3, dtype=torch.float64)
    assert pm.live_tensor_bytes() - start == 1234 + 24
    del x, views, y


@requires_bnb
def test_both_setups_run_on_a_tiny_llama_and_shared_is_below_separate(tmp_path):
    from fastlora.rl.memory import memory_estimate

    out = tmp_path / "ppo_memory.json"
    # vocab 2048 > hidden 128: the separate setup's full logits are a large part of its step,
    # as at Llama-3 widths (vocab 31x hidden)
    shape = pm.Shape(hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=2048, layers=1, batch=2, prompt_len=12,
                     response_len=6, lora_r=4)
    argv = [a for f in dataclasses.fields(shape)
            for a in ("--" + f.name.replace("_", "-"), str(getattr(shape, f.name)))]
    res = pm.main(argv + ["--out", str(out), "--date", "2026-12-01"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    assert out.with_suffix(".png").stat().st_size > 0
    sep, sh = res["setups"]["separate"], res["setups"]["shared"]
    for s in (sep, sh):
        assert s["balance_bytes"] == 0, f"{s['setup']}: {s['balance_bytes']} bytes escaped the count"
        assert s["ignored_free_bytes"] == 0, f"{s['setup']}: the step freed blocks from before it"
        assert s["weight_bytes"] == s["predicted_weight_bytes"], s["setup"]
        assert s["resident_bytes"] >= s["weight_bytes"] + s["optimizer_state_bytes"]
        assert s["peak_bytes"] == s["resident_bytes"] + s["peak_minus_resident_bytes"]
        assert s["peak_minus_resident_bytes"] > 0 and s["allocation_records"] > 100
        # what is resident besides weights, optimizer states and fastlora's dequantize buffer: the rollout
        assert 0 <= s["other_resident_bytes"] <= 64 * 1024, s
    assert sep["dequant_buffer_bytes"] == 0
    # the same trainable parameters (policy and critic adapters + the value head), the same AdamW states
    assert sep["trainable_parameters"] == sh["trainable_parameters"] > 0
    assert sep["optimizer_state_bytes"] == sh["optimizer_state_bytes"] > 8 * sh["trainable_parameters"]
    # the separate models hold the 4-bit base three more times, and nothing else more
    base = memory_estimate(shape.config(), lora_r=shape.lora_r, dtype=torch.bfloat16)["base"]["bytes"]
    assert sep["weight_bytes"] - sh["weight_bytes"] == 3 * base
    # the step's own peak is lower without the logits, and so is the whole
    assert sh["peak_minus_resident_bytes"] < sep["peak_minus_resident_bytes"]
    assert sh["peak_bytes"] < sep["peak_bytes"]
    assert res["ratio"] == sh["peak_bytes"] / sep["peak_bytes"]
    assert res["shape"]["vocab"] == 2048 and res["date"] == "2026-12-01"
