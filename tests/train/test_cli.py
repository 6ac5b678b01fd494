"""The fastlora CLI: flags map onto SFTConfig, YAML + flag overrides, clear errors (exit 2,
no traceback), info/bench delegation, and a real tiny run through the command line."""
from __future__ import annotations

import json

import pytest

from fastlora import cli
from fastlora.train import SFTConfig


def _parse(argv):
    return cli.build_parser().parse_args(argv)


def test_every_config_field_has_a_flag():
    flags = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["sft"]._actions}
    missing = set(SFTConfig.field_names()) - flags
    assert not missing, missing


def test_flags_override_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.001\nbatch-size: 4\ntarget_modules: [q_proj, v_proj]\npacking: true\nmax_steps: 7\n")
    args = _parse(["sft", "--config", str(y), "--lr", "3e-4", "--no-patch", "--data", "a.jsonl", "b.jsonl"])
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "threads")}
    cfg = SFTConfig.from_yaml(y, **overrides)
    assert cfg.lr == 3e-4  # flag wins
    assert cfg.batch_size == 4 and cfg.packing is True and cfg.max_steps == 7  # from the file
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.patch is False and cfg.data == ["a.jsonl", "b.jsonl"]
    # Flags not given leave the dataclass defaults alone.
    assert cfg.warmup_steps == SFTConfig().warmup_steps


def test_task_dependent_defaults():
    from fastlora.train.config import EMBEDDED_TASK, GENERIC

    embedded = SFTConfig().resolved()
    assert (embedded.lr, embedded.general_mix, embedded.max_steps) == (
        EMBEDDED_TASK["lr"], EMBEDDED_TASK["general_mix"], EMBEDDED_TASK["max_steps"])
    custom = SFTConfig(data="x.jsonl").resolved()
    assert (custom.lr, custom.general_mix, custom.max_steps) == (GENERIC["lr"], 0.0, 0)
    explicit = SFTConfig(lr=1e-5, general_mix=0.0, max_steps=3).resolved()
    assert (explicit.lr, explicit.general_mix, explicit.max_steps) == (1e-5, 0.0, 3)


@pytest.mark.parametrize(
    "yaml_text, match",
    [("lrr: 0.1\n", r"unknown option\(s\) \['lrr'\]"), ("batch_size: eight\n", "batch_size"),
     ("- a\n- b\n", "mapping"), ("lr: [\n", "not valid YAML"), ("scheduler: cosinus\n", "scheduler")],
)
def test_bad_yaml_exits_2_with_a_clear_message(tmp_path, capsys, yaml_text, match):
    y = tmp_path / "bad.yaml"
    y.write_text(yaml_text)
    assert cli.main(["sft", "--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(match, err), err


def test_missing_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["sft", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
    assert cli.main(["sft", "--model", str(tmp_path / "no_model"), "--data", str(tmp_path / "x.jsonl"),
                     "--output-dir", str(out)]) == 2
    assert "x.jsonl" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["merge", "--adapter", str(tmp_path / "no_adapter"), "--output", str(out)]) == 2
    assert "no_adapter" in capsys.readouterr().err
    assert not out.exists()


def test_info_prints_backends(capsys):
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out.strip()


def test_bench_delegates(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("fastlora.bench")
    statuses = iter([0, 4])
    fake.run = lambda **kw: calls.append(kw) or next(statuses)
    monkeypatch.setitem(sys.modules, "fastlora.bench", fake)
    assert cli.main(["bench", "--preset", "tiny", "--only", "nf4"]) == 0
    assert calls == [{"preset": "tiny", "only": ["nf4"]}]
    # A failed suite (pytest exit status 4) is the command's exit status, not a silent 0.
    assert cli.main(["bench", "--preset", "tiny"]) == 4


def test_sft_through_the_cli(tiny_model_dir, chat_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sft", "--model", str(tiny_model_dir), "--data", str(chat_jsonl), "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "4", "--measure-forgetting", "--no-progress", "--patch",
            "--lora-r", "2", "--max-length", "64", "--general-mix", "0.25", "--gradient-checkpointing",
            "--eval-split", "0.25"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["patched"] is True
    assert summary["patch_report"]["patched"]  # fastlora.patch ran on the trained model
    assert summary["train_examples"] == 18 + 6  # 24 records - 6 held out, + 25% general records
    assert summary["perplexity_before"] > 1 and summary["perplexity_after"] > 1
    assert 0 <= summary["general_qa_before"] <= 1 and 0 <= summary["general_qa_after"] <= 1
    assert summary["final_train_loss"] == summary["final_train_loss"]  # not NaN with checkpointing
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["lora_r"] == 2
    # Running again into the same dir is refused with a clear message.
    assert cli.main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err


def _sft_parser():
    return cli.build_parser()._subparsers._group_actions[0].choices["sft"]


def test_every_option_has_a_real_help_text_with_its_default_once(capsys):
    for name, sub in cli.build_parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            text = action.help or ""
            words = action.dest.replace("_", " ")
            assert text and text.strip(" .") != words, (name, action.dest)
            assert text.count("(default:") <= 1 and "(default: None)" not in text, (name, action.dest, text)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    from fastlora.bench import AREAS, PRESETS

    assert all(p in out for p in PRESETS) and all(a in out for a in AREAS)


def test_resume_flag_forms():
    p = _sft_parser()
    assert p.parse_args(["--resume"]).resume is True
    assert p.parse_args(["--resume=auto"]).resume == "auto"
    assert p.parse_args(["--resume", "auto"]).resume == "auto"
    assert p.parse_args(["--no-resume"]).resume is False
    assert SFTConfig(resume="auto").resume == "auto"
    with pytest.raises(ValueError, match="resume must be"):
        SFTConfig(resume="sometimes")


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_threads_must_be_a_positive_count(value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["sft", "--threads", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "Traceback" not in err


def test_environment_errors_exit_1_in_one_line(monkeypatch, tmp_path, capsys):
    import errno
    import os

    def full(cfg):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "adapter"))

    monkeypatch.setattr("fastlora.train.sft", full)
    assert cli.main(["sft"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"No space left on device: {tmp_path / 'run' / 'adapter'} (errno 28); free some space" in err
    assert cli.main(["sft", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "OSError" in err


def test_read_only_output_dir_fails_before_the_model_loads(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch, capsys):
    import errno

    from fastlora.train import model as model_mod
    from fastlora.train import run as lifecycle

    def refuse(*a, **k):  # what a read-only mount answers (root ignores chmod 0555)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(lifecycle.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(model_mod, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "ro" / "run"
    assert cli.main(["sft", "--model", str(tiny_model_dir), "--data", str(chat_jsonl), "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"output dir {out} (to be created in {tmp_path}) is not writable: Read-only file system" in err


def test_resume_of_a_finished_run_exits_0(monkeypatch, tmp_path, capsys):
    from fastlora.train.run import RunFinished

    (tmp_path / "summary.json").write_text("{}")

    def finished(cfg):  # what a trainer's check_output_dir raises (the reward-model and PPO trainers too)
        raise RunFinished(tmp_path)

    monkeypatch.setattr("fastlora.train.sft", finished)
    assert cli.main(["sft", "--resume"]) == 0
    assert "is finished" in capsys.readouterr().out
