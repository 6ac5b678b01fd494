"""Evaluation for SFT runs: held-out loss, a generated-answer task metric, forgetting.

- :func:`eval_loss`: mean loss per trained token (token-weighted across batches, so the
  figure does not depend on how the set is batched).
- :func:`task_accuracy`: greedy generation (left-padded batches, ``max_new_tokens``
  small) scored by exact match of the generated answer. For the embedded healthcare
  task the answer is parsed as JSON (``defaults.healthcare.parse_answer``) and
  compared to the record's label; otherwise the stripped text is compared to the
  reference answer.
- :func:`choice_accuracy`: the same test set with the answer restricted to the task's
  labels (``fastlora.generate(choices=...)``), and how many examples fall below the
  confidence a deployment would send to a person.
- :func:`classify`: both in one pass over the prompts (the free greedy answers read off
  the forwards that score the labels), what the SFT run uses.
- :func:`general_ability`: accuracy on the small general-knowledge QA set and perplexity
  on general text, both shipped in the package; ``retention`` is after/before.

Every function leaves the model in the mode it found it in, and runs without grad.
bitsandbytes' CPU repack (triggered by eval-mode, no-grad forwards) must already be
disabled by ``protect_bnb_weights`` when the model was loaded.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .data import IGNORE_INDEX, collate, render_alpaca


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model) -> torch.device:
    return next(p.device for p in model.parameters())


def trained_tokens(labels: torch.Tensor) -> int:
    """Targets after the causal shift: labels[:, 1:] that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def eval_loss(model, examples: Sequence[dict], *, pad_token_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy of the trained tokens of ``examples``."""
    if not examples:
        raise ValueError("eval_loss: no examples")
    total, count = eval_loss_sums(model, examples, pad_token_id=pad_token_id, batch_size=batch_size)
    if count == 0:
        raise ValueError("eval_loss: no trained token in the examples")
    return total / count


def eval_loss_sums(model, examples: Sequence[dict], *, pad_token_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(summed cross-entropy, trained tokens) of ``examples``: the parts of :func:`eval_loss`
    that add up across shards (``(0.0, 0)`` for none)."""
    device = model_device(model)
    total, count = 0.0, 0
    from ..generate.decode import Runner, unsupported_adapter

    # Longest first keeps padding low; the result does not depend on the order.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    # None: an adapter only PEFT's own forward runs (every batch then goes through it)
    runner = None if unsupported_adapter(model) else Runner(model)
    with _eval_mode(model):
        for s in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[s : s + batch_size]], pad_token_id)
            n = trained_tokens(batch["labels"]) + _virtual_targets(runner, batch["labels"])
            if n == 0:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            total += float(_batch_loss(model, runner, batch)) * n
            count += n
    return total, count


def _batch_loss(model, runner, batch: dict) -> torch.Tensor:
    """Mean loss per trained token of one collated batch, as ``model(**batch).loss``.

    On a patched model the loss runs fused (``fastlora.patch.head.fused_loss``): no
    (tokens, vocab) logits, and the head only on the trained tokens; the tokens the rows
    share (a system prompt) run once inside the patched decoder (shared prefixes), with
    the same loss. A prompt-learning adapter's virtual positions come first in every row's
    cache (``decode.VirtualPrefix``, what PEFT's forward prepends). FSDP2 (its root forward
    gathers the weights), packed rows, and prompt tuning where a row's first token is
    trained (PEFT's forward predicts it from the last virtual token, whose logits the
    cached path does not compute) run ``model`` as it is.
    """
    from ..patch.head import fused_loss
    from .distributed import is_fully_sharded

    if (runner is None or is_fully_sharded(model) or "attention_mask" not in batch
            or _virtual_targets(runner, batch["labels"])):
        return model(**batch, use_cache=False).loss
    if runner.virtual is None:
        args = {**batch, "use_cache": False}
    else:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device).expand(B, -1)  # after the virtual positions
        args = runner.inputs(ids, mask, pos, runner.new_cache(B))
        args["labels"] = batch["labels"]
    fused = fused_loss(runner.lm, **args)
    return fused[0] if fused is not None else runner.lm(**args).loss


def _virtual_targets(runner, labels: torch.Tensor) -> int:
    """Trained tokens that only a prompt-tuning adapter's forward predicts: PEFT prepends
    ``n`` ignored labels for its virtual tokens, so the last virtual token's logits
    predict each row's first label (``labels[:, 0]``), which a plain causal LM never
    predicts. 0 for every other model."""
    if runner is None or runner.virtual is None or runner.virtual.kind != "embeddings":
        return 0
    return int((labels[:, 0] != IGNORE_INDEX).sum())


# ------------------------------------------------------------------ generation
@dataclass
class TaskItem:
    prompt: str  # text the model continues (already chat-rendered where relevant)
    reference: str  # the expected answer text
    label: str | None = None  # for classification tasks: the expected class
    special_tokens: bool = True  # whether tokenizing the prompt adds the tokenizer's special tokens


def task_items(records: Sequence[dict], tokenizer, fmt: str) -> list[TaskItem]:
    """Prompt and reference answer of each record, exactly as training renders them.
    ``text`` records have no answer to generate and give no items."""
    items = []
    for r in records:
        if fmt == "messages":
            msgs = r["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None or last == 0:
                continue
            prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
            items.append(TaskItem(prompt, msgs[last]["content"], r.get("label"), special_tokens=False))
        elif fmt == "alpaca":
            items.append(TaskItem(render_alpaca(r["instruction"], r.get("input") or ""), r["output"], r.get("label")))
        elif fmt == "prompt_completion" and isinstance(r["prompt"], str):
            items.append(TaskItem(r["prompt"], r["completion"], r.get("label")))
    return items


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 12, batch_size: int = 16,
             special_tokens: bool = False) -> list[str]:
    """Greedy completions of ``prompts`` (decoded, special tokens removed), by
    ``fastlora.generate``: left-padded batches of similar lengths, stopping at the
    tokenizer's eos (what transformers' ``generate`` was asked for before)."""
    from ..generate import generate as fl_generate
    from .distributed import is_fully_sharded

    if not prompts:
        return []
    if is_fully_sharded(model):
        # fastlora.generate drives the decoder and head itself; under FSDP2 only the root
        # forward's hooks gather the root's shards (the embeddings), so go through it.
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            # PEFT 0.21's generate loses or repeats the virtual tokens on transformers 5
            # (see fastlora.generate.decode.VirtualPrefix): refuse rather than score that
            raise ValueError(f"evaluating a {model.active_peft_config.peft_type} adapter under FSDP is not "
                             "supported: its generation would drop the virtual tokens; evaluate it unsharded")
        return _hf_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            special_tokens=special_tokens)
    eos = tokenizer.eos_token_id
    res = fl_generate(model, list(prompts), tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, add_special_tokens=special_tokens,
                      stop_token_ids=None if eos is None else [eos])
    return res.texts


def _hf_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
                 special_tokens: bool) -> list[str]:
    """Greedy completions by transformers' ``generate`` (left-padded batches of similar
    lengths): the path for FSDP-sharded models."""
    device = model_device(model)
    outputs: list[str | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with _eval_mode(model):
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=special_tokens).to(device)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None,
                )
                for i, ids in zip(idx, out[:, enc["input_ids"].shape[1]:]):
                    outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs  # type: ignore[return-value]


def task_accuracy(model, tokenizer, items: Sequence[TaskItem], *,
                  parse: Callable[[str], str | None] | None = None, max_new_tokens: int = 12,
                  batch_size: int = 16) -> tuple[float, list[dict]]:
    """Exact-match accuracy of greedy answers. With ``parse`` (e.g. the healthcare JSON
    parser) the parsed answer must equal the item's label; otherwise the stripped text
    must equal the stripped reference. Returns (accuracy, per-item details)."""
    if not items:
        raise ValueError("task_accuracy: no items to score")
    preds: list[str] = [""] * len(items)
    for special, idx in _by_special_tokens(items).items():
        outs = generate(model, tokenizer, [items[i].prompt for i in idx], max_new_tokens=max_new_tokens,
                        batch_size=batch_size, special_tokens=special)
        for i, o in zip(idx, outs):
            preds[i] = o
    return score_answers(items, preds, parse)


def score_answers(items: Sequence[TaskItem], answers: Sequence[str], parse) -> tuple[float, list[dict]]:
    """(accuracy, per-item details) of ``answers``: with ``parse`` (e.g. the healthcare JSON
    parser) the parsed answer must equal the item's label, else the stripped text the
    stripped reference."""
    details = []
    correct = 0
    for it, pred in zip(items, answers):
        if parse is not None and it.label is not None:
            got = parse(pred)
            ok = got is not None and got == it.label
        else:
            got = pred.strip()
            ok = got == it.reference.strip()
        correct += ok
        details.append({"reference": it.reference, "output": pred, "parsed": got, "correct": bool(ok)})
    return correct / len(items), details


def _choice_spec(items: Sequence[TaskItem], parse, max_choices: int):
    """(choices, their labels) when the items are a classification (every item labelled, a
    parser, at most ``max_choices`` distinct reference answers, one per label), else None."""
    if parse is None or not items or any(it.label is None for it in items):
        return None
    choices = list(dict.fromkeys(it.reference for it in items))
    labels = [parse(c) for c in choices]
    if len(choices) > max_choices or any(lab is None for lab in labels) or len(set(labels)) != len(labels):
        return None
    return choices, labels


def _by_special_tokens(items: Sequence[TaskItem]) -> dict[bool, list[int]]:
    groups: dict[bool, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.special_tokens, []).append(i)
    return groups


def _restricted_record(items, labels, choices, predictions, confidences, threshold: float) -> dict:
    pred = [labels[choices.index(p)] for p in predictions]
    correct = sum(p == it.label for p, it in zip(pred, items))
    return {"accuracy": correct / len(items), "below_threshold": sum(c < threshold for c in confidences),
            "min_confidence": threshold, "examples": len(items),
            "details": [{"label": it.label, "predicted": p, "probability": c}
                        for it, p, c in zip(items, pred, confidences)]}


def choice_accuracy(model, tokenizer, items: Sequence[TaskItem], *, parse: Callable[[str], str | None] | None,
                    min_confidence: float | None = None, batch_size: int = 16, max_choices: int = 20) -> dict | None:
    """Label-restricted prediction on a classification test set: the answer must be one of
    the distinct reference answers (``fastlora.generate(choices=...)``), the most probable
    one wins. Returns accuracy, how many examples fall below ``min_confidence`` (they would
    go to a person) and the per-item probabilities; None when the items are not a
    classification task (no labels, no parser, or more than ``max_choices`` answers)."""
    from ..generate import generate as fl_generate
    from ..generate.choices import DEFAULT_MIN_CONFIDENCE

    threshold = DEFAULT_MIN_CONFIDENCE if min_confidence is None else min_confidence
    spec = _choice_spec(items, parse, max_choices)
    if spec is None:
        return None
    choices, labels = spec
    pred: list[str] = [""] * len(items)
    conf = [0.0] * len(items)
    for special, idx in _by_special_tokens(items).items():
        res = fl_generate(model, [items[i].prompt for i in idx], tokenizer=tokenizer, choices=choices,
                          batch_size=batch_size, add_special_tokens=special)
        for j, i in enumerate(idx):
            pred[i], conf[i] = res.predictions[j], res.confidences[j]
    return _restricted_record(items, labels, choices, pred, conf, threshold)


def classify(model, tokenizer, items: Sequence[TaskItem], *, parse: Callable[[str], str | None] | None,
             max_new_tokens: int = 12, batch_size: int = 16, min_confidence: float | None = None,
             max_choices: int = 20) -> tuple[float, list[dict], dict | None]:
    """:func:`task_accuracy` and :func:`choice_accuracy` in one pass over the prompts:
    ``(accuracy, details, restricted)``. The free greedy answers are read off the forwards
    that score the labels (``fastlora.generate(choices=..., with_greedy=True)``), so each
    prompt runs once, and an answer that is a label then the end of turn needs no decode
    step. ``restricted`` is None when the items are not a classification; the free answers
    are then :func:`task_accuracy`'s. Under FSDP, which this path cannot drive, both run
    their own way (the restricted one is then skipped: None)."""
    from ..generate import generate as fl_generate
    from ..generate.choices import DEFAULT_MIN_CONFIDENCE
    from .distributed import is_fully_sharded

    spec = None if is_fully_sharded(model) else _choice_spec(items, parse, max_choices)
    if spec is None:
        acc, details = task_accuracy(model, tokenizer, items, parse=parse, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size)
        return acc, details, None
    if not items:
        raise ValueError("classify: no items to score")
    choices, labels = spec
    threshold = DEFAULT_MIN_CONFIDENCE if min_confidence is None else min_confidence
    eos = tokenizer.eos_token_id
    texts: list[str] = [""] * len(items)
    pred: list[str] = [""] * len(items)
    conf = [0.0] * len(items)
    for special, idx in _by_special_tokens(items).items():
        res = fl_generate(model, [items[i].prompt for i in idx], tokenizer=tokenizer, choices=choices,
                          batch_size=batch_size, add_special_tokens=special, with_greedy=True,
                          max_new_tokens=max_new_tokens, stop_token_ids=None if eos is None else [eos])
        for j, i in enumerate(idx):
            texts[i], pred[i], conf[i] = res.greedy.texts[j], res.predictions[j], res.confidences[j]
    acc, details = score_answers(items, texts, parse)
    return acc, details, _restricted_record(items, labels, choices, pred, conf, threshold)


# ------------------------------------------------------------------ forgetting
def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 4, max_length: int = 512) -> float:
    """exp(mean loss per token) over ``texts``, every token trained (as in ``text`` data)."""
    examples = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=True)["input_ids"])[:max_length]
        if len(ids) >= 2:
            examples.append({"input_ids": ids, "labels": list(ids)})
    if not examples:
        raise ValueError("perplexity: no text with at least two tokens")
    return math.exp(eval_loss(model, examples, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size))


def general_ability(model, tokenizer, *, max_new_tokens: int = 16, batch_size: int = 16) -> dict:
    """General-knowledge QA accuracy and general-text perplexity (the forgetting probe)."""
    from .defaults.general import answer_matches, general_qa, general_text

    qa = general_qa()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q["question"]}], tokenize=False,
                                      add_generation_prompt=True)
        for q in qa
    ]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = [bool(answer_matches(o, q["answers"])) for o, q in zip(outs, qa)]
    return {
        "qa_accuracy": sum(hits) / len(hits),
        "qa_correct": sum(hits),
        "qa_total": len(hits),
        "perplexity": perplexity(model, tokenizer, general_text()),
        "qa_outputs": [{"question": q["question"], "output": o, "correct": h} for q, o, h in zip(qa, outs, hits)],
    }


def retention(before: dict, after: dict) -> float | None:
    """Fraction of the general QA answers kept: accuracy after / accuracy before."""
    if not before or not after or before.get("qa_accuracy", 0) == 0:
        return None
    return after["qa_accuracy"] / before["qa_accuracy"]
