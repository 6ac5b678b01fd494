"""``fastlora rlhf``: the three stages on the embedded task, SFT -> reward model -> PPO.

Each stage runs with its own no-argument defaults, in ``<runs_dir>/sft``, ``/rm`` and
``/ppo``, and is skipped when its ``summary.json`` exists (a stage that was interrupted
resumes from its last checkpoint when it has one). The run ends with one table: the
test accuracy and general-QA retention after each stage, the reward model's held-out
pairwise accuracy, and the PPO reward (mean score of the greedy test answers) before
and after.

Under torchrun (``torchrun --nproc_per_node N -m fastlora rlhf``) every stage runs
distributed: SFT, the reward model and PPO each follow ``distributed.py``'s conventions.
The main rank decides which stages are done and tells the others, and every rank waits at
the end of a stage, so that the next one reads the files the last one wrote.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import distributed as dist


def _summary(d: Path) -> dict | None:
    p = d / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}, line {e.lineno}: malformed JSON ({e.msg}); remove the stage's dir to rerun it") from None


def _resume(d: Path) -> bool:
    return ckpt.latest_checkpoint(d) is not None


def rlhf(runs_dir: str | Path = "runs", *, cache_dir: str | None = None, progress: bool = True,
         share_prefix: bool = True) -> dict:
    """Run (or skip) the three stages and return {"sft", "rm", "ppo", "table"}; ``share_prefix``
    is every stage's (the tokens a batch's rows share run once)."""
    runs = Path(runs_dir)
    log = print if progress and dist.is_main() else (lambda *_: None)
    out: dict[str, Any] = {}
    sft_dir, rm_dir, ppo_dir = runs / "sft", runs / "rm", runs / "ppo"

    def run_sft():
        from .config import SFTConfig
        from .sft import sft

        return sft(SFTConfig(output_dir=str(sft_dir), cache_dir=cache_dir, progress=progress,
                             resume=_resume(sft_dir), share_prefix=share_prefix))

    def run_rm():
        from .reward import RewardConfig, reward

        return reward(RewardConfig(output_dir=str(rm_dir), cache_dir=cache_dir, progress=progress,
                                   resume=_resume(rm_dir), share_prefix=share_prefix))

    def run_ppo():
        from .ppo import find_reward_adapter, ppo
        from .ppo_config import PPOConfig

        return ppo(PPOConfig(output_dir=str(ppo_dir), sft_output_dir=str(sft_dir),
                             reward_model=str(find_reward_adapter(rm_dir)), cache_dir=cache_dir,
                             progress=progress, resume=_resume(ppo_dir), share_prefix=share_prefix))

    stages = (("sft", "SFT", sft_dir, run_sft), ("rm", "reward model", rm_dir, run_rm),
              ("ppo", "PPO", ppo_dir, run_ppo))
    for i, (key, name, d, run) in enumerate(stages, 1):
        out[key] = dist.on_main(lambda: _summary(d), f"reading {d / 'summary.json'}")
        if out[key] is None:
            log(f"== stage {i}/3: {name} -> {d}")
            out[key] = run()
            dist.barrier()  # the stage's files (rank 0 writes them last) before the next stage reads them
        else:
            log(f"== stage {i}/3: {name}: done ({d / 'summary.json'})")

    out["table"] = table(out["sft"], out["rm"], out["ppo"])
    if progress and dist.is_main():
        print_table(out["table"])
    return out


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def table(sft: dict, rm: dict, ppo: dict) -> list[tuple[str, str, str, str]]:
    """Rows (stage, test accuracy, general-QA retention, stage metric)."""
    base_qa = sft.get("general_qa_before")
    ppo_ret = (ppo.get("general_qa_after") / base_qa) if base_qa and ppo.get("general_qa_after") is not None else None
    rm_acc = rm.get("accuracy_after")
    return [
        ("base model", _pct(sft.get("accuracy_before")), "100.0%", ""),
        ("SFT", _pct(sft.get("accuracy_after")), _pct(sft.get("retention")),
         f"final train loss {_num(sft.get('final_train_loss'))}"),
        ("reward model", "", "", f"held-out pairwise accuracy {_pct(rm_acc)}"),
        ("PPO", _pct(ppo.get("accuracy_after")), _pct(ppo_ret),
         f"test reward {_num(ppo.get('test_reward_before'))} -> {_num(ppo.get('test_reward_after'))}"),
    ]


def print_table(rows) -> None:
    header = ("stage", "test accuracy", "retention", "")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        for r in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        return
    t = Table(title="fastlora rlhf")
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    Console().print(t)
