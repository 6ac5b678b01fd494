"""The ``fastlora`` command: ``sft``, ``rm``, ``ppo``, ``rlhf``, ``merge``, ``bench``, ``compare``, ``info``,
``generate`` and ``predict``.

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
import contextlib
import dataclasses
import json
import os
import sys
import typing
from typing import Sequence

# One real sentence per SFTConfig option (tests/train/test_cli.py checks that none is missing).
# "(default: ...)" is appended from the dataclass unless the text already says what the default is.
_HELP = {
    "model": "local Hugging Face model dir (default: the embedded SmolLM2-135M-Instruct)",
    "cache_dir": "where the embedded GGUF model is converted once (default: ~/.cache/fastlora)",
    "load_in_4bit": "load the base model 4-bit NF4 with double quantization through bitsandbytes",
    "dtype": "compute dtype: auto = bfloat16 on GPU, float32 on CPU; or float32, bfloat16, float16",
    "device": "cuda, cuda:N or cpu; auto = cuda when available, else cpu",
    "patch": "use fastlora's kernels (--no-patch: the plain transformers+bnb+PEFT baseline)",
    "share_prefix": ("run the tokens that rows of a batch share (system prompt, a pair's prompt, a group's "
                     "prompt) once, with the same loss and gradients (--no-share-prefix: every row in full)"),
    "data": "training files (.jsonl/.json/.csv) or datasets dirs (default: the embedded healthcare task)",
    "data_format": "auto (from the columns) | alpaca | prompt_completion | messages | text",
    "eval_data": "held-out files (default: --eval-split of the training data)",
    "eval_split": "fraction of the training records held out for evaluation when --eval-data is not given",
    "test_data": "files scored with the task metric (exact match) before and after training (default: none)",
    "max_length": "tokens per example; longer examples are truncated on the right",
    "packing": "pack several examples into each row of --max-length tokens (no padding, no cross-attention)",
    "general_mix": ("fraction of general chat data mixed into training, against forgetting "
                    "(default: 0.2 on the embedded task, else 0)"),
    "peft": ("PEFT method: lora, dora, ia3, prefix, prompt, adapter (bottleneck), bitfit (biases; LN tuning "
             "where the model has none) or ln"),
    "num_virtual_tokens": "virtual tokens of prefix and prompt tuning",
    "adapter_dim": "bottleneck width of --peft adapter",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "target_modules": "LoRA target module names (e.g. q_proj v_proj), or all-linear",
    "optimizer": "auto = paged 8-bit AdamW on GPU, torch AdamW on CPU; or adamw, paged_adamw_8bit",
    "lr": "peak learning rate (default: 5e-4 on the embedded task, else 2e-4)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "optimizer steps of linear warmup",
    "scheduler": "learning-rate schedule after warmup: cosine, linear or constant",
    "max_grad_norm": "clip the gradient norm to this value; 0 disables clipping",
    "batch_size": "examples per micro-batch (per process under torchrun)",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps; 0 = run --epochs epochs (default: 60 on the embedded task, else 0)",
    "epochs": "passes over the training data when --max-steps is 0",
    "gradient_checkpointing": "recompute activations in backward to save memory",
    "seed": "seed of the data order, the eval split, LoRA init and dropout",
    "eval_every": "evaluate every N optimizer steps; 0 = only at the end",
    "eval_metric": "early-stopping metric: auto = accuracy when a task metric exists, else loss",
    "eval_max_examples": "held-out examples used per evaluation; 0 = all",
    "test_max_examples": "test examples scored before and after training; 0 = all",
    "early_stopping_patience": "evaluations without improvement before stopping; 0 = off",
    "eval_batch_size": "batch size of evaluation and generation",
    "max_new_tokens": "tokens generated per answer when scoring accuracy",
    "measure_forgetting": "measure general QA accuracy and perplexity before and after training",
    "output_dir": "where the adapter, metrics.jsonl, curve.png and summary.json go",
    "save_every": "write a resumable checkpoint every N optimizer steps; 0 = none",
    "keep_checkpoints": "checkpoints kept (the newest); 0 = all",
    "resume": ("continue the run in --output-dir from its newest valid checkpoint (it must have one); "
               "--resume=auto starts the run if there is none; a finished run is left untouched (default: off)"),
    "log_every": "log the training metrics every N optimizer steps",
    "progress": "progress bars at a terminal (--no-progress: none; plain lines are printed in any case)",
    "parallel": "under torchrun/accelerate launch: ddp (every process holds the 4-bit base) or fsdp (FSDP2 shards it)",
    "init_adapter": "PEFT adapter dir to start the reward adapter from (e.g. runs/sft/adapter; default: a fresh one)",
    "center": "weight c of the centering term c*(r_chosen + r_rejected)^2 (rm)",
}


# Where the reward model's option means something else than SFT's (or has another default).
_RM_HELP = {
    "data": "preference files (.jsonl/.json/.csv) or datasets dirs: prompt/chosen/rejected or chosen/rejected "
            "message lists, optional margin (default: the embedded healthcare pairs)",
    "eval_data": "held-out preference files (default: --eval-split of the training pairs)",
    "max_length": "tokens per prompt + response; longer ones keep their last tokens (the end of the response)",
    "lr": "peak learning rate (default: 5e-4 on the embedded task, else 1e-4)",
    "batch_size": "preference pairs per micro-batch (two sequences each; per process under torchrun)",
    "max_steps": "optimizer steps; 0 = run --epochs epochs (default: 40 on the embedded task, else 0)",
    "eval_max_examples": "held-out pairs scored before and after training; 0 = all (default: 150 on the embedded task)",
    "eval_batch_size": "pairs per batch when scoring held-out pairs",
    "output_dir": "where the reward model (adapter/), metrics.jsonl, curve.png, scores.png and summary.json go",
}


# PPO's own options, and those whose meaning differs from SFT's.
_PPO_HELP = {
    "sft_adapter": "the SFT adapter the policy starts from; it stays frozen as the reference (default: the "
                   "default SFT run's on the embedded task, else none: the raw base)",
    "sft_output_dir": "embedded default: where the default SFT run is, run first if absent",
    "data": "prompt files (prompt or messages records) (default: the embedded healthcare task)",
    "test_data": "files scored greedily (exact match) before and after PPO (default: the embedded task's test set)",
    "test_max_examples": "test examples scored before and after; 0 = all",
    "measure_forgetting": "general QA after PPO, for retention",
    "max_prompt_length": "prompt tokens kept (the end of longer prompts)",
    "reward_model": "dir of a fastlora rm result, the reward role (default: the embedded default's if it exists)",
    "reward_fn": "reward as module:function or file.py:function taking prompts and responses (default: the task's "
                 "rule reward)",
    "reward_model_weight": "weight of the reward model's score when both rewards are given",
    "reward_fn_weight": "weight of the reward function's score when both rewards are given",
    "score_clip": "clip scores to [-c, c] (default: off)",
    "truncation_penalty": "score of a response that hits --max-new-tokens without a stop (default: off)",
    "on_reward_error": "skip | stop: what a reward that raises or returns NaN does (the sample is named)",
    "temperature": "rollout sampling temperature",
    "top_p": "rollout nucleus sampling mass in (0, 1]",
    "top_k": "rollout top-k; 0 = off",
    "advantage": "gae (critic and GAE) or grpo (z-scored scores within a group of responses, no critic)",
    "group_size": "grpo: responses sampled per prompt",
    "critic": "separate (its own adapter and value head) or shared (value head on the policy's trunk)",
    "ppo_epochs": "passes of PPO updates over each rollout",
    "mini_batch_size": "rollout rows per optimizer step; must divide the rollout (default: the whole rollout; "
                       "per process under torchrun)",
    "clip": "policy ratio clip epsilon",
    "vf_clip": "value clip epsilon",
    "vf_coef": "weight of the value loss",
    "ent_coef": "weight of the entropy bonus",
    "gamma": "discount of GAE",
    "lam": "lambda of GAE",
    "kl_coef": "beta of the per-token KL penalty to the reference (the start value with --kl-target)",
    "kl_kind": "KL estimator: k1, k3, abs or mse",
    "kl_target": "adaptive KL controller target (default: off, a fixed --kl-coef)",
    "kl_horizon": "adaptive KL controller horizon, in episodes",
    "whiten_advantages": "whiten advantages over the valid tokens of the rollout",
    "score_baseline": "none, or greedy: subtract from each score the score of the policy's greedy answer to the "
                      "same prompt (one more greedy rollout per step; removes a reward model's per-prompt offsets)",
    "critic_lr": "learning rate of the critic (default: --lr)",
    "sample_every": "log sample responses every N rollouts; 0 = never",
    "batch_size": "prompts per rollout (x --group-size with grpo; per process under torchrun) (default: set by the "
                  "task)",
    "max_steps": "rollouts, each followed by --ppo-epochs of updates (default: set by the task)",
    "lr": "learning rate of the policy (default: set by the task)",
    "output_dir": "where the policy adapter, roles/, metrics.jsonl, samples.jsonl, curves.png and summary.json go",
}


def _help_text(name: str, default, helps: dict | None = None) -> str:
    text = (helps or {}).get(name) or _HELP[name]
    if "default" in text or default is dataclasses.MISSING or default is None:
        return text
    shown = " ".join(default) if isinstance(default, list) else default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    return f"{text} (default: {shown})"


def _resume_value(text: str):
    low = text.lower()
    if low == "auto":
        return "auto"
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto (or yes/no), got {text!r}")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (the number of CPU threads), got {n}")
    return n


def _add_config_flags(p: argparse.ArgumentParser, config_cls=None, helps: dict | None = None) -> None:
    from .train.config import SFTConfig

    config_cls = config_cls or SFTConfig
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        help_txt = _help_text(f.name, f.default, helps)
        # SUPPRESS: only flags actually given override the YAML file / the dataclass defaults.
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_txt)
        if f.name == "resume":  # --resume, --resume=auto, --no-resume
            p.add_argument(flag, nargs="?", const=True, type=_resume_value, metavar="auto", **kw)
            p.add_argument("--no-resume", dest=f.name, action="store_const", const=False,
                           default=argparse.SUPPRESS, help="start fresh (the output dir must not hold a run)")
        elif hint is bool:
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
    try:  # fastlora.bench imports the stdlib only: cheap
        from .bench import AREAS, PRESETS
    except ImportError:  # a checkout without the runner: bench then says so when run
        AREAS, PRESETS = (), ()

    parser = argparse.ArgumentParser(prog="fastlora", description="fused NF4+LoRA kernels and a thin QLoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True)

    sft = sub.add_parser("sft", help="QLoRA supervised fine-tuning (no arguments: the embedded healthcare demo)",
                         description="QLoRA supervised fine-tuning. With no arguments: the embedded healthcare "
                                     "demo on SmolLM2-135M-Instruct.")
    sft.add_argument("--config", help="YAML file of SFTConfig options; flags override it (default: none)")
    sft.add_argument("--threads", type=_positive_int, default=None,
                     help="torch CPU threads, >= 1 (default: torch's choice)")
    _add_config_flags(sft)

    from .train.reward import RewardConfig

    rm = sub.add_parser("rm", help="reward model on the shared 4-bit base (no arguments: the embedded healthcare pairs)")
    rm.add_argument("--config", help="YAML file of RewardConfig options; flags override it (default: none)")
    rm.add_argument("--threads", type=_positive_int, default=None,
                    help="torch CPU threads, >= 1 (default: torch's choice)")
    _add_config_flags(rm, RewardConfig, _RM_HELP)

    merge = sub.add_parser("merge", help="merge an adapter into its dequantized base; write a 16-bit model")
    merge.add_argument("--adapter", required=True, help="PEFT adapter dir (e.g. runs/sft/adapter)")
    merge.add_argument("--output", required=True, help="new directory for the merged model")
    merge.add_argument("--model", default=None, help="base model dir (default: the adapter's base_model_name_or_path)")
    merge.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                       help="dtype of the merged weights (default: bfloat16)")
    merge.add_argument("--cache-dir", default=None,
                       help="where the embedded GGUF model is converted once (default: ~/.cache/fastlora)")

    bench = sub.add_parser("bench", help="run the benchmark suite (fastlora.bench)",
                           description=f"Run the benchmark suite. Presets: {', '.join(PRESETS)}. "
                                       f"Areas: {', '.join(AREAS)}.")
    bench.add_argument("--preset", default=None, choices=PRESETS or None,
                       help=f"problem sizes: {', '.join(PRESETS)} (default: tiny; prefix-cpu for --only prefix "
                            "on a CPU)")
    bench.add_argument("--only", nargs="+", default=None, metavar="AREA",
                       help=f"run only these areas: {', '.join(AREAS)} (default: all)")
    bench.add_argument("--results-dir", default=None,
                       help="where the results go (default: benchmarks/results of the checkout)")

    cmp = sub.add_parser("compare", help="PEFT methods side by side on one task: a measured table and plot "
                                         "(no arguments: every method on the embedded healthcare task)")
    cmp.add_argument("--peft", default=None,
                     help="comma-separated methods (default: all: lora,ia3,prefix,adapter,bitfit,prompt,dora)")
    cmp.add_argument("--output-dir", default="runs/compare",
                     help="where the table, plot and one run dir per method go (default: runs/compare)")
    cmp.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads per run (default: 2)")
    cmp.add_argument("--jobs", type=_positive_int, default=1,
                     help="methods run at a time (default: 1, for clean timings)")
    for flag, kind in (("--model", str), ("--max-steps", int), ("--test-max-examples", int), ("--batch-size", int)):
        cmp.add_argument(flag, type=kind, default=None,
                         help="passed to every run (default: each run's own; see fastlora sft --help)")
    cmp.add_argument("--data", nargs="+", default=None,
                     help="passed to every run (default: the embedded task; see fastlora sft --help)")
    cmp.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=None,
                     help="passed to every run: " + _HELP["share_prefix"] + " (default: on)")

    from .train.ppo_config import PPOConfig

    ppo = sub.add_parser("ppo", help="PPO/GRPO on one shared 4-bit base (no arguments: continue the default SFT run)")
    ppo.add_argument("--config", help="YAML file of PPOConfig options; flags override it (default: none)")
    ppo.add_argument("--threads", type=_positive_int, default=None,
                     help="torch CPU threads, >= 1 (default: torch's choice)")
    _add_config_flags(ppo, PPOConfig, _PPO_HELP)

    rlhf = sub.add_parser("rlhf", help="SFT -> reward model -> PPO on the embedded task, skipping finished stages")
    rlhf.add_argument("--runs-dir", default="runs", help="where the stages' output dirs are (default: runs)")
    rlhf.add_argument("--threads", type=_positive_int, default=None,
                      help="torch CPU threads, >= 1 (default: torch's choice)")
    rlhf.add_argument("--cache-dir", default=None,
                      help="where the embedded GGUF model is converted once (default: ~/.cache/fastlora)")
    rlhf.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                      help="every stage: " + _HELP["share_prefix"] + " (default: on)")

    sub.add_parser("info", help="print the backends available on this machine")
    _add_generate_parsers(sub)
    # Every subcommand, including those added above this line by other modules' helpers, gets --debug.
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error (default: one line)")
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
        p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default: 16)")
        p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto = cuda when available (default: auto)")
        p.add_argument("--cache-dir", default=None,
                       help="where the embedded GGUF model is converted once (default: ~/.cache/fastlora)")
        p.add_argument("--json", action="store_true", help="one JSON object per prompt")
        p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer at most (default: 64)")
            p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
            p.add_argument("--top-k", type=int, default=None, help="sample among the k most probable tokens (default: off)")
            p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
            p.add_argument("--seed", type=int, default=None, help="seed that makes sampling reproducible (default: none)")
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
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "threads", "debug")}
    if args.config:
        cfg = config_cls.from_yaml(args.config, **overrides)
    else:
        cfg = config_cls.from_dict(overrides, source="command line")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with _launched_by_torchrun():
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
    with _launched_by_torchrun():
        rlhf(runs_dir=args.runs_dir, cache_dir=args.cache_dir, share_prefix=args.share_prefix)
    return 0


@contextlib.contextmanager
def _launched_by_torchrun():
    """Join the process group when torchrun / accelerate launch started this process (they
    set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); leave it at the end."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from .train import distributed

    distributed.setup(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield
    finally:
        distributed.teardown()


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


def _cmd_compare(args: argparse.Namespace) -> int:
    from .train.compare import CompareConfig, compare

    keys = ("model", "max_steps", "test_max_examples", "batch_size", "data", "share_prefix")
    options = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    methods = {"methods": args.peft} if args.peft else {}
    compare(CompareConfig(output_dir=args.output_dir, threads=args.threads, jobs=args.jobs, sft_options=options,
                          **methods))
    return 0


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
               "generate": _cmd_generate, "predict": _cmd_generate, "compare": _cmd_compare, "ppo": _cmd_ppo,
               "rlhf": _cmd_rlhf}[args.command]
    debug = getattr(args, "debug", False)
    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # bad input: a file, an option, a model path (exit 2)
        return _fail(args.command, str(e), 2, debug)
    except OSError as e:
        # the environment: full disk, read-only or permission-denied path (exit 1)
        from .train.checkpoint import describe_os_error

        return _fail(args.command, describe_os_error(e), 1, debug)
    except RuntimeError as e:
        # Another rank's bad input (fastlora.train.distributed.RankError): stop with its message.
        loaded = sys.modules.get("fastlora.train.distributed")
        if loaded is None or not isinstance(e, loaded.RankError):
            raise
        return _fail(args.command, str(e), 2, debug)
    except KeyboardInterrupt:
        print(f"fastlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except _run_finished() as e:  # --resume on a finished run: nothing to do, not an error
        print(f"fastlora {args.command}: {e}")
        return 0


def _run_finished() -> type[BaseException]:
    # Looked up only when an exception got this far; the trainers' module is loaded by then.
    mod = sys.modules.get("fastlora.train.run")
    return mod.RunFinished if mod is not None else _Never


class _Never(Exception):
    pass


def _fail(command: str, message: str, status: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    else:
        message += " (--debug shows the traceback)" if status == 1 else ""
    print(f"fastlora {command}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
