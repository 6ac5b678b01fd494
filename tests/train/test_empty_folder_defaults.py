"""The no-argument commands work from an empty folder, as a new user runs them.

The embedded default model is swapped for a tiny random Llama with SmolLM2's tokenizer
(``fastlora.train.model.default_model_dir``, which every default path resolves through),
so each command runs its own default set-up: the default data, output directories and
adapters, in an empty working directory. Only the length of training is cut (a step or
two, a few test examples): the full default runs take minutes and are measured outside CI.
"""
from __future__ import annotations

import json

import pytest

from fastlora.cli import main
from tests.helpers import requires_bnb

pytestmark = requires_bnb

SHORT = ["--max-steps", "1", "--test-max-examples", "3", "--eval-max-examples", "4", "--no-measure-forgetting",
         "--no-progress"]


@pytest.fixture
def empty_folder(tmp_path, monkeypatch, tiny_model_dir):
    """An empty working directory whose default model is the tiny one."""
    import fastlora.train.model as tm

    monkeypatch.setattr(tm, "default_model_dir", lambda cache_dir=None: tiny_model_dir)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _linear_names():
    return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_ppo_runs_the_default_sft_first(empty_folder, tiny_model_dir):
    """`fastlora ppo` without runs/sft: the nested default SFT trains LoRA on every linear
    layer (it used to stop at once: target_modules ['all-linear'] 'matched no module')."""
    from fastlora.train.ppo import resolve_sft_adapter
    from fastlora.train.ppo_config import PPOConfig

    logs = []
    cfg = PPOConfig(progress=False)
    short = {"max_steps": 1, "test_max_examples": 3, "eval_max_examples": 4, "measure_forgetting": False}
    adapter = resolve_sft_adapter(cfg, logs.append, sft_options=short)
    assert adapter == empty_folder / "runs" / "sft" / "adapter" or adapter.resolve() == (
        empty_folder / "runs" / "sft" / "adapter").resolve()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == _linear_names()
    assert (empty_folder / "runs" / "sft" / "summary.json").is_file()
    assert any("running the default SFT first" in m for m in logs)
    # the second time it is found, not trained again
    logs.clear()
    assert resolve_sft_adapter(cfg, logs.append, sft_options=short) == adapter and not logs


def test_ppo_refuses_a_non_lora_sft_adapter(empty_folder):
    """PPO's roles are LoRA adapters: an SFT run made with another method is refused by
    name, not read as an empty LoRA (which would start PPO from the base model)."""
    from fastlora.train.ppo import resolve_sft_adapter
    from fastlora.train.ppo_config import PPOConfig

    d = empty_folder / "runs" / "sft" / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="holds a ia3 adapter"):
        resolve_sft_adapter(PPOConfig(progress=False), print)
    (d / "adapter_config.json").unlink()
    (d / "fastlora_peft.json").write_text(json.dumps({"method": "adapter"}))
    with pytest.raises(ValueError, match="holds a adapter adapter"):
        resolve_sft_adapter(PPOConfig(progress=False), print)


def test_target_modules_all_linear_as_a_list(tiny_model_dir):
    """What configs built from dicts pass (a lone string becomes a one-element list)."""
    from fastlora.train.model import add_lora, load_base, resolve_device

    model = load_base(tiny_model_dir, load_in_4bit=False, dtype=__import__("torch").float32,
                      device=resolve_device("cpu"))
    peft_model = add_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["all-linear"])
    assert {t.rsplit(".", 1)[-1] for t in peft_model.peft_config["default"].target_modules} == _linear_names()
    with pytest.raises(ValueError, match="mixes 'all-linear'"):
        add_lora(load_base(tiny_model_dir, load_in_4bit=False, dtype=__import__("torch").float32,
                           device=resolve_device("cpu")), r=2, alpha=4, dropout=0.0,
                 target_modules=["all-linear", "q_proj"])
    with pytest.raises(ValueError) as e:
        add_lora(load_base(tiny_model_dir, load_in_4bit=False, dtype=__import__("torch").float32,
                           device=resolve_device("cpu")), r=2, alpha=4, dropout=0.0, target_modules=["qproj"])
    msg = str(e.value)
    assert "['qproj'] match no module" in msg and "target_modules='all-linear'" in msg
    assert "'q_proj'" in msg and "lm_head" not in msg


@pytest.mark.parametrize("peft", ["lora", "prompt", "adapter"])
def test_generate_and_predict_use_the_default_runs_adapter(empty_folder, capsys, peft):
    """`fastlora sft` then `fastlora generate` / `fastlora predict` with no arguments: both
    find runs/sft/adapter, whichever --peft method made it (the bottleneck adapter is
    fastlora's own format), and answer on the embedded task with and without it."""
    assert main(["generate", "--max-new-tokens", "2", "--json"]) == 0  # before any run: the base alone
    out = capsys.readouterr()
    assert "adapter: none (no runs/sft/adapter" in out.err
    assert all("base_answer" not in json.loads(line) for line in out.out.splitlines())

    assert main(["sft", "--peft", peft, *SHORT]) == 0
    capsys.readouterr()
    assert main(["generate", "--max-new-tokens", "2", "--json"]) == 0
    out = capsys.readouterr()
    assert "adapter: runs/sft/adapter" in out.err
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert len(rows) == 5 and all("answer" in r and "base_answer" in r for r in rows)

    assert main(["predict", "--json"]) == 0
    out = capsys.readouterr()
    assert "adapter: runs/sft/adapter" in out.err
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert len(rows) == 5
    for r in rows:
        assert set(r["probabilities"]) == {"billing", "symptoms", "appointment"}
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-3


def test_rm_and_compare_from_an_empty_folder(empty_folder, tiny_model_dir):
    """`fastlora rm` (its default pairs and output dir) and `fastlora compare` (one method
    here; each method runs in a spawned process, which does not see this test's default
    model, so the tiny model is passed)."""
    assert main(["rm", "--max-steps", "1", "--eval-max-examples", "4", "--no-progress"]) == 0
    assert (empty_folder / "runs" / "rm" / "summary.json").is_file()
    assert main(["compare", "--peft", "prompt", "--model", str(tiny_model_dir), "--max-steps", "1",
                 "--test-max-examples", "3", "--threads", "1"]) == 0
    rows = json.loads((empty_folder / "runs" / "compare" / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["prompt"] and not rows[0].get("error")
    assert (empty_folder / "runs" / "compare" / "compare.md").is_file()
