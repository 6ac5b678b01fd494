"""QLoRA supervised fine-tuning: ``fastlora.train.sft(SFTConfig(...))``.

A plain loop over the ecosystem's parts: transformers loads the model 4-bit NF4 through
bitsandbytes, PEFT adds LoRA, ``fastlora.patch`` (unless ``patch=False``) swaps in the
fused kernels, torch's AdamW (bitsandbytes' paged 8-bit AdamW on GPU) and transformers'
schedulers optimize. The loop knows nothing of kernels.

Gradient accumulation normalizes by the TOTAL number of trained tokens of the
accumulated micro-batches: each micro-batch contributes ``mean_loss_i * n_i / N``
(= its summed loss / N), so the update equals the one a single batch holding all of
them would give. Averaging per-micro-batch means instead weights short batches' tokens
more, the bug that hit several trainers (see the peers' notes). A micro-batch with no
trained token contributes nothing (instead of a 0/0 NaN).

Resume restores the adapter, optimizer, scheduler, RNG states and the position in the
data order (``data.batch_order`` depends only on seed and epoch), so a resumed run
produces the same losses as an uninterrupted one.

The run's life cycle (output-dir checks, preflight, resume policy, the final save with its
emergency fallback, console output) is the shared machinery of ``fastlora.train.run``,
``.checkpoint`` and ``.console``; this file is its reference adopter.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import evaluate as ev
from . import run as lifecycle
from .config import SFTConfig
from .console import Console
from ..patch.prefix import PrefixMeter
from .data import IGNORE_INDEX, batch_order, check_records, collate, detect_format, load_records, pack, prepare


# ----------------------------------------------------------------------- data
def _load_many(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Records of every file, and where each came from ("file, line N")."""
    records: list[dict] = []
    origins: list[str] = []
    for p in paths:
        records.extend(load_records(p, origins=origins))
    return records, origins


def load_data(cfg: SFTConfig) -> dict[str, Any]:
    """Records for train / eval / test, their format, the task's answer parser, and where each
    record came from (``*_origins``). Reads and checks every record of every file, naming the
    file and line of a bad one, before splitting and before anything is written."""
    if cfg.data is None:
        from .defaults import healthcare

        return {
            "task": "healthcare",
            "train": healthcare.load_split("train"),
            "eval": healthcare.load_split("validation"),
            "test": healthcare.load_split("test"),
            "format": "messages",
            "parse": healthcare.parse_answer,
            "train_origins": None, "eval_origins": None, "test_origins": None,
        }
    train, train_at = _load_many(cfg.data)
    fmt = detect_format(train, cfg.data_format, origins=train_at)
    check_records(train, fmt, train_at)
    if cfg.eval_data:
        eval_records, eval_at = _load_many(cfg.eval_data)
        check_records(eval_records, fmt, eval_at)
    elif cfg.eval_split > 0 and len(train) >= 2:
        idx = list(range(len(train)))
        random.Random(cfg.seed).shuffle(idx)
        n_eval = max(1, int(round(len(train) * cfg.eval_split)))
        held, kept = sorted(idx[:n_eval]), sorted(idx[n_eval:])
        eval_records, eval_at = [train[i] for i in held], [train_at[i] for i in held]
        train, train_at = [train[i] for i in kept], [train_at[i] for i in kept]
    else:
        eval_records, eval_at = [], []
    test, test_at = _load_many(cfg.test_data) if cfg.test_data else ([], [])
    if test:
        check_records(test, fmt, test_at)
    return {"task": "custom", "train": train, "eval": eval_records, "test": test, "format": fmt, "parse": None,
            "train_origins": train_at, "eval_origins": eval_at, "test_origins": test_at}


def _limit(records: list, n: int) -> list:
    return records[:n] if n else records


# ----------------------------------------------------------------- optimizer
def make_optimizer(cfg: SFTConfig, params: list[torch.nn.Parameter], device: torch.device):
    name = cfg.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ValueError("optimizer='paged_adamw_8bit' needs a CUDA device; use 'adamw' on CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: SFTConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=min(cfg.warmup_steps, total_steps),
                         num_training_steps=total_steps)


# ------------------------------------------------------------ one update's grads
def accumulate_gradients(model, batches: list[dict], device: torch.device) -> tuple[float, int, int]:
    """Forward/backward the micro-batches of one optimizer step, accumulating into .grad.

    Every micro-batch's loss is its summed token loss / N, N = trained tokens of ALL the
    micro-batches of the step on ALL ranks (``num_items_in_batch``, transformers' own
    argument), so the accumulated gradient is that of (sum of token losses) / N: exactly
    the one of a single process holding the whole global batch. Under DDP the loss is
    multiplied by the world size because DDP averages the ranks' gradients; micro-batches
    before the last run under ``no_sync`` (one gradient all-reduce per step). Returns
    (summed token loss of this rank, N, input tokens processed by this rank)."""
    counts = [ev.trained_tokens(b["labels"]) for b in batches]
    n_total = int(dist.all_sum([sum(counts)], device)[0])
    world = dist.world_size()
    loss_sum, tokens = 0.0, 0
    for i, (b, n) in enumerate(zip(batches, counts)):
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        last = i == len(batches) - 1
        if n == 0 and world == 1:
            continue  # nothing to train. With ranks, all run every micro-batch: DDP syncs, FSDP gathers in them
        b = {k: v.to(device) for k, v in b.items()}
        with dist.grad_sync(model, last):
            # use_cache=False: with a cache transformers ignores packed position_ids' boundaries.
            # num_items_in_batch: a sum over this batch's tokens / N (0, not 0/0, when n = 0).
            out = model(**b, use_cache=False, num_items_in_batch=max(n_total, 1))
            (out.loss * world).backward()
        loss_sum += float(out.loss.detach()) * n_total
    return loss_sum, n_total, tokens


# ------------------------------------------------------------------- the run
def sft(config: SFTConfig | None = None, *, on_step: Callable[[int, dict], bool | None] | None = None,
        **overrides: Any) -> dict:
    """Run QLoRA SFT and return the summary (also written to ``output_dir/summary.json``).

    ``config`` defaults to ``SFTConfig(**overrides)``; with ``config`` given,
    ``overrides`` replace its fields. ``on_step(step, metrics)`` is called after every
    optimizer step; returning True stops training early (the end-of-run evaluation and
    saving still happen). An exception it raises (or Ctrl-C) aborts the run, leaving the
    last complete checkpoint for ``resume=True``.

    ``resume=True`` on a finished run changes nothing and returns its summary. When the final
    adapter cannot be written (full disk, read-only dir), :class:`fastlora.train.run.FinalSaveFailed`
    says where the emergency checkpoint went; ``resume=True`` then finishes the run.
    """
    # only the main rank logs and writes; every rank trains
    return lifecycle.start(SFTConfig, config, overrides, "sft()", _sft, on_step, enabled=dist.is_main())


def _sft(cfg: SFTConfig, log: Console, on_step) -> dict:
    main = dist.is_main()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(cfg.output_dir)

    # ---- checks that write nothing: output dir, data files, model path, free space
    def check_inputs():
        found = ckpt.check_output_dir(out, resume=cfg.resume, log=log.warn)
        if found is not None:
            # another number of processes only with the same global batch (batch_size x processes)
            regrouped = dist.check_resume_world_size(out / ckpt.RUN_FILE, cfg.to_dict())
            ckpt.check_resume_config(out, cfg.to_dict(), resumable=ckpt.RESUMABLE_CHANGES | regrouped)
        return found, load_data(cfg)

    # Under torchrun a rank that cannot read its inputs ends every rank with its error.
    resume_from, data = dist.agree(check_inputs, "checking the output dir and reading the data")
    from .peft_methods import add_peft
    from .model import (apply_patch, load_base, load_tokenizer, resolve_device, resolve_dtype,
                        resolve_model_path)

    device = dist.local_device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    model_path = resolve_model_path(cfg.model, cfg.cache_dir)
    lifecycle.preflight_run(out, cfg, model_path)
    tokenizer = load_tokenizer(model_path)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    train_ex, stats = prepare(data["train"], tokenizer, fmt=data["format"], max_length=cfg.max_length,
                              origins=data["train_origins"])
    log(f"train data: {stats}")
    for w in stats.warnings():
        log.warn(w)
    if cfg.general_mix > 0:
        from .defaults.general import general_mix_records

        n_mix = max(1, round(len(train_ex) * cfg.general_mix / (1 - cfg.general_mix)))
        mix_ex, mix_stats = prepare(general_mix_records(n_mix, cfg.seed), tokenizer, max_length=cfg.max_length)
        train_ex = train_ex + mix_ex
        log(f"general data mixed in: {mix_stats}")
    eval_ex = []
    if data["eval"]:
        eval_ex, eval_stats = prepare(_limit(data["eval"], cfg.eval_max_examples), tokenizer, fmt=data["format"],
                                      max_length=cfg.max_length, origins=data["eval_origins"])
        log(f"eval data: {eval_stats}")
    rows = pack(train_ex, cfg.max_length) if cfg.packing else train_ex
    if cfg.packing:
        log(f"packed {len(train_ex)} examples into {len(rows)} rows of <= {cfg.max_length} tokens")
    eval_items = ev.task_items(_limit(data["eval"], cfg.eval_max_examples), tokenizer, data["format"])
    test_items = ev.task_items(_limit(data["test"], cfg.test_max_examples), tokenizer, data["format"])
    metric = cfg.eval_metric
    if metric == "auto":
        metric = "accuracy" if eval_items else "loss"
    if metric == "accuracy" and not eval_items:
        raise ValueError("eval_metric='accuracy' needs eval data with answers to generate (not 'text' data)")
    if (cfg.eval_every or cfg.early_stopping_patience) and not eval_ex:
        raise ValueError("eval_every / early_stopping_patience need eval data: set eval_data or eval_split > 0")

    world = dist.world_size()
    fsdp = world > 1 and cfg.parallel == "fsdp"
    # batch_size is per rank: a step's global batch holds batch_size * world rows (see distributed.py).
    micro_per_epoch = math.ceil(len(rows) / (cfg.batch_size * world))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))

    # ---- model
    # FSDP: load (and quantize) in host memory; fully_shard then moves one unit at a time to
    # the device and keeps only its shard there, so the whole model never sits on one GPU.
    base = load_base(model_path, load_in_4bit=cfg.load_in_4bit, dtype=dtype,
                     device=torch.device("cpu") if fsdp else device, quant_storage=dtype if fsdp else torch.uint8)
    model, peft_info = add_peft(base, cfg.peft, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                target_modules=cfg.target_modules, num_virtual_tokens=cfg.num_virtual_tokens,
                                adapter_dim=cfg.adapter_dim, gradient_checkpointing=cfg.gradient_checkpointing,
                                log=log)
    patch_report = apply_patch(model, cfg.patch, share_prefix=cfg.share_prefix)
    if patch_report:
        log(patch_report["text"])
    # the model itself in a single process; FSDP2 shards it in place
    train_model = dist.wrap_fsdp(model) if fsdp else dist.wrap_ddp(model, device)
    shard_eval = not fsdp  # FSDP's ranks must run the same forwards: each evaluates everything
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    # parallel='fsdp' checkpoints hold DCP shards (on any number of processes, so that one
    # run's checkpoints always have one kind and resume on another number of processes)
    sharded = model if cfg.parallel == "fsdp" else None

    def save(root=None, keep=cfg.keep_checkpoints, trainer=None):
        return ckpt.save_checkpoint(out, step, model, optimizer, scheduler, trainer or state, keep=keep, root=root,
                                    sharded=sharded)

    # ---- the output dir is created only now that every input checked out
    if resume_from is None:
        with dist.main_writes() as writer:
            if writer:
                ckpt.init_output_dir(out, lifecycle.run_info(cfg.to_dict(), model_path=str(model_path),
                                                             device=str(device), dtype=str(dtype),
                                                             total_steps=total_steps, patch_report=patch_report,
                                                             world_size=world, peft=peft_info))
    elif main:
        ckpt.clean_stale(out)
    metrics_path = out / "metrics.jsonl"
    metrics = lifecycle.MetricsWriter(metrics_path, log=log, enabled=main)

    state: dict[str, Any] = {"micro": 0, "tokens": 0, "train_seconds": 0.0, "best": None, "bad_evals": 0,
                             "before": {}, "history": []}
    step = 0
    stopped_early = False
    if resume_from is not None:
        # Every rank reads the checkpoint rank 0 wrote (the output dir must be shared).
        state.update(dist.agree(lambda: ckpt.load_checkpoint(resume_from, model, optimizer, scheduler),
                                f"loading {resume_from}"))
        step = state.pop("step")
        stopped_early = bool(state.pop("stopped_early", False))  # set in emergency checkpoints
        per_rank = state.pop("rng_per_rank", None)
        if per_rank is not None and len(per_rank) == world:
            ckpt.set_rng_state(per_rank[dist.rank()])
        elif per_rank is not None and cfg.lora_dropout > 0:
            log.warn(f"resuming on {world} process(es) a run checkpointed on {len(per_rank)}: the dropout masks "
                     f"from here on differ from an uninterrupted run's")
        # Drop what the interrupted run logged after its last checkpoint: those steps run again.
        kept = [m for m in ckpt.read_jsonl(metrics_path) if m.get("step", 0) <= step]
        with dist.main_writes() as writer:
            if writer:
                ckpt.write_text_atomic(metrics_path, "".join(ckpt.json_line(m) for m in kept))
        log(f"resumed from {resume_from} at step {step}/{total_steps}")

    # ---- before training
    if resume_from is None:
        t_eval = time.perf_counter()
        before: dict[str, Any] = {}
        if test_items or cfg.measure_forgetting:
            log(f"evaluating before training: {len(test_items)} test examples"
                + (", general QA and perplexity" if cfg.measure_forgetting else ""))
        if test_items:
            acc, _, restricted = _test_eval(model, tokenizer, test_items, data["parse"], cfg, log, "before",
                                            shard_eval)
            before["accuracy"] = acc
            log(f"test accuracy before training: {acc:.1%} ({len(test_items)} examples)")
            _log_restricted(restricted, len(test_items), log, "before")
            before.update(restricted)
        if cfg.measure_forgetting:
            before["general"] = _general(model, tokenizer, cfg)
            log(f"general QA before: {before['general']['qa_accuracy']:.1%}, "
                f"perplexity {before['general']['perplexity']:.2f}")
        before["seconds"] = time.perf_counter() - t_eval
        state["before"] = before
        metrics.write({"step": 0, "event": "before", **_flat(before)})

    # ---- train
    pad_id = tokenizer.pad_token_id
    best_params: dict[str, torch.Tensor] | None = None
    prefix_meter = PrefixMeter(model)
    bar = log.progress(total_steps, initial=step, desc="sft", log_every=cfg.log_every)
    model.train()
    try:
        while step < total_steps and not stopped_early:
            t0, c0 = time.perf_counter(), time.process_time()
            batches = []
            for _ in range(cfg.grad_accum):
                epoch, pos = divmod(state["micro"], micro_per_epoch)
                idx = batch_order(len(rows), cfg.batch_size * world, seed=cfg.seed, epoch=epoch)[pos]
                batches.append(_rank_batch(rows, idx, cfg.batch_size, pad_id))
                state["micro"] += 1
            with prefix_meter.window() as prefix:  # this step's training forwards only
                loss_sum, n_total, tokens = accumulate_gradients(train_model, batches, device)
            loss_sum, tokens = dist.all_sum([loss_sum, tokens], device)
            tokens = int(tokens)
            lr = scheduler.get_last_lr()[0]
            grad_norm = lifecycle.optimizer_step(params, optimizer, scheduler, cfg.max_grad_norm)
            step += 1
            dt = time.perf_counter() - t0
            state["train_seconds"] += dt
            # CPU time of this process: on shared cores it shows how much of the wall time was ours.
            state["train_cpu_seconds"] = state.get("train_cpu_seconds", 0.0) + time.process_time() - c0
            state["tokens"] += tokens
            rec = {"step": step, "loss": loss_sum / n_total if n_total else float("nan"), "lr": lr,
                   "grad_norm": grad_norm, "trained_tokens": n_total, "tokens": tokens,
                   "tokens_per_second": tokens / dt if dt > 0 else None, "epoch": state["micro"] / micro_per_epoch,
                   "tokens_run_fraction": prefix["tokens_run_fraction"]}
            if step % cfg.log_every == 0 or step == total_steps:
                metrics.write(rec)
            state["history"].append({"step": step, "loss": rec["loss"]})
            bar.update(step, rec)

            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                erec = _evaluate(model, tokenizer, eval_ex, eval_items, data["parse"], cfg, metric, step, shard_eval)
                metrics.write(erec)
                log(_fmt_eval(erec))
                value = erec[metric]
                better = state["best"] is None or (value > state["best"] if metric == "accuracy" else value < state["best"])
                if better:
                    state["best"], state["bad_evals"] = value, 0
                    if cfg.early_stopping_patience:
                        best_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                else:
                    state["bad_evals"] += 1
                    if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                        log(f"early stopping at step {step}: no {metric} improvement in {state['bad_evals']} evaluations "
                            f"(best {state['best']:.4g})")
                        stopped_early = True
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                if world > 1:  # each rank's dropout stream, so that a resumed run draws what it would have
                    state["rng_per_rank"] = dist.all_gather_object(ckpt.rng_state())
                lifecycle.try_checkpoint(save, log=log)  # every rank: FSDP's ranks each write their shards
            if on_step is not None and on_step(step, rec):
                stopped_early = True
            if world > 1:  # a rank that stops alone would leave the others waiting in the next all-reduce
                stopped_early = dist.all_sum([stopped_early], device)[0] > 0
            if stopped_early:
                break
    except KeyboardInterrupt:
        lifecycle.report_interrupt(out, step, log)
        raise
    finally:
        bar.close()

    if best_params is not None and stopped_early:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_params:
                    p.copy_(best_params[n])
        log(f"restored the adapter of the best evaluation ({metric} {state['best']:.4g})")

    # ---- after training: the adapter first, with an emergency checkpoint if it cannot be written
    final_state = {**state, "stopped_early": stopped_early}
    # every rank: under FSDP the adapter is gathered from the shards (rank 0 writes it once, in
    # PEFT's format) and an emergency checkpoint is a collective
    adapter_dir = lifecycle.save_final_adapter(model, out, log=log, sharded=model if fsdp else None,
                                               emergency=lambda root: save(root, 0, final_state))
    log(f"adapter saved to {adapter_dir}; evaluating after training")
    t_eval = time.perf_counter()
    final = _evaluate(model, tokenizer, eval_ex, [], None, cfg, "loss", step, shard_eval) if eval_ex else {}
    after: dict[str, Any] = {}
    details = None
    if test_items:
        after["accuracy"], details, restricted = _test_eval(model, tokenizer, test_items, data["parse"], cfg, log,
                                                             "after", shard_eval)
        _log_restricted(restricted, len(test_items), log, "after")
        after.update(restricted)
    if cfg.measure_forgetting:
        after["general"] = _general(model, tokenizer, cfg)
    after["seconds"] = time.perf_counter() - t_eval
    before = state["before"]
    summary = {
        "task": data["task"],
        "model": str(model_path),
        "device": str(device),
        "patched": bool(cfg.patch),
        "share_prefix": bool(cfg.patch and cfg.share_prefix),
        # positions the decoder layers ran / real tokens, over the training forwards (this
        # rank): below 1 when rows shared tokens; None without fastlora's patch
        "tokens_run_fraction": prefix_meter.total_fraction,
        "steps": step,
        "total_steps": total_steps,
        "stopped_early": stopped_early,
        "train_examples": len(train_ex),
        "test_examples": len(test_items),
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "restricted_accuracy_before": before.get("restricted_accuracy"),
        "restricted_accuracy_after": after.get("restricted_accuracy"),
        "below_threshold_after": after.get("below_threshold"),
        "min_confidence": after.get("min_confidence"),
        "retention": ev.retention(before.get("general", {}), after.get("general", {})),
        "general_qa_before": before.get("general", {}).get("qa_accuracy"),
        "general_qa_after": after.get("general", {}).get("qa_accuracy"),
        "perplexity_before": before.get("general", {}).get("perplexity"),
        "perplexity_after": after.get("general", {}).get("perplexity"),
        "final_train_loss": state["history"][-1]["loss"] if state["history"] else None,
        "eval_loss": final.get("loss"),
        "train_seconds": state["train_seconds"],
        "train_cpu_seconds": state.get("train_cpu_seconds"),
        "train_tokens": state["tokens"],
        "tokens_per_second": state["tokens"] / state["train_seconds"] if state["train_seconds"] else None,
        "eval_seconds_before": before.get("seconds"),
        "eval_seconds_after": after["seconds"],
        "total_seconds": time.perf_counter() - t_start,
        "total_cpu_seconds": time.process_time() - cpu_start,
        "adapter": str(adapter_dir),
        "patch_report": patch_report,
        "world_size": world,
        "peft": peft_info,
    }
    if not main:
        return summary
    metrics.write({"step": step, "event": "after", **_flat(after), **({"eval_loss": final["loss"]} if final else {})})
    if details is not None:
        ckpt.write_json_atomic(out / "test_outputs.json", details)
    if after.get("general"):
        ckpt.write_json_atomic(out / "general_outputs.json", after["general"]["qa_outputs"])
    ckpt.write_json_atomic(out / "summary.json", summary)
    lifecycle.finish(out, log=log)
    try:
        plot_curve(metrics_path, out / "curve.png")
    except Exception as e:  # a plot must never lose a finished run
        log.warn(f"could not draw the curve: {e}")
    print_summary(summary, file=log.stream)
    return summary


def _test_eval(model, tokenizer, items, parse, cfg: SFTConfig, log, when: str, sharded: bool
               ) -> tuple[float, list[dict], dict]:
    """Test accuracy of the free greedy answers, their details, and the label-restricted
    record ({} when the test set is not a classification): one pass over the prompts
    (``ev.classify``) on one process; sharded over the ranks, the two run apart."""
    if dist.is_fully_sharded(model):  # choice scoring drives the decoder itself, past FSDP2's root hooks
        acc, details = _task_accuracy(model, tokenizer, items, parse, cfg, sharded)
        log(f"label-restricted accuracy {when} training: not measured under FSDP")
        return acc, details, {}
    if sharded and dist.world_size() > 1:
        acc, details = _task_accuracy(model, tokenizer, items, parse, cfg, sharded)
        res = ev.choice_accuracy(model, tokenizer, items, parse=parse, batch_size=cfg.eval_batch_size)
    else:
        acc, details, res = ev.classify(model, tokenizer, items, parse=parse, max_new_tokens=cfg.max_new_tokens,
                                        batch_size=cfg.eval_batch_size)
    if res is None:
        return acc, details, {}
    return acc, details, {"restricted_accuracy": res["accuracy"], "below_threshold": res["below_threshold"],
                          "min_confidence": res["min_confidence"]}


def _log_restricted(rec: dict, examples: int, log, when: str) -> None:
    if rec:
        log(f"test accuracy {when} training, answers restricted to the labels: {rec['restricted_accuracy']:.1%}; "
            f"{rec['below_threshold']} of {examples} below confidence {rec['min_confidence']:.2f}")


def _general(model, tokenizer, cfg: SFTConfig) -> dict:
    return ev.general_ability(model, tokenizer, batch_size=cfg.eval_batch_size)


def _evaluate(model, tokenizer, eval_ex, eval_items, parse, cfg: SFTConfig, metric: str, step: int,
              sharded: bool = True) -> dict:
    rec: dict[str, Any] = {"step": step, "event": "eval"}
    if eval_ex:
        # Each rank scores its shard; the token-weighted mean is the same as one process's.
        mine = dist.shard(eval_ex) if sharded else eval_ex
        total, count = ev.eval_loss_sums(model, mine, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.eval_batch_size)
        if sharded:
            total, count = dist.all_sum([total, count])
        if count == 0:
            raise ValueError("eval_loss: no trained token in the eval examples")
        rec["loss"] = total / count
    if metric == "accuracy" and eval_items:
        rec["accuracy"], _ = _task_accuracy(model, tokenizer, eval_items, parse, cfg, sharded)
    return rec


def _task_accuracy(model, tokenizer, items, parse, cfg: SFTConfig, sharded: bool = True) -> tuple[float, list[dict]]:
    """``ev.task_accuracy`` with the items sharded over the ranks and the details gathered back in order."""
    mine = dist.shard(items) if sharded else items
    local = ev.task_accuracy(model, tokenizer, mine, parse=parse, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.eval_batch_size)[1] if mine else []
    details = dist.gather_in_order(local, len(items)) if sharded else local
    return sum(d["correct"] for d in details) / len(details), details


def _rank_batch(rows: list[dict], global_idx: list[int], per_rank: int, pad_id: int) -> dict:
    """This rank's micro-batch of a global batch. A rank left without rows (a short last
    batch) gets one fully masked row: it trains nothing but keeps the rank in DDP's all-reduce."""
    idx = dist.shard_indices(global_idx, per_rank)
    if idx:
        return collate([rows[i] for i in idx], pad_id)
    row = rows[global_idx[0]]
    filler = {k: list(row[k][:2]) for k in ("input_ids", "position_ids") if k in row}  # 2 tokens: cheap
    filler["labels"] = [IGNORE_INDEX] * 2
    if "seq_lengths" in row:
        filler["seq_lengths"] = [2]
    return collate([filler], pad_id)


def _fmt_eval(rec: dict) -> str:
    parts = [f"step {rec['step']} eval"]
    if "loss" in rec:
        parts.append(f"loss {rec['loss']:.4f}")
    if "accuracy" in rec:
        parts.append(f"accuracy {rec['accuracy']:.1%}")
    return ", ".join(parts)


def _flat(d: dict) -> dict:
    out = {}
    if "accuracy" in d:
        out["test_accuracy"] = d["accuracy"]
    g = d.get("general")
    if g:
        out["general_qa_accuracy"] = g["qa_accuracy"]
        out["general_perplexity"] = g["perplexity"]
    return out


# ------------------------------------------------------------------ reporting
def plot_curve(metrics_path: str | Path, png_path: str | Path, title: str = "fastlora sft") -> Path:
    """Train loss per step, eval loss and eval accuracy, from metrics.jsonl, to a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ckpt.read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "event" not in r and r.get("loss") is not None]
    evals = [r for r in rows if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=0.8, alpha=0.5)
        ema, smooth = None, []
        for step, loss in train:  # exponential moving average: per-batch losses are noisy
            ema = loss if ema is None else 0.8 * ema + 0.2 * loss
            smooth.append((step, ema))
        ax.plot(*zip(*smooth), label="train loss (EMA 0.8)", lw=1.6, color="tab:blue")
    el = [(r["step"], r["loss"]) for r in evals if "loss" in r]
    el += [(r["step"], r["eval_loss"]) for r in rows if r.get("event") == "after" and "eval_loss" in r]
    if el:
        ax.plot(*zip(*el), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ea = [(r["step"], r["accuracy"]) for r in evals if "accuracy" in r]
    handles, labels = ax.get_legend_handles_labels()
    if ea:
        ax2 = ax.twinx()
        ax2.plot(*zip(*ea), "s--", color="tab:green", label="eval accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1.05)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    return ckpt.write_png_atomic(fig, png_path, dpi=110)  # fsynced, umask permissions, like every output


_SUMMARY_ROWS = (
    ("accuracy_before", "test accuracy before", "{:.1%}"),
    ("accuracy_after", "test accuracy after", "{:.1%}"),
    ("restricted_accuracy_before", "test accuracy before, restricted to the labels", "{:.1%}"),
    ("restricted_accuracy_after", "test accuracy after, restricted to the labels", "{:.1%}"),
    ("below_threshold_after", "test examples below the confidence threshold (after)", "{}"),
    ("general_qa_before", "general QA before", "{:.1%}"),
    ("general_qa_after", "general QA after", "{:.1%}"),
    ("retention", "retention (after/before)", "{:.1%}"),
    ("perplexity_before", "general perplexity before", "{:.2f}"),
    ("perplexity_after", "general perplexity after", "{:.2f}"),
    ("final_train_loss", "final train loss", "{:.4f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("steps", "steps", "{}"),
    ("train_seconds", "train time (s)", "{:.1f}"),
    ("train_cpu_seconds", "train CPU time of this process (s)", "{:.1f}"),
    ("tokens_per_second", "tokens/s", "{:.0f}"),
    ("eval_seconds_before", "evaluation before (s)", "{:.1f}"),
    ("eval_seconds_after", "evaluation after (s)", "{:.1f}"),
    ("total_seconds", "whole run (s)", "{:.1f}"),
    ("total_cpu_seconds", "whole run, CPU time of this process (s)", "{:.1f}"),
    ("adapter", "adapter", "{}"),
)


def format_summary(summary: dict, spec=_SUMMARY_ROWS) -> list[tuple[str, str]]:
    rows = []
    for key, label, fmt in spec:
        v = summary.get(key)
        rows.append((label, "n/a" if v is None else fmt.format(v)))
    return rows


def print_summary(summary: dict, spec=_SUMMARY_ROWS, title: str = "fastlora sft", *, file=None) -> None:
    import sys

    rows = format_summary(summary, spec)
    file = file if file is not None else sys.stdout
    try:
        from rich.console import Console as RichConsole
        from rich.table import Table
    except ImportError:
        RichConsole = None
    if RichConsole is None or not file.isatty():  # a log file gets plain aligned lines, no box drawing
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), file=file, flush=True)
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    RichConsole(file=file).print(table)
