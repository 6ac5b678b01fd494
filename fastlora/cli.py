"""The ``fastlora`` command: ``sft``, ``rm``, ``ppo``, ``rlhf``, ``merge``, ``bench``, ``info``, ``generate``
and ``predict``.

It only parses and delegates: ``sft`` builds an :class:`~fastlora.train.SFTConfig` (from
``--config file.yaml`` if given, every flag overriding the file) and calls
``fastlora.train.sft``; ``merge`` calls ``fastlora.train.merge``; ``bench`` calls
``fastlora.bench.run``; ``info`` prints ``fastlora.backend.backend_info()``.
The flags of ``sft`` are generated from SFTConfig's fields (``lora_r`` → ``--lora-r``,
booleans as ``--patch/--no-patch``), so the two cannot drift apart.

Bad input (missing file, wrong model path, unknown option, ...) exits with status 2
and a one-line message, without a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Sequence

_HELP = {
    "model": "local Hugging Face model dir (default: the embedded SmolLM2-135M-Instruct)",
    "data": "training files (.jsonl/.json/.csv) or datasets dirs (default: the embedded healthcare task)",
    "data_format": "auto | alpaca | prompt_completion | messages | text",
    "eval_data": "held-out files (default: --eval-split of the training data)",
    "test_data": "files scored with the task metric (exact match) before and after training",
    "target_modules": "LoRA target module names, or all-linear",
    "patch": "use fastlora's kernels (--no-patch: the plain transformers+bnb+PEFT baseline)",
    "resume": "continue the run in --output-dir from its last checkpoint",
    "output_dir": "where the adapter, metrics.jsonl, curve.png and summary.json go",
    "general_mix": "fraction of general chat data mixed into training (against forgetting)",
    "center": "weight c of the centering term c*(r_chosen + r_rejected)^2 (rm)",
}


def _add_config_flags(p: argparse.ArgumentParser, config_cls=None) -> None:
    from .train.config import SFTConfig

    config_cls = config_cls or SFTConfig
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        default_txt = f" (default: {f.default})" if f.default is not dataclasses.MISSING else ""
        help_txt = _HELP.get(f.name, f.name.replace("_", " ")) + default_txt
        # SUPPRESS: only flags actually given override the YAML file / the dataclass defaults.
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_txt)
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif any(typing.get_origin(a) is list for a in args):
            p.add_argument(flag, nargs="+", metavar="VALUE", **kw)
        elif float in args:
            p.add_argument(flag, type=float, **kw)
        elif int in args:
            p.add_argument(flag, type=int, **kw)
        else:
            p.add_argument(flag, type=str, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description="fused NF4+LoRA kernels and a thin QLoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)

    sft = sub.add_parser("sft", help="QLoRA supervised fine-tuning (no arguments: the embedded healthcare demo)")
    sft.add_argument("--config", help="YAML file of SFTConfig options; flags override it")
    sft.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_config_flags(sft)

    from .train.reward import RewardConfig

    rm = sub.add_parser("rm", help="reward model on the shared 4-bit base (no arguments: the embedded healthcare pairs)")
    rm.add_argument("--config", help="YAML file of RewardConfig options; flags override it")
    rm.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_config_flags(rm, RewardConfig)

    merge = sub.add_parser("merge", help="merge an adapter into its dequantized base; write a 16-bit model")
    merge.add_argument("--adapter", required=True, help="PEFT adapter dir (e.g. runs/sft/adapter)")
    merge.add_argument("--output", required=True, help="new directory for the merged model")
    merge.add_argument("--model", default=None, help="base model dir (default: the adapter's base_model_name_or_path)")
    merge.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    merge.add_argument("--cache-dir", default=None)

    bench = sub.add_parser("bench", help="run the benchmark suite (fastlora.bench)")
    bench.add_argument("--preset", default="tiny")
    bench.add_argument("--only", nargs="+", default=None)
    bench.add_argument("--results-dir", default=None)

    from .train.ppo_config import PPOConfig

    ppo = sub.add_parser("ppo", help="PPO/GRPO on one shared 4-bit base (no arguments: continue the default SFT run)")
    ppo.add_argument("--config", help="YAML file of PPOConfig options; flags override it")
    ppo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_config_flags(ppo, PPOConfig)

    rlhf = sub.add_parser("rlhf", help="SFT -> reward model -> PPO on the embedded task, skipping finished stages")
    rlhf.add_argument("--runs-dir", default="runs", help="where the stages' output dirs are (default: runs)")
    rlhf.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    rlhf.add_argument("--cache-dir", default=None)

    sub.add_parser("info", help="print the backends available on this machine")
    _add_generate_parsers(sub)
    return parser


def _add_generate_parsers(sub) -> None:
    """``generate`` and ``predict`` (fastlora.generate.commands)."""
    for name, help_txt in (
        ("generate", "answer prompts with the base model and the adapter, side by side (no arguments: the "
                     "default run's adapter on a few healthcare queries)"),
        ("predict", "label-restricted prediction: the most probable allowed answer, its probability, and "
                    "human review below --min-confidence"),
    ):
        p = sub.add_parser(name, help=help_txt)
        p.add_argument("prompts", nargs="*", help="prompts (default: --file, else standard input, else examples)")
        p.add_argument("--file", help="prompts: one per line, or .jsonl with prompt/text/messages")
        p.add_argument("--model", help="base model dir (default: the adapter's base, else the embedded default)")
        p.add_argument("--adapter", help="PEFT adapter dir (default: runs/sft/adapter when it exists)")
        p.add_argument("--system", help="system prompt (default on the embedded task: the healthcare one)")
        p.add_argument("--raw", action="store_true", help="no chat template: continue the prompts as given")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--device", default="auto")
        p.add_argument("--cache-dir", default=None)
        p.add_argument("--json", action="store_true", help="one JSON object per prompt")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int, default=64)
            p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--top-p", type=float, default=None)
            p.add_argument("--seed", type=int, default=None)
            p.add_argument("--no-compare", dest="compare", action="store_false",
                           help="only the adapter's answers (default: also the base model's)")
        else:
            p.add_argument("--choices", nargs="+", default=None,
                           help="the allowed answers, as the model writes them (default on the embedded task: "
                                "its three labels)")
            p.add_argument("--min-confidence", type=float, default=None,
                           help="below this probability an example is marked for human review (default 0.9)")


def _run_trainer(args: argparse.Namespace, config_cls, run) -> int:
    """Build ``config_cls`` from --config and the flags given (flags win) and call ``run``."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "threads")}
    if args.config:
        cfg = config_cls.from_yaml(args.config, **overrides)
    else:
        cfg = config_cls.from_dict(overrides, source="command line")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run(cfg)
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from .train import SFTConfig, sft

    return _run_trainer(args, SFTConfig, sft)


def _cmd_rm(args: argparse.Namespace) -> int:
    from .train.reward import RewardConfig, reward

    return _run_trainer(args, RewardConfig, reward)


def _cmd_ppo(args: argparse.Namespace) -> int:
    from .train.ppo import ppo
    from .train.ppo_config import PPOConfig

    return _run_trainer(args, PPOConfig, ppo)


def _cmd_rlhf(args: argparse.Namespace) -> int:
    from .train.rlhf import rlhf

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rlhf(runs_dir=args.runs_dir, cache_dir=args.cache_dir)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .train import merge

    out = merge(args.adapter, args.output, model=args.model, dtype=args.dtype, cache_dir=args.cache_dir)
    print(f"merged model written to {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        bench = importlib.import_module("fastlora.bench")
    except ImportError as e:
        print(f"fastlora: error: the benchmark runner fastlora.bench is not available ({e})", file=sys.stderr)
        return 2
    kwargs = {"preset": args.preset, "only": args.only}
    if args.results_dir is not None:
        kwargs["results_dir"] = args.results_dir
    return bench.run(**kwargs)


def _cmd_info(args: argparse.Namespace) -> int:
    from .backend import backend_info

    info = backend_info()
    print(json.dumps(info, indent=2, default=str) if isinstance(info, (dict, list)) else info)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate.commands import GenerateConfig, run_generate, run_predict

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(GenerateConfig)}
    cfg = GenerateConfig(**{k: v for k, v in vars(args).items() if k in fields})
    (run_generate if args.command == "generate" else run_predict)(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"sft": _cmd_sft, "rm": _cmd_rm, "merge": _cmd_merge, "bench": _cmd_bench, "info": _cmd_info,
               "generate": _cmd_generate, "predict": _cmd_generate, "ppo": _cmd_ppo, "rlhf": _cmd_rlhf}[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
