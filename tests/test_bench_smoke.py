"""Smoke test of the benchmark suite: ``fastlora bench --preset tiny`` on this CPU.

It runs the whole tiny suite once (a subprocess; under a minute on 2 cores) and
checks what CI promises: every equal-result check ran and passed before anything was
timed, every provider that did not run says why, and the results files were written.
Speed is never asserted. The cheap tests below pin the harness's own failure modes.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastlora import bench


def test_tiny_preset_runs_checks_and_writes_results(tmp_path):
    # one torch thread: CI may share its 2 cores with other jobs, and a descheduled
    # worker thread stalls every parallel op (speed is not what this test checks)
    # pinned to the CPU: on a GPU host "auto" would benchmark the GPU (and the device
    # asserted below would be wrong)
    rc = bench.run(preset="tiny", results_dir=tmp_path, pytest_args=["--bench-threads", "1", "--bench-device", "cpu"])
    jsons = list(tmp_path.glob("*.json"))
    assert len(jsons) == 1, f"expected one results JSON in {tmp_path}, found {jsons}"
    data = json.loads(jsons[0].read_text())
    meta = data["fastlora"]
    assert rc == 0, f"fastlora bench --preset tiny failed (exit {rc}): {meta['failed']}"
    assert meta["preset"] == "tiny" and meta["device_type"] == "cpu" and meta["torch_threads"] == 1
    assert meta["ceilings"]["copy_GBps"] > 0 and meta["ceilings"]["matmul_TFLOPs"] > 0
    assert meta["git"]["commit"], "the results must name the git commit"
    assert meta["versions"]["torch"], "the results must name the torch version"

    checks = meta["checks"]
    assert checks, "no equal-result check ran"
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    timed = [b["extra_info"] for b in data["benchmarks"]]
    assert timed, "nothing was timed"
    checked = {(c["case"], c["provider"]) for c in checks}
    for e in timed:
        # every timed result was checked first, and carries its metrics
        assert (f"{e['area']}:{e['case']}", e["provider"]) in checked, e
        assert e["check_passed"] is True
        assert e["median_s"] > 0 and e["rounds"] >= 1 and e["ring"] >= 2
        assert "peak_mem_bytes" in e
        assert ("GBps" in e) or ("TFLOPs" in e) or ("tokens_per_s" in e)
    # every area produced at least one timed, checked result (torch/bnb peers always run)
    assert {e["area"] for e in timed} == set(bench.AREAS)
    # the peers that cannot run on a CPU are listed with their reason, not silently dropped
    reasons = " ".join(s["reason"] for s in meta["skipped"])
    assert "liger-kernel" in reasons and "cut-cross-entropy" in reasons

    # the shared-prefix area: both providers of each case, the shared one ran fewer tokens and
    # saved fewer activation bytes for backward (exact counts, not timings)
    prefix = {}
    for e in timed:
        if e["area"] == "prefix":
            prefix.setdefault(e["case"], {})[e["provider"]] = e
    assert prefix and all(set(by) == {"shared", "plain"} for by in prefix.values()), prefix.keys()
    for by in prefix.values():
        s, p = by["shared"], by["plain"]
        assert 0 < s["tokens_run"] < s["tokens_in"] == s["rows"] * s["seq"], s
        assert 0 < s["saved_activation_bytes"] < p["saved_activation_bytes"]
        assert s["saved_weight_bytes"] == p["saved_weight_bytes"] > 0
        assert s["loss_rel_err"] <= 1e-5 and s["lora_grads_rel_err"] <= 1e-4

    md = jsons[0].with_suffix(".md").read_text()
    assert "## Ratios against each peer" in md and "## Providers not measured" in md
    assert "## Shared prefix: shared against plain" in md
    assert jsons[0].with_suffix(".png").stat().st_size > 0


def test_check_failure_is_loud():
    from benchmarks import harness as H

    ref = torch.linspace(-1, 1, 100, dtype=torch.float64)
    ok = H.compare("y", ref.float(), ref, rtol=1e-6, atol_rel=0.0)
    assert ok["ok"]
    off = ref.float().clone()
    off[17] += 1e-3
    bad = H.compare("y", off, ref, rtol=1e-6, atol_rel=1e-6)
    assert not bad["ok"] and bad["mismatched"] == 1
    nan = ref.float().clone()
    nan[3] = float("nan")
    assert not H.compare("y", nan, ref, rtol=1.0, atol_rel=1.0)["ok"]
    assert not H.compare("y", ref[:99].float(), ref, rtol=1.0, atol_rel=1.0)["ok"]
    with pytest.raises(AssertionError, match="EQUAL-RESULT CHECK FAILED"):
        H.check_outputs("unit:case", "p", ["y"], [off], [ref], rtol=1e-6, atol_rel=1e-6)


def test_nf4_eager_reference_is_bitexact_with_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from benchmarks import harness as H

    w = H.randn((96, 320), seed=0, device="cpu", dtype=torch.bfloat16, scale=0.02)
    import bitsandbytes.functional as F

    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    assert torch.equal(H.nf4_dequantize_eager(packed, qs, torch.bfloat16), F.dequantize_4bit(packed, qs))


def test_nf4_inputs_need_no_bitsandbytes(monkeypatch):
    """The benchmarks' NF4 inputs come from fastlora's quantizer; without bitsandbytes the
    quant state is a namespace that NF4Weight.from_bnb and the eager peer both read."""
    import importlib.util

    from benchmarks import harness as H
    from fastlora.nf4 import NF4Weight, quantize_nf4

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    w = H.randn((48, 256), seed=1, device="cpu", dtype=torch.bfloat16, scale=0.02)
    packed, qs = H.quantize_nf4_inputs(w)
    assert type(qs).__module__ == "types"
    expected = quantize_nf4(w, 64).dequantize()
    assert torch.equal(NF4Weight.from_bnb((packed, qs)).dequantize(), expected)
    assert torch.equal(H.nf4_dequantize_eager(packed, qs, torch.bfloat16), expected)


def test_saved_for_backward_counts_each_storage_once():
    from benchmarks import harness as H

    w = torch.randn(8, 4, requires_grad=True)  # a "weight": counted apart
    x = torch.randn(3, 8, requires_grad=True)

    def step():
        h = x @ w  # saves x and w
        y = h[:, :2].exp() + h[:, 2:].exp()  # saves both outputs of exp: two storages of 3x2
        return (y * x[:, :2]).sum()  # saves y and a view of x (x's storage again)

    out, saved = H.saved_for_backward(step, exclude=[w])
    assert saved["saved_weight_bytes"] == w.numel() * 4
    assert saved["saved_activation_bytes"] == (x.numel() + 3 * 2 * 3) * 4  # x, two exp outputs, y
    out.backward()  # the graph and its gradients are those of a run without the hooks
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    step().backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


def test_prefix_batches_share_what_the_trainers_share():
    from benchmarks import bench_prefix as BP
    from benchmarks import harness as H
    from fastlora.patch.prefix_plan import CostModel, plan_batch

    env = H.Env(preset=H.PRESETS["tiny"], device=torch.device("cpu"), dtype=torch.float32, ceilings={},
                cache_bytes=0)
    grpo = H.PrefixCase("grpo", groups=3, group_size=4, prompt=10, response=5)
    ids, mask, labels = BP.batch(env, grpo, vocab=1000, seed=0)
    assert ids.shape == (12, 15) and bool(mask.all())
    assert torch.equal(ids[:4, :10], ids[0, :10].expand(4, -1)) and not torch.equal(ids[0, :10], ids[4, :10])
    assert bool((labels[:, :10] == -100).all()) and torch.equal(labels[:, 10:], ids[:, 10:])
    dpo = H.PrefixCase("dpo", groups=3, group_size=2, prompt=10, response=5)
    ids, mask, labels = BP.batch(env, dpo, vocab=1000, seed=0)
    assert torch.equal(ids[:3, :10], ids[3:, :10])  # chosen rows, then rejected rows
    assert not torch.equal(ids[:3, 10:], ids[3:, 10:])
    # one node per prompt token and per response token
    plan = plan_batch(ids, mask, CostModel(1.0, 0.0), min_saving=0.0)
    assert plan.gather[mask.bool()].unique().numel() == 3 * 10 + 6 * 5
    with pytest.raises(ValueError, match="kind"):
        BP.batch(env, H.PrefixCase("ppo", 1, 1, 1, 1), vocab=10, seed=0)
    # the presets hold issue 23's shapes
    cases = {c.kind: c for c in H.PRESETS["prefix-cpu"].prefix_cases}
    assert (cases["grpo"].rows, cases["grpo"].seq, cases["dpo"].rows, cases["dpo"].seq) == (32, 640, 16, 384)
    assert H.PRESETS["llama3-8b"].prefix_cases == H.PRESETS["prefix-cpu"].prefix_cases
    assert H.PRESETS["llama3-8b"].prefix_model.layers == 30 and H.PRESETS["prefix-cpu"].prefix_model.layers == 30


def test_default_preset():
    assert bench.default_preset(["nf4"]) == "tiny"
    assert bench.default_preset(["prefix", "nf4"]) == "tiny"
    assert bench.default_preset(["prefix"], ["--bench-device", "cpu"]) == "prefix-cpu"
    assert bench.default_preset(["prefix"], ["--bench-device=cuda"]) == "tiny"
    assert bench.default_preset(["prefix"]) == ("tiny" if torch.cuda.is_available() else "prefix-cpu")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        bench.run(preset="huge")
    with pytest.raises(ValueError, match="unknown area"):
        bench.run(preset="tiny", only="nf5")
    assert bench._areas("nf4,train_step") == ["nf4", "train_step"]
    # the training step runs last: Liger's patch there cannot be undone
    assert bench._areas(["train_step", "generation"]) == ["generation", "train_step"]
    assert bench._areas("train_step,prefix") == ["prefix", "train_step"]


def _row(area, case, provider, family, t, mem):
    return {"extra_info": {"area": area, "case": case, "provider": provider, "family": family, "median_s": t,
                           "min_s": t, "unit": "GB/s", "GBps": 1.0 / t, "peak_mem_bytes": mem,
                           "peak_mem_over_inputs_bytes": mem}}


def test_results_merge_area_by_area(tmp_path):
    """Two --only runs of the same day, device and preset end in one file; a re-run
    of an area replaces that area's results only."""
    rep = {"device": "Test GPU 1", "device_type": "cuda", "ceilings": {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0},
           "checks": [], "skipped": [], "failed": [], "exitstatus": 0}
    kw = dict(preset="llama3-8b", results_dir=tmp_path, root=tmp_path, date="2026-01-02")
    bench.write_results({"benchmarks": [_row("nf4", "4x4", "fastlora-cuda", "fastlora", 1.0, 10),
                                        _row("nf4", "4x4", "bitsandbytes", "bitsandbytes", 3.0, 30)]},
                        {**rep, "checks": [{"case": "nf4:4x4", "provider": "bitsandbytes", "passed": True}]},
                        areas=["nf4"], **kw)
    paths = bench.write_results({"benchmarks": [_row("lora_linear", "c", "fastlora-triton", "fastlora", 2.0, 5)]},
                                rep, areas=["lora_linear"], **kw)
    assert [p.name for p in paths][:2] == ["2026-01-02-test-gpu-1.json", "2026-01-02-test-gpu-1.md"]
    data = json.loads(paths[0].read_text())
    assert sorted(b["extra_info"]["provider"] for b in data["benchmarks"]) == [
        "bitsandbytes", "fastlora-cuda", "fastlora-triton"]
    assert data["fastlora"]["areas"] == ["nf4", "lora_linear"]
    assert len(data["fastlora"]["checks"]) == 1
    md = paths[1].read_text()
    assert "| nf4 | 4x4 | fastlora-cuda 1.000 s | 3x, mem 0.333x |" in md
    # the same area again: replaced, not duplicated
    bench.write_results({"benchmarks": [_row("nf4", "4x4", "fastlora-cuda", "fastlora", 0.5, 10)]}, rep,
                        areas=["nf4"], **kw)
    data = json.loads(paths[0].read_text())
    assert sorted(b["extra_info"]["provider"] for b in data["benchmarks"]) == ["fastlora-cuda", "fastlora-triton"]
