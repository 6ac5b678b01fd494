"""``fastlora rm`` on a tiny random Llama (SmolLM2's tokenizer and chat template):

- a run writes metrics.jsonl, curve.png, scores.png, summary.json and the adapter, and the
  adapter loads in transformers + PEFT as a sequence classifier that gives the same scores;
- an interrupted run resumed from its checkpoint gives the same losses as an uninterrupted one;
- a checkpoint whose head has the wrong size is refused on resume, naming the file, and the
  run's files are left as they were;
- the CLI runs with flags and reports bad data as a one-line error.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastlora.train.reward import RewardConfig, reward
from tests.helpers import assert_close, requires_bnb
from tests.train.conftest import classification_records

pytestmark = requires_bnb


def _pairs(n=24):
    rows = []
    for r in classification_records(n):
        msgs = r["messages"]
        wrong = {"billing": "symptoms", "symptoms": "appointment", "appointment": "billing"}[r["label"]]
        rows.append({"prompt": msgs[:2], "chosen": [msgs[2]],
                     "rejected": [{"role": "assistant", "content": json.dumps({"category": wrong})}]})
    return rows


@pytest.fixture
def prefs(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    return p


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=[str(data)], output_dir=str(out), max_steps=4, batch_size=4, lr=1e-3,
                warmup_steps=0, eval_split=0.25, progress=False, lora_r=4, lora_alpha=8, seed=0)
    base.update(kw)
    return RewardConfig(**base)


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
            if "event" not in json.loads(l)]


def test_reward_run_outputs_resume_and_transformers_loading(tiny_model_dir, prefs, tmp_path):
    full = tmp_path / "full"
    summary = reward(_cfg(tiny_model_dir, prefs, full))
    for f in ("metrics.jsonl", "curve.png", "scores.png", "summary.json", "scores.json", "adapter"):
        assert (full / f).exists(), f
    assert summary["steps"] == 4 and summary["eval_pairs"] == 6 and summary["train_pairs"] == 18
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert json.loads((full / "summary.json").read_text())["accuracy_after"] == summary["accuracy_after"]
    cfg = json.loads((full / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]

    # ---- interrupted after step 3 (checkpoint at step 2), then resumed: the same losses
    part = tmp_path / "part"

    def stop(step, rec):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reward(_cfg(tiny_model_dir, prefs, part, save_every=2), on_step=stop)
    assert (part / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()

    # a checkpoint head of the wrong size is refused, naming the file; nothing is lost
    from safetensors.torch import load_file, save_file

    from fastlora.train import checkpoint as ckpt

    f = part / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"
    manifest = f.parents[1] / ckpt.MANIFEST
    good, good_manifest = f.read_bytes(), manifest.read_bytes()
    state = load_file(str(f))
    state["base_model.model.score.weight"] = torch.zeros(1, 64)
    save_file(state, str(f))
    files_before = sorted(p.relative_to(part) for p in part.rglob("*"))
    metrics_before = (part / "metrics.jsonl").read_text()
    # an altered file no longer matches the checkpoint's checksums: named as damaged
    with pytest.raises(ckpt.CheckpointError, match=r"step-000002/adapter/adapter_model.safetensors is damaged"):
        reward(_cfg(tiny_model_dir, prefs, part, save_every=2, resume=True))
    # a consistent checkpoint whose head does not fit (another model's): the head check names it
    ckpt._write_manifest(f.parents[1])
    with pytest.raises(ValueError, match=r"step-000002/adapter/adapter_model.safetensors: head of role 'reward' "
                                         r"has shape \(1, 64\)"):
        reward(_cfg(tiny_model_dir, prefs, part, save_every=2, resume=True))
    assert sorted(p.relative_to(part) for p in part.rglob("*")) == files_before
    assert (part / "metrics.jsonl").read_text() == metrics_before
    f.write_bytes(good)
    manifest.write_bytes(good_manifest)

    resumed = reward(_cfg(tiny_model_dir, prefs, part, save_every=2, resume=True))
    assert resumed["steps"] == 4
    assert_close(torch.tensor(_losses(part)), torch.tensor(_losses(full)), rtol=1e-5, atol=1e-6)

    # ---- the result loads in transformers + PEFT as a sequence classifier, same scores
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastlora.rl import SharedBase
    from fastlora.train.model import load_base
    from fastlora.train.pairs import check_pairs, collate_pairs, encode_pairs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    items, _ = encode_pairs(check_pairs(_pairs(4), "chat_pairs"), tok, "chat_pairs", max_length=512)
    batch = collate_pairs(items, tok.pad_token_id)
    # Both unquantized: transformers quantizes a sequence classifier's weights differently
    # (bf16 absmax, no double quantization) than a causal LM, so 4-bit scores would differ by
    # quantization error; on the same fp32 weights the adapter and head must give the same scores.
    seq = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    seq.config.pad_token_id = tok.pad_token_id
    seq = PeftModel.from_pretrained(seq, full / "adapter").eval()
    with torch.no_grad():
        hf = seq(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    ours_base = SharedBase.from_model(load_base(tiny_model_dir, load_in_4bit=False, dtype=torch.float32,
                                                device=torch.device("cpu")))
    ours_base.add_role("reward", from_pretrained=full / "adapter")
    ours_base.eval()
    with torch.no_grad():
        ours = ours_base("reward", batch["input_ids"], batch["attention_mask"])
    assert hf.abs().max() > 0
    assert_close(ours, hf, rtol=1e-4, atol=1e-5)


def test_cli_rm_and_bad_data(tiny_model_dir, prefs, tmp_path, capsys):
    from fastlora.cli import main

    bad = tmp_path / "bad.jsonl"
    rows = _pairs(3)
    rows[2]["rejected"] = rows[2]["chosen"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(["rm", "--model", str(tiny_model_dir), "--data", str(bad), "--output-dir", str(out), "--no-progress"])
    assert rc == 2
    assert "bad.jsonl, line 3: chosen and rejected are the same response" in capsys.readouterr().err
    assert not out.exists()  # nothing written for bad input
    rc = main(["rm", "--model", str(tiny_model_dir), "--data", str(prefs), "--output-dir", str(out), "--no-progress",
               "--max-steps", "1", "--batch-size", "2", "--lora-r", "2", "--center", "0.01",
               "--eval-max-examples", "2"])
    assert rc == 0
    run = json.loads((out / "run.json").read_text())["config"]
    assert run["center"] == 0.01 and run["lora_r"] == 2
    assert json.loads((out / "summary.json").read_text())["eval_pairs"] == 2
    # a reward model can start from an adapter (here the previous one: its head comes along)
    out2 = tmp_path / "run2"
    rc = main(["rm", "--model", str(tiny_model_dir), "--data", str(prefs), "--output-dir", str(out2),
               "--no-progress", "--max-steps", "1", "--batch-size", "2", "--init-adapter", str(out / "adapter"),
               "--eval-max-examples", "2"])
    assert rc == 0
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (out, out2))
    assert s2["starts_from"] == f"adapter {out / 'adapter'}"
    assert s2["mean_margin_before"] == pytest.approx(s1["mean_margin_after"], rel=1e-4, abs=1e-5)


def test_shared_prefix_run_equals_the_plain_one(tiny_model_dir, prefs, tmp_path):
    """A pair's prompt runs once inside the patched decoder (--share-prefix, the default):
    the same losses as --no-share-prefix, fewer positions through the decoder layers."""
    runs = {}
    for share in (True, False):
        out = tmp_path / str(share)
        summary = reward(_cfg(tiny_model_dir, prefs, out, max_steps=3, share_prefix=share))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[share] = (summary, [r for r in rows if "event" not in r])
    (on, rows_on), (off, rows_off) = runs[True], runs[False]
    assert [r["loss"] for r in rows_on] == pytest.approx([r["loss"] for r in rows_off], rel=1e-5)
    assert all(0 < r["tokens_run_fraction"] < 1 for r in rows_on)
    assert all(r["tokens_run_fraction"] is None for r in rows_off)
    assert on["share_prefix"] is True and off["share_prefix"] is False
    assert 0 < on["tokens_run_fraction"] < 1 and off["tokens_run_fraction"] is None
