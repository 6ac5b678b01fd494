"""The SFT trainer on 2 ranks (torchrun, gloo, CPU) against one process, on the tiny Llama.

Two torchrun launches (each ~10 s of interpreter start-up per rank on 2 cores) cover:
- DDP, 2 ranks x batch 2 with grad_accum 2 (no_sync) and a short last global batch that
  leaves one rank empty == 1 process with batch 4: same losses, eval losses, accuracies,
  same final adapter, within fp32 tolerance. Patched (fastlora's autograd functions under
  DDP's hooks);
- a run killed (os._exit on rank 1 after step 3, checkpoint at step 2) and resumed on 2
  ranks == the same run uninterrupted (dropout on: each rank's RNG stream is restored);
- a bad data file on rank 1 only: the job exits with rank 1's error, on every rank,
  well before the test's timeout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close, requires_bnb
from tests.patch import tiny
from tests.train.conftest import classification_records

pytestmark = requires_bnb

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # a hang would otherwise block CI; a healthy launch takes ~20-40 s on 2 loaded cores


def _torchrun(tmp_path: Path, name: str, scenarios: list[dict], timeout: float = TIMEOUT_S):
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(scenarios))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.train.dist_worker", str(spec)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _cfg(model_dir, data, out, **kw) -> dict:
    base = dict(model=str(model_dir), data=[str(data)], test_data=[str(data)], output_dir=str(out), max_steps=4,
                batch_size=2, grad_accum=2, lr=5e-3, warmup_steps=1, eval_split=0.25, eval_every=2, max_length=64,
                measure_forgetting=False, progress=False, max_new_tokens=4, test_max_examples=5, lora_r=4,
                lora_alpha=8, lora_dropout=0.0, seed=3)
    base.update(kw)
    return base


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(out) if "event" not in r}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(got: Path, ref: Path, rtol: float, atol: float) -> None:
    a, b = _adapter(got), _adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def test_ddp_equals_one_process_and_resume_after_kill(tiny_model_dir, tmp_path):
    from fastlora.train import SFTConfig, sft

    data = tmp_path / "d.jsonl"
    # 17 records, 4 held out: 13 training rows, global batch 4 -> 4, 4, 4, 1: in the last
    # one rank 1 holds nothing and runs a masked filler row.
    records = classification_records(17)
    for r in records[::3]:  # unequal trained tokens per rank: a mean of per-rank means would differ
        r["messages"][2]["content"] += " The front desk will follow up with more details soon."
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    ref = tmp_path / "single"
    sft(SFTConfig(**_cfg(tiny_model_dir, data, ref, batch_size=4)))

    untied = tmp_path / "untied"
    tiny.save_random("llama", untied)  # lm_head not tied to the embeddings: FSDP shards it on its own
    resume_kw = dict(lora_dropout=0.1, save_every=2, eval_every=0, test_data=None)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run1 = _torchrun(tmp_path, "run1", [
        {"cfg": _cfg(tiny_model_dir, data, tmp_path / "ddp")},
        {"cfg": _cfg(tiny_model_dir, data, tmp_path / "fsdp", parallel="fsdp")},
        {"step": str(untied), "out": str(tmp_path / "fsdp_step.pt")},
        {"moments": str(tmp_path / "moments.pt")},
        {"cfg": _cfg(tiny_model_dir, data, straight, **resume_kw)},
        {"cfg": _cfg(tiny_model_dir, data, killed, **resume_kw), "die_at": 3, "die_rank": 1},
    ])
    assert run1.returncode != 0, "rank 1 was killed: the launch must fail"
    assert (tmp_path / "ddp" / "summary.json").is_file(), run1.stderr[-3000:]
    assert (straight / "summary.json").is_file(), run1.stderr[-3000:]
    for r in (0, 1):  # every patched module ran fused on every rank (no run-time fallback)
        assert json.loads((tmp_path / f"run1.json.fallbacks.{r}.json").read_text()) == []

    # --- DDP 2 x 2 == FSDP2 2 x 2 == 1 x 4 (losses, eval losses, accuracies, adapter)
    m_ref = _metrics(ref)
    for name in ("ddp", "fsdp"):
        got = tmp_path / name
        m_got = _metrics(got)
        assert [r.get("event") for r in m_got] == [r.get("event") for r in m_ref], name
        for r_ref, r_got in zip(m_ref, m_got):
            assert r_got["step"] == r_ref["step"]
            for key in ("loss", "trained_tokens", "test_accuracy", "eval_loss", "grad_norm"):
                if key in r_ref:
                    assert r_got[key] == pytest.approx(r_ref[key], rel=1e-5, abs=1e-7), (name, key, r_ref, r_got)
        # only rank 0 wrote: one line per step, no duplicates
        assert sorted(_losses(got)) == [1, 2, 3, 4] and len([r for r in m_got if "event" not in r]) == 4
        s_ref, s_got = (json.loads((d / "summary.json").read_text()) for d in (ref, got))
        assert s_got["world_size"] == 2 and s_ref["world_size"] == 1
        assert s_got["accuracy_after"] == s_ref["accuracy_after"]
        # the sharded test outputs were gathered back in the test set's order
        refs = [[d["reference"] for d in json.loads((d_ / "test_outputs.json").read_text())] for d_ in (ref, got)]
        assert refs[0] == refs[1] and len(set(refs[0])) > 1
        assert s_got["eval_loss"] == pytest.approx(s_ref["eval_loss"], rel=1e-5)
        _assert_same_adapter(got, ref, rtol=1e-4, atol=1e-6)

    # --- FSDP2 with lm_head sharded on its own: the patched loss reads it inside its FSDP hooks
    from tests.train.dist_worker import qlora_step

    sharded, whole = torch.load(tmp_path / "fsdp_step.pt"), qlora_step(str(untied), fsdp=False)
    assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert sharded["grads"].keys() == whole["grads"].keys() and len(whole["grads"]) > 0
    for k, g in whole["grads"].items():
        assert float(g.abs().max()) > 0, k
        assert_close(sharded["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)

    # --- PPO's whitening moments over the global batch (ranks holding 4 and 3 rows)
    from tests.train.dist_worker import moments_data

    x, mask = moments_data()
    mean, var = torch.load(tmp_path / "moments.pt")
    assert mean == pytest.approx(float(x[mask].mean()), rel=1e-12)
    assert var == pytest.approx(float(x[mask].var(unbiased=False)), rel=1e-9)

    # --- killed after step 3 (last checkpoint: step 2), resumed on 2 ranks == straight
    assert not (killed / "summary.json").exists()
    assert [p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000002"]
    run2 = _torchrun(tmp_path, "run2", [{"cfg": _cfg(tiny_model_dir, data, killed, resume=True, **resume_kw)}])
    assert run2.returncode == 0, run2.stderr[-3000:]
    la, lb = _losses(straight), _losses(killed)
    assert sorted(lb) == [1, 2, 3, 4]
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-6, abs=1e-7), (s, la, lb)
    _assert_same_adapter(killed, straight, rtol=1e-6, atol=1e-7)


def test_a_failing_rank_ends_the_job_with_its_error(tiny_model_dir, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in classification_records(8)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(classification_records(1)[0]) + "\n{not json\n")
    out = tmp_path / "out"
    args = ["sft", "--model", str(tiny_model_dir), "--output-dir", str(out), "--max-steps", "2", "--no-progress",
            "--no-measure-forgetting", "--data"]
    run = _torchrun(tmp_path, "fail", [{"cli": args + [str(good)], "cli_rank": {"1": args + [str(bad)]}}], timeout=120)
    assert run.returncode != 0
    # rank 1 reports its own error (file and line), rank 0 names rank 1 and the same error
    assert "bad.jsonl" in run.stderr and "line 2" in run.stderr, run.stderr[-3000:]
    assert "rank 1 failed while checking the output dir and reading the data" in run.stderr, run.stderr[-3000:]
    assert not out.exists()  # nothing written by either rank
