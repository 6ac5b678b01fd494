"""``fastlora generate`` and ``fastlora predict`` on a tiny 4-bit chat model."""
from __future__ import annotations

import json

from fastlora.cli import main
from tests.helpers import requires_bnb

pytestmark = requires_bnb


def test_predict_and_generate_commands(tiny_chat_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/sft/adapter of a developer's own default run
    m = str(tiny_chat_model_dir)
    rc = main(["predict", "--model", m, "--choices", "yes", "no", "maybe", "--min-confidence", "0.99", "--json",
               "is it urgent?", "can I come tomorrow?"])
    assert rc == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["prompt"] for r in rows] == ["is it urgent?", "can I come tomorrow?"]
    for r in rows:
        assert r["label"] in ("yes", "no", "maybe") and set(r["probabilities"]) == {"yes", "no", "maybe"}
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-3
        assert r["review"] == (r["probability"] < 0.99)
    assert "marked for human review" in out.err

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                          {"role": "assistant", "content": "dropped"}]}) + "\n"
                 + json.dumps({"prompt": "hi there"}) + "\n")
    rc = main(["generate", "--model", m, "--file", str(f), "--max-new-tokens", "3", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(isinstance(r["answer"], str) for r in rows)


def test_command_bad_input(tiny_chat_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = str(tiny_chat_model_dir)
    assert main(["predict", "q", "--model", m, "--choices", "a", "b", "a"]) == 2
    assert "duplicates" in capsys.readouterr().err
    assert main(["predict", "q", "--model", m, "--min-confidence", "1.5", "--choices", "a", "b"]) == 2
    assert "--min-confidence must be a probability" in capsys.readouterr().err
    assert main(["generate", "--model", m, "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    assert main(["generate", "--model", m, "--file", str(bad)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["generate", "--model", m, "--adapter", str(tmp_path)]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_the_default_runs_adapter_is_the_embedded_task(tmp_path, monkeypatch):
    """After `fastlora sft`, the default adapter names the converted embedded model as its
    base: that is still the embedded task (its system prompt, its labels), while a base
    given with --model, or another adapter's own base, is not."""
    import fastlora.train.model as tm
    from fastlora.generate.commands import GenerateConfig, model_source

    embedded_dir = tmp_path / "cache" / "SmolLM2"
    other_dir = tmp_path / "other"
    for d in (embedded_dir, other_dir):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    monkeypatch.setattr(tm, "default_model_dir", lambda cache_dir=None: embedded_dir)

    def adapter(base):
        a = tmp_path / f"adapter-{base.name}"
        a.mkdir()
        (a / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
        return a

    assert model_source(GenerateConfig(), None) == (embedded_dir, True)
    assert model_source(GenerateConfig(), adapter(embedded_dir)) == (embedded_dir, True)
    assert model_source(GenerateConfig(), adapter(other_dir)) == (other_dir, False)
    assert model_source(GenerateConfig(model=str(embedded_dir)), None) == (embedded_dir, False)


def test_the_default_runs_adapter_only_on_its_own_model(tiny_chat_model_dir, tmp_path, capsys, monkeypatch):
    """After `make sft`, runs/sft/adapter belongs to the embedded model: `--model OTHER`
    answers without it (and says so) instead of failing to load it; the same adapter named
    with --adapter on a model it does not fit is a clear error."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    other = tmp_path / "other-base"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(other)
    base = LlamaForCausalLM.from_pretrained(other)
    base.config.name_or_path = str(other)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "runs/sft/adapter")
    monkeypatch.chdir(tmp_path)
    m = str(tiny_chat_model_dir)
    assert main(["predict", "q", "--model", m, "--choices", "a", "b"]) == 0
    err = capsys.readouterr().err
    assert "runs/sft/adapter was trained on" in err and str(other) in err
    assert main(["predict", "q", "--model", m, "--choices", "a", "b", "--adapter", "runs/sft/adapter"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "size mismatch" in err
