"""Reward models on the shared 4-bit base: ``fastlora.train.reward(RewardConfig(...))``.

The model is :class:`fastlora.rl.SharedBase` with one role, ``reward``: a LoRA adapter and a
scalar head ``Linear(hidden, 1)`` read at each sequence's last token. Each step scores the
chosen and the rejected responses of a batch of pairs in ONE forward (2B sequences) and
minimizes the Bradley–Terry loss ``fastlora.rl.reward_loss`` in fp32:
``-log σ(r_chosen - r_rejected - margin) + center·(r_chosen + r_rejected)²``.

Everything around the loop is the SFT trainer's: the output dir rules, atomic checkpoints
and ``resume`` (``train/checkpoint.py``), the optimizer and scheduler (``sft.make_optimizer``,
``sft.make_scheduler``), the data order (``data.batch_order``), ``metrics.jsonl``, the curve
PNG and the summary table (``sft.plot_curve``, ``sft.print_summary``). Gradient accumulation
weighs each micro-batch by its share of the step's pairs, so the update is the full batch's.

The result, ``output_dir/adapter``, is a PEFT sequence-classification adapter
(``task_type="SEQ_CLS"``, the head as ``score`` in ``modules_to_save``): transformers'
``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)`` +
``PeftModel.from_pretrained`` scores with it, and PPO loads it as the ``reward`` role of its
own shared base (``SharedBase.add_role("reward", from_pretrained=...)``).

The embedded default (``data=None``) starts from the BASE model (SmolLM2-135M-Instruct,
no SFT adapter): the reward model must judge any policy's answers, and starting from the
base keeps ``fastlora rm`` independent of an SFT run. It trains on the healthcare
preference pairs of ``defaults/preferences.py`` and reports pairwise accuracy on the held-out
test split's pairs, before and after, overall and per kind of rejected answer.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..patch.prefix import PrefixMeter
from . import checkpoint as ckpt
from .config import SFTConfig, SCHEDULERS, OPTIMIZERS, DTYPES, PARALLEL

# Options whose default depends on the task (fields left at None, see RewardConfig.resolved).
GENERIC = {"lr": 1e-4, "max_steps": 0, "eval_max_examples": 0}
# The embedded healthcare default, tuned on 2 CPU cores (see the README for the measured run).
EMBEDDED_TASK = {"lr": 5e-4, "max_steps": 40, "eval_max_examples": 150}


@dataclass
class RewardConfig:
    # --- model ---
    model: str | None = None  # local HF causal-LM dir; None = the embedded SmolLM2-135M-Instruct
    cache_dir: str | None = None
    load_in_4bit: bool = True
    dtype: str = "auto"
    device: str = "auto"
    patch: bool = True
    share_prefix: bool = True  # a pair's prompt (and the system prompt) runs once: fastlora.patch's share_prefix

    # --- data ---
    data: list[str] | None = None  # preference files; None = the embedded healthcare pairs
    eval_data: list[str] | None = None  # held-out pairs; None = eval_split of data (default: the test split)
    eval_split: float = 0.1
    max_length: int = 512  # longer sequences keep their LAST max_length tokens
    center: float = 0.0  # weight of the centering term c·(r_chosen + r_rejected)²

    # --- LoRA and head ---
    init_adapter: str | None = None  # start the reward adapter from this PEFT adapter dir (e.g. runs/sft/adapter)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    # --- optimization ---
    optimizer: str = "auto"
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 5
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    batch_size: int = 8  # pairs per micro-batch (2x sequences)
    grad_accum: int = 1
    max_steps: int | None = None  # 0 = run `epochs` epochs
    epochs: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    # under torchrun: ddp = every rank holds the 4-bit base; fsdp = FSDP2 shards base and adapter
    parallel: str = "ddp"

    # --- evaluation ---
    eval_every: int = 0
    eval_max_examples: int | None = None  # held-out pairs scored; 0 = all
    eval_batch_size: int = 16  # pairs

    # --- output ---
    output_dir: str = "runs/rm"
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool | str = False  # True: continue from the newest valid checkpoint; "auto": or start fresh
    log_every: int = 1
    progress: bool = True

    # construction and (de)serialization are SFTConfig's: they only use the class's own fields
    field_names = SFTConfig.__dict__["field_names"]
    from_dict = SFTConfig.__dict__["from_dict"]
    from_yaml = SFTConfig.__dict__["from_yaml"]
    to_dict = SFTConfig.to_dict
    _check_choice = SFTConfig._check_choice

    def __post_init__(self) -> None:
        for name in ("data", "eval_data"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [v])
            elif v is not None:
                setattr(self, name, [str(p) for p in v])
        self._check_choice("scheduler", SCHEDULERS)
        self._check_choice("optimizer", OPTIMIZERS)
        self._check_choice("dtype", DTYPES)
        self._check_choice("parallel", PARALLEL)
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "eval_max_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.center < 0:
            raise ValueError(f"center must be >= 0, got {self.center}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split must be in [0, 1), got {self.eval_split}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.resume not in (False, True, "auto"):
            raise ValueError(f"resume must be true, false or 'auto', got {self.resume!r}")

    def resolved(self) -> "RewardConfig":
        preset = EMBEDDED_TASK if self.data is None else GENERIC
        return dataclasses.replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})


# ----------------------------------------------------------------------- data
def load_data(cfg: RewardConfig) -> dict[str, Any]:
    """Checked train / held-out pairs and their format; reads every file before anything is written."""
    from .pairs import check_pairs, detect_format, load_pairs

    if cfg.data is None:
        from .defaults import preferences

        return {"task": "healthcare-preferences", "format": "chat_pairs",
                "train": check_pairs(preferences.pairs("train"), "chat_pairs"),
                "eval": check_pairs(preferences.pairs("test"), "chat_pairs")}
    records = load_pairs(cfg.data)
    fmt = detect_format(records)
    train = check_pairs(records, fmt)
    if cfg.eval_data:
        ev_records = load_pairs(cfg.eval_data)
        ev_fmt = detect_format(ev_records)
        if (ev_fmt == "chat_pairs") != (fmt == "chat_pairs"):
            raise ValueError(f"eval data is {ev_fmt!r} but the training data is {fmt!r}; use one kind of rows")
        held = check_pairs(ev_records, ev_fmt)
    elif cfg.eval_split > 0 and len(train) >= 2:
        idx = list(range(len(train)))
        random.Random(cfg.seed).shuffle(idx)
        n = max(1, int(round(len(train) * cfg.eval_split)))
        held = [train[i] for i in sorted(idx[:n])]
        train = [train[i] for i in sorted(idx[n:])]
    else:
        held = []
    return {"task": "custom", "format": fmt, "train": train, "eval": held}


# ----------------------------------------------------------------- scoring
def pair_scores(base, items: list[dict], pad_token_id: int, device, *,
                role: str = "reward") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(r_chosen (B,), r_rejected (B,), real tokens) of a batch of encoded pairs.

    The 2B whole sequences run as one batch (chosen rows, then rejected rows). On a base
    patched with shared prefixes (the default) a pair's prompt, and the system prompt all
    pairs start with, run once inside the decoder, with the same scores and gradients as
    the plain batch (``fastlora.patch``'s ``share_prefix``)."""
    from .pairs import collate_pairs

    B = len(items)
    b = collate_pairs(items, pad_token_id)
    scores = base(role, b["input_ids"].to(device), b["attention_mask"].to(device))
    return scores[:B], scores[B:], int(b["attention_mask"].sum())


# ----------------------------------------------------------------- evaluation
@torch.no_grad()
def score_pairs(base, items: list[dict], pad_token_id: int, *, batch_size: int = 16,
                role: str = "reward") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores, rejected scores), each (N,) float32, in the order of ``items``."""
    was_training = base.training
    base.eval()
    try:
        # longest first: less padding; the scores do not depend on the batching
        order = sorted(range(len(items)), key=lambda i: -max(len(items[i]["chosen_ids"]), len(items[i]["rejected_ids"])))
        rc = torch.empty(len(items))
        rr = torch.empty(len(items))
        device = next(base.lm.parameters()).device
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            c, r, _ = pair_scores(base, [items[i] for i in idx], pad_token_id, device, role=role)
            rc[idx], rr[idx] = c.float().cpu(), r.float().cpu()
    finally:
        base.train(was_training)
    return rc, rr


def pairwise_metrics(rc: torch.Tensor, rr: torch.Tensor, kinds: list[str | None] | None = None) -> dict:
    """Accuracy (chosen scored strictly higher), mean margin r_c - r_r, and per-kind accuracy."""
    diff = rc - rr
    out: dict[str, Any] = {"accuracy": float((diff > 0).float().mean()), "mean_margin": float(diff.mean()),
                           "chosen_mean": float(rc.mean()), "rejected_mean": float(rr.mean()), "pairs": len(rc)}
    if kinds and any(k is not None for k in kinds):
        per: dict[str, list[bool]] = {}
        for k, d in zip(kinds, diff.tolist()):
            per.setdefault(str(k), []).append(d > 0)
        out["accuracy_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(per.items())}
    return out


def _evaluate(base, items, pad_id, cfg, fsdp: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Pairwise metrics and the (chosen, rejected) scores of ``items``, in their order. Under
    torchrun each rank scores its share (``distributed.shard``) and the scores are gathered
    back in order. Under FSDP the ranks must run the same forwards: every share is padded to
    the largest with copies of the first pair (scored, then dropped)."""
    from . import distributed as dist

    mine = dist.shard(items)
    n = len(mine)
    if fsdp:
        mine = mine + [items[0]] * (math.ceil(len(items) / dist.world_size()) - n)
    rc, rr = score_pairs(base, mine, pad_id, batch_size=cfg.eval_batch_size)
    pairs = dist.gather_in_order(list(zip(rc[:n].tolist(), rr[:n].tolist())), len(items))
    rc, rr = torch.tensor([c for c, _ in pairs]), torch.tensor([r for _, r in pairs])
    return pairwise_metrics(rc, rr, [it.get("kind") for it in items]), rc, rr


# ------------------------------------------------------------------ checkpoints
class _RewardSaver:
    """What ``checkpoint.save_checkpoint`` saves as the model: the reward adapter + head, in
    the sequence-classification format of the final result."""

    def __init__(self, base):
        self.base = base

    def save_pretrained(self, path) -> None:
        self.base.export_sequence_classification("reward", path)


def _load_checkpoint(path: Path, base, optimizer, scheduler) -> dict:
    ckpt.check_checkpoint(path)  # checksums first: a damaged file is named, never half-loaded
    if ckpt.is_sharded_checkpoint(path):  # an FSDP run's: adapter and head come from the shards
        return ckpt.load_training_state(path, optimizer, scheduler, verify=False, module=base)
    base.load_sequence_classification("reward", path / "adapter")  # shapes checked, file named
    return ckpt.load_training_state(path, optimizer, scheduler, verify=False)


# ------------------------------------------------------------------ the run
def reward(config: RewardConfig | None = None, *, on_step: Callable[[int, dict], bool | None] | None = None,
           **overrides: Any) -> dict:
    """Train a reward model; return the summary (also ``output_dir/summary.json``).

    ``on_step(step, metrics)`` runs after every optimizer step; returning True stops early.
    """
    from . import distributed as dist
    from . import run as lifecycle

    # only the main rank logs and writes; every rank trains
    return lifecycle.start(RewardConfig, config, overrides, "reward()", _reward, on_step, enabled=dist.is_main())


def _reward(cfg: RewardConfig, log, on_step) -> dict:
    from ..rl.math import reward_loss
    from . import distributed as dist
    from . import run as lifecycle
    from .data import batch_order
    from .pairs import encode_pairs
    from .sft import make_optimizer, make_scheduler, plot_curve, print_summary

    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(cfg.output_dir)
    main, world = dist.is_main(), dist.world_size()

    # ---- checks that write nothing
    def check_inputs():
        found = ckpt.check_output_dir(out, resume=cfg.resume, log=log.warn)
        if found is not None:
            # another number of processes only with the same global batch (batch_size x processes)
            regrouped = dist.check_resume_world_size(out / ckpt.RUN_FILE, cfg.to_dict())
            ckpt.check_resume_config(out, cfg.to_dict(), resumable=ckpt.RESUMABLE_CHANGES | regrouped)
        loaded = load_data(cfg)
        if cfg.init_adapter and not (Path(cfg.init_adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"init_adapter {cfg.init_adapter!r} is not a PEFT adapter dir (no "
                                    "adapter_config.json)")
        return found, loaded

    # Under torchrun a rank that cannot read its inputs ends every rank with its error.
    resume_from, data = dist.agree(check_inputs, "checking the output dir and reading the data")
    from .model import load_base, load_tokenizer, resolve_device, resolve_dtype, resolve_model_path

    device = dist.local_device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    model_path = resolve_model_path(cfg.model, cfg.cache_dir)
    lifecycle.preflight_run(out, cfg, model_path)
    tokenizer = load_tokenizer(model_path)
    pad_id = tokenizer.pad_token_id

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    train_items, stats = encode_pairs(data["train"], tokenizer, data["format"], max_length=cfg.max_length)
    log(f"train pairs: {stats}")
    held = data["eval"][: cfg.eval_max_examples] if cfg.eval_max_examples else data["eval"]
    eval_items = []
    if held:
        eval_items, eval_stats = encode_pairs(held, tokenizer, data["format"], max_length=cfg.max_length)
        log(f"held-out pairs: {eval_stats}")
    if cfg.eval_every and not eval_items:
        raise ValueError("eval_every needs held-out pairs: set eval_data or eval_split > 0")
    # batch_size is per rank: a step's global batch holds batch_size * world pairs (see distributed.py)
    micro_per_epoch = math.ceil(len(train_items) / (cfg.batch_size * world))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))

    # ---- model: one 4-bit base, the reward role
    from ..rl.base import SharedBase

    fsdp = world > 1 and cfg.parallel == "fsdp"
    # FSDP: load (and quantize) in host memory; fully_shard moves one unit at a time to the device
    lm = load_base(model_path, load_in_4bit=cfg.load_in_4bit, dtype=dtype,
                   device=torch.device("cpu") if fsdp else device, quant_storage=dtype if fsdp else torch.uint8)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()
    base = SharedBase.from_model(lm, patch=cfg.patch, share_prefix=cfg.share_prefix)
    if cfg.init_adapter:
        # the SFT adapter (or an earlier reward model) as the starting point; a SEQ_CLS dir brings its head
        base.add_role("reward", from_pretrained=cfg.init_adapter, trainable=True, seed=cfg.seed)
    else:
        base.add_role("reward", r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, seed=cfg.seed)
    # The roles run through the decoder (no logits): it is FSDP's root; the head stays whole
    # on every rank and its gradient is averaged with the others' (distributed.average_gradients).
    sync = dist.wrap_fsdp(base.lm, root=base.lm.get_decoder()).get_decoder() if fsdp else base
    base.heads.to(device)  # under FSDP the base was loaded on the host; fully_shard moved its units
    params = base.trainable_parameters(["reward"])  # after sharding: FSDP swaps in its DTensor parameters
    prefix_meter = PrefixMeter(base)
    optimizer = make_optimizer(cfg, params, device)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    sharded = base if cfg.parallel == "fsdp" else None  # parallel='fsdp' checkpoints hold DCP shards

    def save(root=None, keep=cfg.keep_checkpoints):
        return ckpt.save_checkpoint(out, step, _RewardSaver(base), optimizer, scheduler, state, keep=keep,
                                    root=root, sharded=sharded)

    # ---- the output dir is created only now that every input checked out
    if resume_from is None:
        with dist.main_writes() as writer:
            if writer:
                ckpt.init_output_dir(out, lifecycle.run_info(cfg.to_dict(), model_path=str(model_path),
                                                             device=str(device), dtype=str(dtype),
                                                             total_steps=total_steps, task=data["task"],
                                                             world_size=world))
    elif main:
        ckpt.clean_stale(out)
    metrics_path = out / "metrics.jsonl"
    metrics = lifecycle.MetricsWriter(metrics_path, log=log, enabled=main)
    state: dict[str, Any] = {"micro": 0, "pairs": 0, "tokens": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0,
                             "before": {}, "before_scores": None, "history": []}
    step = 0
    if resume_from is not None:
        # Every rank reads the checkpoint rank 0 wrote (the output dir must be shared).
        state.update(dist.agree(lambda: _load_checkpoint(resume_from, base, optimizer, scheduler),
                                f"loading {resume_from}"))
        step = state.pop("step")
        kept = [m for m in ckpt.read_jsonl(metrics_path) if m.get("step", 0) <= step]
        with dist.main_writes() as writer:
            if writer:
                ckpt.write_text_atomic(metrics_path, "".join(ckpt.json_line(m) for m in kept))
        log(f"resumed from {resume_from} at step {step}/{total_steps}")

    # ---- before training
    if resume_from is None and eval_items:
        t_eval = time.perf_counter()
        before, rc0, rr0 = _evaluate(base, eval_items, pad_id, cfg, fsdp)
        before["seconds"] = time.perf_counter() - t_eval
        state["before"] = before
        state["before_scores"] = {"chosen": rc0.tolist(), "rejected": rr0.tolist()}
        log(f"held-out pairwise accuracy before training: {before['accuracy']:.1%} ({len(eval_items)} pairs)")
        metrics.write({"step": 0, "event": "before", **_flat(before)})

    # ---- train
    bar = log.progress(total_steps, initial=step, desc="rm", log_every=cfg.log_every)
    base.train()
    try:
        while step < total_steps:
            t0, c0 = time.perf_counter(), time.process_time()
            batches = []
            for _ in range(cfg.grad_accum):
                epoch, pos = divmod(state["micro"], micro_per_epoch)
                idx = batch_order(len(train_items), cfg.batch_size * world, seed=cfg.seed, epoch=epoch)[pos]
                batches.append(([train_items[i] for i in dist.shard_indices(idx, cfg.batch_size)], idx))
                state["micro"] += 1
            n_total = sum(len(idx) for _, idx in batches)  # the step's pairs on every rank: known to all
            loss_sum, correct, margin_sum, tokens = 0.0, 0, 0.0, 0
            with prefix_meter.window() as prefix:  # this step's training forwards only
                for i, (items, idx) in enumerate(batches):
                    if not items and not fsdp:
                        continue  # a short last batch left this rank nothing: it adds zeros to the average
                    # FSDP: every rank runs every forward; one left without pairs scores a filler, weight 0
                    run = items or [train_items[idx[0]]]
                    with dist.grad_sync(sync, i == len(batches) - 1):
                        rc, rr, n_tok = pair_scores(base, run, pad_id, device)
                        margin = torch.tensor([float(it["margin"]) for it in run], device=device)
                        loss = reward_loss(rc, rr, margin, center=cfg.center)
                        # mean over the micro-batch's pairs x its share of the step's pairs (all ranks) =
                        # mean over the global batch; x world: the gradients are averaged over the ranks
                        (loss * (len(items) / n_total * world)).backward()
                    if items:
                        loss_sum += float(loss.detach()) * len(items)
                        diff = (rc - rr).detach().float()
                        correct += int((diff > 0).sum())
                        margin_sum += float(diff.sum())
                        tokens += n_tok
            dist.average_gradients(params)
            loss_sum, correct, margin_sum, tokens = dist.all_sum([loss_sum, correct, margin_sum, tokens])
            correct, tokens = int(correct), int(tokens)
            lr = scheduler.get_last_lr()[0]
            grad_norm = lifecycle.optimizer_step(params, optimizer, scheduler, cfg.max_grad_norm)
            step += 1
            dt = time.perf_counter() - t0
            state["train_seconds"] += dt
            state["train_cpu_seconds"] += time.process_time() - c0
            state["pairs"] += n_total
            state["tokens"] += tokens
            rec = {"step": step, "loss": loss_sum / n_total, "accuracy": correct / n_total,
                   "mean_margin": margin_sum / n_total, "lr": lr, "grad_norm": grad_norm, "pairs": n_total,
                   "tokens": tokens, "pairs_per_second": n_total / dt if dt > 0 else None,
                   "epoch": state["micro"] / micro_per_epoch, "tokens_run_fraction": prefix["tokens_run_fraction"]}
            if step % cfg.log_every == 0 or step == total_steps:
                metrics.write(rec)
            state["history"].append({"step": step, "loss": rec["loss"]})
            bar.update(step, rec)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                m, _, _ = _evaluate(base, eval_items, pad_id, cfg, fsdp)
                metrics.write({"step": step, "event": "eval", **_flat(m)})
                log(f"step {step} held-out pairwise accuracy {m['accuracy']:.1%}, mean margin {m['mean_margin']:.3f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                lifecycle.try_checkpoint(save, log=log)  # every rank: FSDP's ranks each write their shards
            stop = on_step is not None and bool(on_step(step, rec))
            if world > 1:  # a rank that stops alone would leave the others waiting in the next collective
                stop = dist.all_sum([stop], device)[0] > 0
            if stop:
                break
    except KeyboardInterrupt:
        lifecycle.report_interrupt(out, step, log)
        raise
    finally:
        bar.close()

    # ---- after training: the reward model first, with an emergency checkpoint if it cannot be written
    adapter_dir = lifecycle.save_final_adapter(_RewardSaver(base), out, log=log, sharded=base if fsdp else None,
                                               emergency=lambda root: save(root, 0))
    log(f"reward model saved to {adapter_dir}")
    after: dict[str, Any] = {}
    if eval_items:
        t_eval = time.perf_counter()
        after, rc1, rr1 = _evaluate(base, eval_items, pad_id, cfg, fsdp)
        after["seconds"] = time.perf_counter() - t_eval
        metrics.write({"step": step, "event": "after", **_flat(after)})
    before = state["before"]
    summary = {
        "task": data["task"],
        "model": str(model_path),
        "starts_from": f"adapter {cfg.init_adapter}" if cfg.init_adapter else "base model (no SFT adapter)",
        "device": str(device),
        "patched": bool(cfg.patch),
        "share_prefix": bool(cfg.patch and cfg.share_prefix),
        # positions the decoder layers ran / real tokens, over the training forwards (this rank)
        "tokens_run_fraction": prefix_meter.total_fraction,
        "steps": step,
        "total_steps": total_steps,
        "train_pairs": len(train_items),
        "eval_pairs": len(eval_items),
        "truncated_sequences": stats.truncated,
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "accuracy_by_kind_before": before.get("accuracy_by_kind"),
        "accuracy_by_kind_after": after.get("accuracy_by_kind"),
        "mean_margin_before": before.get("mean_margin"),
        "mean_margin_after": after.get("mean_margin"),
        "chosen_mean_after": after.get("chosen_mean"),
        "rejected_mean_after": after.get("rejected_mean"),
        "final_train_loss": state["history"][-1]["loss"] if state["history"] else None,
        "train_seconds": state["train_seconds"],
        "train_cpu_seconds": state["train_cpu_seconds"],
        "pairs_per_second": state["pairs"] / state["train_seconds"] if state["train_seconds"] else None,
        "eval_seconds_before": before.get("seconds"),
        "eval_seconds_after": after.get("seconds"),
        "total_seconds": time.perf_counter() - t_start,
        "total_cpu_seconds": time.process_time() - cpu_start,
        "adapter": str(adapter_dir),
        "world_size": world,
        "parallel": cfg.parallel if world > 1 else None,
    }
    if not main:
        return summary
    if eval_items:
        ckpt.write_json_atomic(out / "scores.json", {"before": state.get("before_scores"),
                                                     "after": {"chosen": rc1.tolist(), "rejected": rr1.tolist()}})
        try:
            plot_scores(state.get("before_scores"), {"chosen": rc1.tolist(), "rejected": rr1.tolist()},
                        out / "scores.png")
        except Exception as e:  # a plot must never lose a finished run
            log(f"could not draw the score histogram: {e}")
    ckpt.write_json_atomic(out / "summary.json", summary)
    try:
        plot_curve(metrics_path, out / "curve.png", title="fastlora rm")
    except Exception as e:
        log(f"could not draw the curve: {e}")
    lifecycle.finish(out, log=log)
    print_summary(summary, SUMMARY_ROWS, title="fastlora rm")
    return summary


def _flat(m: dict) -> dict:
    out = {k: m[k] for k in ("accuracy", "mean_margin", "chosen_mean", "rejected_mean") if k in m}
    for k, v in (m.get("accuracy_by_kind") or {}).items():
        out[f"accuracy_{k}"] = v
    return out


SUMMARY_ROWS = (
    ("accuracy_before", "held-out pairwise accuracy before", "{:.1%}"),
    ("accuracy_after", "held-out pairwise accuracy after", "{:.1%}"),
    ("mean_margin_before", "mean margin r_chosen - r_rejected before", "{:.3f}"),
    ("mean_margin_after", "mean margin r_chosen - r_rejected after", "{:.3f}"),
    ("eval_pairs", "held-out pairs", "{}"),
    ("train_pairs", "training pairs", "{}"),
    ("truncated_sequences", "training sequences truncated", "{}"),
    ("final_train_loss", "final train loss", "{:.4f}"),
    ("steps", "steps", "{}"),
    ("train_seconds", "train time (s)", "{:.1f}"),
    ("train_cpu_seconds", "train CPU time of this process (s)", "{:.1f}"),
    ("pairs_per_second", "pairs/s", "{:.1f}"),
    ("total_seconds", "whole run (s)", "{:.1f}"),
    ("total_cpu_seconds", "whole run, CPU time of this process (s)", "{:.1f}"),
    ("adapter", "reward model (PEFT SEQ_CLS adapter)", "{}"),
)


def plot_scores(before: dict | None, after: dict, png_path: str | Path) -> Path:
    """Histograms of the held-out chosen vs rejected scores, before and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("before training", before)] if before else []
    panels.append(("after training", after))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, sc) in zip(axes[0], panels):
        lo = min(min(sc["chosen"]), min(sc["rejected"]))
        hi = max(max(sc["chosen"]), max(sc["rejected"]))
        bins = torch.linspace(lo, hi if hi > lo else lo + 1e-3, 31).tolist()
        ax.hist(sc["rejected"], bins=bins, alpha=0.6, label="rejected", color="tab:red")
        ax.hist(sc["chosen"], bins=bins, alpha=0.6, label="chosen", color="tab:green")
        acc = sum(c > r for c, r in zip(sc["chosen"], sc["rejected"])) / len(sc["chosen"])
        ax.set_title(f"{title}: pairwise accuracy {acc:.1%}")
        ax.set_xlabel("reward score")
        ax.set_ylabel("held-out responses")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("fastlora rm: score distribution")
    fig.tight_layout()
    return ckpt.write_png_atomic(fig, png_path, dpi=110)
