"""PPO (and GRPO) for QLoRA on ONE frozen 4-bit base: ``fastlora.train.ppo(PPOConfig(...))``.

Each rollout step:

1. **Rollout.** ``fastlora.generate`` samples a response per prompt (k per prompt for
   GRPO) with the ``policy`` adapter; the fp32 log-probs of the sampled tokens under the
   distribution sampled from (``log_softmax(logits / temperature)``) come from the same
   decode and are PPO's old log-probs (no second pass). The reference and training
   log-probs (and the entropy) use the same temperature, so the ratio and the KL compare
   like with like; top-k / top-p are refused (see ``PPOConfig``).
2. **Score.** The ``reward`` role (a ``fastlora rm`` result), a ``module:function``, or
   both weighted; optional clipping and a fixed score for a truncated response.
3. **Reference and values.** Reference log-probs and the critic's values on the
   sampled tokens, without grad, through ``fastlora.token_logprobs`` on gathered hidden
   states: the ``[batch, length, vocab]`` logits never exist.
4. **Advantages.** Per-token rewards −β·KL + score at the last token, GAE, whitening
   (``fastlora.rl``); GRPO: the score's z-score in its group, KL (k3) in the loss.
5. **Updates.** ``ppo_epochs`` passes over shuffled mini-batches of the rollout; each
   mini-batch is one optimizer step, accumulated over ``grad_accum`` micro-batches and
   normalized by the mini-batch's total valid tokens (as SFT does).

**The reference is the SFT model, as a frozen adapter.** Merging the SFT adapter into the
4-bit base would need a re-quantization that rounds most of the adapter's update away
(see ``fastlora/train/merge.py``), so "all adapters off" would not be the SFT model. The
SFT adapter is therefore loaded three times on the one base: ``reference`` (frozen),
``policy`` and ``critic`` (trainable copies). At step 0 the policy and the reference are
the same weights, so their log-probs from one full forward are bit-identical (tested).
The logged KL compares the rollout's old log-probs (the decode, token by token against a
KV cache) with the reference's full forward: at step 0 it is 0 up to the rounding between
those two paths (measured in the README), and so is the first mini-batch's ratio - 1.
Every forward runs with dropout off (see :func:`build_base`). Without an SFT adapter the
policy and critic start as fresh LoRA adapters and the reference is the base with
adapters off.

Reproducibility: every random choice (prompt order, sampling, mini-batch order) comes
from generators seeded by (seed, step), so a resumed run continues with the same
metrics as an uninterrupted one (tested).

**Under torchrun** (``distributed.py``'s conventions): ``batch_size`` and ``mini_batch_size``
are per rank. A step's prompts are the next ``batch_size x world`` of the prompt order, rank
r taking the r-th contiguous part, so a GRPO group (one prompt's k samples) never straddles
ranks. Each rank rolls out (its own sampling stream; rank 0's is a single process's), scores
and computes the reference log-probs and values of its own rows. Everything that one process
would compute over the whole rollout is global: the advantage whitening
(``distributed.global_whiten``), the logged means, the KL the controller sees. The updates
see the global rollout too: one permutation of all ranks' rows (the same seed on every
rank), each mini-batch of ``mini_batch_size x world`` rows is trained by the ranks holding
them, normalized by the mini-batch's valid tokens on all ranks, and the gradients averaged
(``distributed.average_gradients``) before each optimizer step. 2 ranks x b prompts then
update exactly as 1 process x 2b given the same rollouts (tested); the samples themselves
differ, since each rank draws its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..patch.prefix import PrefixMeter
from . import checkpoint as ckpt
from . import distributed as dist
from . import run as lifecycle
from .console import Console
from .ppo_config import PPOConfig



# ------------------------------------------------------------------------ prompts
@dataclass
class PromptItem:
    prompt: str  # the text the policy continues (chat-rendered with the generation prompt)
    columns: dict  # the record's other fields, passed to a reward function (e.g. label)
    special_tokens: bool = False  # tokenize the prompt with the tokenizer's special tokens


def prompt_items(records: list[dict], tokenizer, fmt: str, *, source: str = "data") -> list[PromptItem]:
    """Prompts to roll out from records: ``messages`` (the chat up to its last user turn,
    with the generation prompt), ``prompt`` (a string) with or without ``completion``,
    or Alpaca ``instruction``/``input``. Errors name the record."""
    from .data import render_alpaca

    items = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{source}: record {i} is a {type(r).__name__}, not an object")
        cols = {k: v for k, v in r.items() if k not in ("messages", "prompt", "completion", "instruction", "input",
                                                          "output")}
        if (fmt in ("auto", "messages")) and "messages" in r:
            msgs = r["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"{source}: record {i}: 'messages' must be a non-empty list of turns")
            last_user = max((j for j, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"),
                            default=None)
            if last_user is None:
                raise ValueError(f"{source}: record {i}: 'messages' has no user turn to answer")
            text = tokenizer.apply_chat_template(msgs[: last_user + 1], tokenize=False, add_generation_prompt=True)
            items.append(PromptItem(text, cols, special_tokens=False))
        elif fmt in ("auto", "prompt_completion") and isinstance(r.get("prompt"), str):
            items.append(PromptItem(r["prompt"], cols, special_tokens=True))
        elif fmt in ("auto", "alpaca") and isinstance(r.get("instruction"), str):
            items.append(PromptItem(render_alpaca(r["instruction"], r.get("input") or ""), cols, special_tokens=True))
        else:
            raise ValueError(f"{source}: record {i} has no prompt: expected 'messages', 'prompt' or 'instruction' "
                             f"(format {fmt}); it has {sorted(r)}")
        if not items[-1].prompt.strip():
            raise ValueError(f"{source}: record {i} has an empty prompt")
    return items


def load_prompts(cfg: PPOConfig, tokenizer) -> dict[str, Any]:
    """Train prompts, test items (for the before/after accuracy) and the task's parser."""
    from . import evaluate as ev
    from .data import detect_format, load_records

    if cfg.data is None:
        from .defaults import healthcare

        train = healthcare.load_split("train")
        test = healthcare.load_split("test")
        return {"task": "healthcare", "prompts": prompt_items(train, tokenizer, "messages", source="healthcare train"),
                "test": ev.task_items(test[: cfg.test_max_examples or None], tokenizer, "messages"),
                "parse": healthcare.parse_answer}
    records: list[dict] = []
    for p in cfg.data:
        records.extend((dict(r, _source=p) for r in load_records(p)))
    for r in records:
        r.pop("_source")
    if not records:
        raise ValueError(f"prompt data {cfg.data} holds no records")
    prompts = prompt_items(records, tokenizer, cfg.data_format, source=", ".join(cfg.data))
    test = []
    if cfg.test_data:
        trecs: list[dict] = []
        for p in cfg.test_data:
            trecs.extend(load_records(p))
        fmt = detect_format(trecs, cfg.data_format if cfg.data_format != "auto" else "auto")
        test = ev.task_items(trecs[: cfg.test_max_examples or None], tokenizer, fmt)
    return {"task": "custom", "prompts": prompts, "test": test, "parse": None}


# ------------------------------------------------------------------------ rollouts
@dataclass
class Rollout:
    """One rollout, laid out [left-padded prompt | response right-padded]: every row's
    response starts at column ``P`` (position ids come from the attention mask, as in
    generation, so the left padding changes nothing)."""

    input_ids: torch.Tensor  # (N, P + Lr)
    attention_mask: torch.Tensor  # (N, P + Lr)
    P: int  # column of the first response token
    tokens: torch.Tensor  # (N, Lr) response tokens (pad past the end)
    mask: torch.Tensor  # (N, Lr) float 0/1: valid response tokens (the stop token included)
    old_logp: torch.Tensor  # (N, Lr) log-probs under the distribution sampled from, from the rollout itself
    prompts: list[str]
    texts: list[str]
    truncated: torch.Tensor  # (N,) bool: hit max_new_tokens without a stop
    columns: dict  # reward-function columns, one list per field
    chat: list[bool] | None = None  # per row: the prompt is a chat rendering (how the reward model reads it)

    def select(self, idx: list[int]) -> "Rollout":
        t = torch.tensor(idx, dtype=torch.long)
        return Rollout(self.input_ids[t], self.attention_mask[t], self.P, self.tokens[t], self.mask[t],
                       self.old_logp[t], [self.prompts[i] for i in idx], [self.texts[i] for i in idx],
                       self.truncated[t], {k: [v[i] for i in idx] for k, v in self.columns.items()},
                       None if self.chat is None else [self.chat[i] for i in idx])


def build_rollout(prompt_ids: list[list[int]], sequences: list[torch.Tensor], logprobs: list[torch.Tensor],
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention, P, tokens, mask, old_logp) from per-row prompt ids and generated
    tokens / log-probs. A row that generated nothing is an error."""
    N = len(prompt_ids)
    lens = [int(s.numel()) for s in sequences]
    zero = [i for i, n in enumerate(lens) if n == 0]
    if zero:
        raise ValueError(f"response length 0 for rollout row(s) {zero[:10]}: generation returned no token")
    empty = [i for i, p in enumerate(prompt_ids) if not p]
    if empty:
        raise ValueError(f"prompt of rollout row(s) {empty[:10]} has no token")
    P, Lr = max(len(p) for p in prompt_ids), max(lens)
    ids = torch.full((N, P + Lr), pad_id, dtype=torch.long)
    attn = torch.zeros(N, P + Lr, dtype=torch.long)
    tokens = torch.full((N, Lr), pad_id, dtype=torch.long)
    mask = torch.zeros(N, Lr, dtype=torch.float32)
    old = torch.zeros(N, Lr, dtype=torch.float32)
    for i, (p, s, lp) in enumerate(zip(prompt_ids, sequences, logprobs)):
        n = lens[i]
        if lp.numel() != n:
            raise ValueError(f"rollout row {i}: {n} tokens but {lp.numel()} log-probs")
        ids[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        ids[i, P: P + n] = s.cpu()
        attn[i, P - len(p): P + n] = 1
        tokens[i, :n] = s.cpu()
        mask[i, :n] = 1
        old[i, :n] = lp.detach().float().cpu()
    return ids, attn, P, tokens, mask, old


def response_logprobs(base, role: str, ro: Rollout, *, entropy: bool = False, hidden: torch.Tensor | None = None,
                      temperature: float = 1.0):
    """(N, Lr) log-probs of the response tokens under ``role``'s distribution at
    ``temperature`` (and its entropy), from the hidden states at the response positions
    only: no logits, no prompt-token work."""
    dev = _device(base)
    ids, attn = ro.input_ids.to(dev), ro.attention_mask.to(dev)
    if hidden is None:
        hidden = base.hidden_states(role, ids, attn)
    P = ro.P
    # columns P-1 .. end: hidden at P-1+j predicts response token j
    return base.logprobs_from_hidden(hidden[:, P - 1:], ids[:, P - 1:], attn[:, P - 1:], return_entropy=entropy,
                                     temperature=temperature)


def response_values(base, ro: Rollout, hidden: torch.Tensor) -> torch.Tensor:
    """(N, Lr) the critic head on the hidden states that predict each response token."""
    P, Lr = ro.P, ro.tokens.shape[1]
    return base.head_values("critic", hidden[:, P - 1: P - 1 + Lr], ro.mask.to(hidden.device))


def _device(base) -> torch.device:
    return next(base.lm.parameters()).device


# ------------------------------------------------------------------------ scoring
class Scorer:
    """The score of each response: reward model and/or reward function, weighted, then
    the truncation penalty and clipping. Failed samples are reported and skipped (or stop
    the run) by :func:`fastlora.train.rewards.call_reward_fn`."""

    def __init__(self, cfg: PPOConfig, base, reward_fn, log, tokenizer=None):
        self.cfg, self.base, self.fn, self.log = cfg, base, reward_fn, log
        self.has_model = base is not None and "reward" in base.roles
        self.tokenizer = tokenizer
        self.tail = chat_turn_tail(tokenizer) if tokenizer is not None else ""

    @torch.no_grad()
    def __call__(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (N,), ok (N,) bool)."""
        from .rewards import call_reward_fn

        cfg = self.cfg
        N = len(ro.texts)
        scores = torch.zeros(N, dtype=torch.float32)
        ok = torch.ones(N, dtype=torch.bool)
        if self.has_model:
            dev = _device(self.base)
            ids, attn = self.reward_inputs(ro)
            s = self.base.score("reward", ids.to(dev), attn.to(dev)).float().cpu()
            scores += cfg.reward_model_weight * s
        if self.fn is not None:
            vals, good = call_reward_fn(self.fn, ro.prompts, ro.texts, ro.columns, on_error=cfg.on_reward_error,
                                        log=self.log)
            scores += cfg.reward_fn_weight * torch.tensor(vals, dtype=torch.float32)
            ok &= torch.tensor(good, dtype=torch.bool)
        if cfg.truncation_penalty is not None:
            scores = torch.where(ro.truncated, torch.tensor(cfg.truncation_penalty, dtype=torch.float32), scores)
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return scores, ok


    def reward_inputs(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """What the reward model scores: each prompt and response as ``fastlora rm`` rendered
        its training pairs (:func:`fastlora.train.pairs.encode_sequence`), right-padded.

        The score is read at the last token, so that token must be the one training read: a
        chat pair was the whole conversation through the template, which ends an assistant
        turn with more than the stop token generation stops at (ChatML: ``<|im_end|>`` then a
        newline). Scored as generated, the head would read the stop token, a position it was
        never trained on (measured on the default run: a mean of -4.9 for answers whose
        rendered form scores -0.9). A plain prompt gets the response's text, no EOS.
        """
        tok = self.tokenizer
        if tok is None or ro.chat is None:
            return ro.input_ids, ro.attention_mask
        rows = []
        for prompt, text, chat in zip(ro.prompts, ro.texts, ro.chat):
            if chat:
                rows.append(list(tok(prompt + text + self.tail, add_special_tokens=False)["input_ids"]))
            else:
                rows.append(list(tok(prompt, add_special_tokens=True)["input_ids"])
                            + list(tok(text, add_special_tokens=False)["input_ids"]))
        from .pairs import _pad

        return _pad(rows, tok.pad_token_id if tok.pad_token_id is not None else 0)


def chat_turn_tail(tokenizer) -> str:
    """The text a chat template puts after an assistant turn's content (ChatML:
    ``<|im_end|>`` and a newline); "" without a template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return ""
    mark = "\x00fastlora-answer\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}],
                                             tokenize=False, add_generation_prompt=False)
    except Exception:  # a template that refuses this conversation: score as generated
        return ""
    return text[text.rindex(mark) + len(mark):] if mark in text else ""


# ------------------------------------------------------------------------ the model
def build_base(cfg: PPOConfig, lm, sft_adapter: Path | None, reward_dir: Path | None):
    """The shared base with the roles this run needs (see the module docstring), in eval mode."""
    from fastlora.rl.base import SharedBase

    base = SharedBase.from_model(lm, patch=cfg.patch, share_prefix=cfg.share_prefix)
    fresh = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules)
    if sft_adapter is not None:
        base.add_role("policy", from_pretrained=sft_adapter, trainable=True)
        base.add_role("reference", from_pretrained=sft_adapter, trainable=False)
    else:
        base.add_role("policy", seed=cfg.seed, trainable=True, **fresh)
    if cfg.advantage == "gae":
        if cfg.critic == "shared":
            base.add_role("critic", adapter="policy", kind="value", head=True, head_init_std=0.0)
        elif sft_adapter is not None:
            base.add_role("critic", from_pretrained=sft_adapter, trainable=True, kind="value", head=True,
                          head_init_std=0.0)
        else:
            base.add_role("critic", seed=cfg.seed + 1, trainable=True, head_init_std=0.0, **fresh)
    if reward_dir is not None:  # a `fastlora rm` result: SEQ_CLS adapter + its score head, frozen
        base.add_role("reward", from_pretrained=reward_dir, kind="score", head=True, trainable=False)
    # Every PPO forward runs with dropout off, the updates' included (eval mode keeps
    # gradients): the KL, the ratio and the value clipping compare forwards of the same
    # weights, which dropout would make differ (an SFT adapter's lora_dropout 0.05 gave a
    # step-0 KL of 0.57 and a first ratio of 0.82), and a reward model must score a
    # response the same way twice. Eval mode reaches LoRA dropout, attention dropout (read
    # from module.training) and hidden dropout alike; generate restores each module's own
    # flag, so the base stays in eval mode for the whole run.
    base.eval()
    return base


def _trained_roles(cfg: PPOConfig) -> list[str]:
    return ["policy"] + (["critic"] if cfg.advantage == "gae" else [])


class _PolicySaver:
    """The policy adapter alone, in PEFT's format (what ``run.save_final_adapter`` writes as adapter/)."""

    def __init__(self, base):
        self.base = base

    def save_pretrained(self, path) -> None:
        _save_policy(self.base, Path(path))


class _Saver:
    """What ``checkpoint.save_checkpoint`` saves as "the model": the trained roles'
    adapters and heads together (SharedBase.save)."""

    def __init__(self, base, roles):
        self.base, self.roles = base, roles

    def save_pretrained(self, path) -> None:
        self.base.save(path, roles=self.roles)


def load_ppo_checkpoint(path: Path, base, roles, optimizer) -> dict:
    """Restore the trained roles, optimizer and RNG from a checkpoint dir; return the trainer dict.
    The checksums are verified first, so a damaged file is named and nothing is half-loaded."""
    problem = ckpt.verify_checkpoint(path)
    if problem is not None:
        raise ckpt.CheckpointError(path, problem)
    base.load(path / "adapter", roles=roles)
    return ckpt.load_training_state(path, optimizer, None, verify=False)


# ------------------------------------------------------------------------ one step
def _seed(cfg: PPOConfig, step: int, what: int, *, per_rank: bool = True) -> int:
    """The seed of one random choice of a step. ``per_rank``: each rank gets its own stream (its
    own samples), rank 0 the single-process one; otherwise every rank draws the same."""
    s = (cfg.seed * 1_000_003 + step * 101 + what) % (2**31 - 1)
    r = dist.rank()
    return s if r == 0 or not per_rank else (s * 1_000_003 + r) % (2**31 - 1)


def make_rollout(base, tokenizer, cfg: PPOConfig, items: list[PromptItem], step: int,
                 temperature: float | None = None) -> tuple[Rollout, dict]:
    """Sample one response per item with the policy (fastlora.generate, log-probs from the decode)."""
    import fastlora

    prompt_ids = [list(tokenizer(it.prompt, add_special_tokens=it.special_tokens)["input_ids"]) for it in items]
    too_long = [i for i, p in enumerate(prompt_ids) if len(p) > cfg.max_prompt_length]
    if too_long:
        # keep the end of the prompt: the generation prompt and the question are there
        prompt_ids = [p[-cfg.max_prompt_length:] for p in prompt_ids]
    P = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(items), P), pad, dtype=torch.long)
    attn = torch.zeros(len(items), P, dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):] = 1
    dev = _device(base)
    stops = sorted(_stop_ids(base.lm, tokenizer))
    t = cfg.temperature if temperature is None else temperature
    t0 = time.perf_counter()
    with base.activate("policy") as model, torch.no_grad():
        res = fastlora.generate(model, input_ids=ids.to(dev), attention_mask=attn.to(dev),
                                max_new_tokens=cfg.max_new_tokens, temperature=t, top_k=cfg.top_k or None,
                                top_p=cfg.top_p, seed=_seed(cfg, step, 1), stop_token_ids=stops,
                                return_logprobs=True)
    gen_s = time.perf_counter() - t0
    seqs = [s.detach().cpu() for s in res.sequences]
    # the distribution sampled from (temperature T: log_softmax(logits / T), PPOConfig
    # refuses top-k/top-p); a greedy rollout is only scored, its log-probs unused
    logprobs = res.sampling_logprobs if t > 0 else res.logprobs
    full_ids, full_attn, P, tokens, mask, old = build_rollout(prompt_ids, seqs, list(logprobs), pad)
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in seqs]
    truncated = torch.tensor([r == "length" for r in res.finish_reasons])
    keys = sorted({k for it in items for k in it.columns})
    columns = {k: [it.columns.get(k) for it in items] for k in keys}
    ro = Rollout(full_ids, full_attn, P, tokens, mask, old, [it.prompt for it in items], texts, truncated, columns,
                 [not it.special_tokens for it in items])
    n_tok = int(mask.sum())
    return ro, {"generate_seconds": gen_s, "rollout_tokens": n_tok,
                "rollout_tokens_per_second": n_tok / gen_s if gen_s > 0 else None,
                "prompts_truncated": len(too_long)}


def greedy_scores(base, tokenizer, cfg: PPOConfig, items: list[PromptItem], scorer: "Scorer", step: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, ok) of the policy's greedy answers to ``items``: the per-prompt baseline of
    ``score_baseline: greedy`` (ReMax, Li et al. 2023). A reward model's scores of equally
    good answers differ from prompt to prompt; a sampled answer then reads as better or
    worse than it is, and with one sample per prompt (and a critic that has not learnt the
    prompts yet) PPO follows those offsets. Subtracting the score of the greedy answer to
    the same prompt leaves what the sample changed, and a sample equal to the greedy answer
    scores exactly 0. The baseline does not depend on the sample, so the policy gradient
    stays unbiased."""
    ro, _ = make_rollout(base, tokenizer, cfg, items, step, temperature=0.0)
    return scorer(ro)


def _stop_ids(lm, tokenizer) -> set[int]:
    stops = set()
    for src in (getattr(lm, "generation_config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        stops.update([eos] if isinstance(eos, int) else list(eos))
    return stops


@dataclass
class Batch:
    """A rollout with everything the updates need (all (N, Lr) on the model's device)."""

    ro: Rollout
    ref_logp: torch.Tensor
    old_values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None


def prepare_batch(base, cfg: PPOConfig, ro: Rollout, scores: torch.Tensor, beta: float,
                  baseline: torch.Tensor | None = None) -> tuple[Batch, dict]:
    """Reference log-probs, values, per-token rewards, advantages (no grad). ``baseline``
    (N,): subtracted from the scores before they enter the rewards (``score_baseline``);
    the stats report the raw scores."""
    from fastlora import rl

    dev = _device(base)
    mask = ro.mask.to(dev)
    old = ro.old_logp.to(dev)
    with torch.no_grad():
        ref = response_logprobs(base, "reference", ro, temperature=cfg.temperature)
        kl = rl.kl_penalty(old, ref, cfg.kl_kind)
        seq_kl = rl.masked_sum(kl, mask, dim=1)  # (N,) KL of each response
        # every logged mean is over the whole rollout, all ranks' rows (distributed.global_mean)
        _, score_var = dist.global_mean_var(scores)
        (n_rows,) = dist.all_sum([scores.numel()])
        stats = {"kl": dist.global_mean(seq_kl), "score": dist.global_mean(scores),
                 "score_std": (score_var * n_rows / (n_rows - 1)) ** 0.5 if n_rows > 1 else 0.0,
                 "response_length": dist.global_mean(mask.sum(1))}
        if baseline is not None:
            stats["score_baseline"] = dist.global_mean(baseline)
            scores = scores - baseline
        if cfg.advantage == "grpo":  # a group never straddles ranks: its z-scores are local
            adv = rl.group_advantages(scores.to(dev, torch.float32), cfg.group_size)[:, None] * mask
            stats["non_score_reward"] = -beta * stats["kl"]
            return Batch(ro, ref, None, adv, None), stats
        h = base.hidden_states("critic", ro.input_ids.to(dev), ro.attention_mask.to(dev))
        values = response_values(base, ro, h)
        rewards, kl_m = rl.token_rewards(scores.to(dev, torch.float32), old, ref, mask, beta, cfg.kl_kind)
        adv, ret = rl.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:  # rl.whiten with the moments of the global rollout
            adv = dist.global_whiten(adv, mask)
        stats["non_score_reward"] = dist.global_mean(rl.masked_sum(-beta * kl_m, mask, dim=1))
        stats["reward"] = stats["score"] + stats["non_score_reward"]
        stats["value_mean"] = dist.global_mean(values, mask)
        stats["return_mean"] = dist.global_mean(ret, mask)
    return Batch(ro, ref, values, adv, ret), stats


def micro_loss(base, cfg: PPOConfig, b: Batch, idx: list[int], beta: float) -> tuple[torch.Tensor, dict]:
    """The loss of the rows ``idx`` (mean over their valid tokens) and its stats."""
    from fastlora import rl

    dev = _device(base)
    t = torch.tensor(idx, dtype=torch.long, device=dev)
    ro = b.ro.select(idx)
    mask = ro.mask.to(dev)
    ids, attn = ro.input_ids.to(dev), ro.attention_mask.to(dev)
    h = base.hidden_states("policy", ids, attn)
    logp, ent = response_logprobs(base, "policy", ro, entropy=True, hidden=h, temperature=cfg.temperature)
    pl, pst = rl.policy_loss(logp, ro.old_logp.to(dev), b.advantages[t], mask, clip=cfg.clip)
    ent_mean = rl.entropy_bonus(ent, mask)
    loss = pl - cfg.ent_coef * ent_mean if cfg.ent_coef else pl
    stats = {"policy_loss": float(pl.detach()), "entropy": float(ent_mean.detach()), **pst}
    if cfg.advantage == "grpo":
        if beta:
            kl = rl.masked_mean(rl.kl_penalty(logp, b.ref_logp[t], "k3"), mask)
            loss = loss + beta * kl
            stats["kl_loss"] = float(kl.detach())
    else:
        hc = h if cfg.critic == "shared" else base.hidden_states("critic", ids, attn)
        values = response_values(base, ro, hc)
        vl, vst = rl.value_loss(values, b.old_values[t], b.returns[t], mask, clip=cfg.vf_clip)
        loss = loss + cfg.vf_coef * vl
        stats.update({"value_loss": float(vl.detach()), **vst})
    return loss, stats


def ppo_updates(base, cfg: PPOConfig, b: Batch, optimizer, params: list, step: int, beta: float) -> dict:
    """``ppo_epochs`` passes over shuffled mini-batches; one optimizer step per mini-batch,
    its micro-batches weighted by their share of the mini-batch's valid tokens.

    Under torchrun the shuffling is over the GLOBAL rollout (every rank's rows, in rank
    order: one permutation, the same on every rank) in mini-batches of ``mini_batch_size x
    world`` rows; each rank trains its own rows of a mini-batch (none, some or all) in
    micro-batches of at most ``mini_batch_size / grad_accum``, normalized by the
    mini-batch's valid tokens on ALL ranks; the gradients are averaged before each step.
    The logged losses are per mini-batch token means over all ranks, then averaged over the
    mini-batches: what one process holding the whole rollout computes."""
    world = dist.world_size()
    N = b.ro.tokens.shape[0]
    counts_local = b.ro.mask.sum(1).double()
    per_rank = dist.all_gather_object(counts_local.tolist())  # valid tokens of every row of every rank
    offset = sum(len(c) for c in per_rank[:dist.rank()])
    counts = torch.tensor([c for part in per_rank for c in part], dtype=torch.float64)
    n_global = counts.numel()
    micro = max(1, cfg.mini_batch_size // cfg.grad_accum)
    g = torch.Generator().manual_seed(_seed(cfg, step, 2, per_rank=False))
    sums: list[dict[str, float]] = []  # per mini-batch: stat -> token-weighted sum (this rank's rows)
    norms = []
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n_global, generator=g).tolist()
        for s in range(0, n_global, cfg.mini_batch_size * world):
            mb = perm[s: s + cfg.mini_batch_size * world]
            total = float(counts[mb].sum())
            mine = [i - offset for i in mb if offset <= i < offset + N]
            acc: dict[str, float] = {}
            for j in range(0, len(mine), micro):
                part = mine[j: j + micro]
                w = float(counts_local[part].sum())
                loss, st = micro_loss(base, cfg, b, part, beta)
                (loss * (w / total * world)).backward()  # x world: average_gradients divides by it
                for k, v in st.items():  # every stat is a mean over the part's valid tokens
                    acc[k] = acc.get(k, 0.0) + v * w
            acc["__tokens__"] = total
            sums.append(acc)
            dist.average_gradients(params)
            norm = lifecycle.optimizer_step(params, optimizer, max_grad_norm=cfg.max_grad_norm)
            if norm is not None:
                norms.append(norm)
    merged: list[dict[str, float]] = [{} for _ in sums]
    for part in dist.all_gather_object(sums):
        for m, acc in zip(merged, part):
            for k, v in acc.items():
                m[k] = v if k == "__tokens__" else m.get(k, 0.0) + v
    keys = sorted({k for m in merged for k in m if k != "__tokens__"})
    out = {k: sum(m.get(k, 0.0) / m["__tokens__"] for m in merged) / len(merged) for k in keys}
    if norms:
        out["grad_norm"] = sum(norms) / len(norms)
    return out


# ------------------------------------------------------------------------ inputs
DEFAULT_RM_DIR = "runs/rm"


def find_reward_adapter(directory: str | Path) -> Path:
    """The reward model of a ``fastlora rm`` result: its PEFT sequence-classification
    adapter (the dir itself or its ``adapter`` subdir)."""
    d = Path(directory)
    for cand in (d, d / "adapter"):
        if (cand / "adapter_config.json").is_file() and (cand / "adapter_model.safetensors").is_file():
            return cand
    raise FileNotFoundError(f"reward model {str(d)!r} holds no PEFT adapter (adapter_config.json + "
                            f"adapter_model.safetensors, or an adapter/ subdir with them); train one with `fastlora rm`")


def check_same_base(reward_dir: Path, model_path: Path) -> None:
    """Refuse a reward model trained on another base (its adapter records the base path)."""
    import json

    for cfg_file in [reward_dir / "adapter_config.json"]:
        recorded = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
        if not recorded or Path(recorded) == Path(model_path):
            continue
        a, b = Path(recorded) / "config.json", Path(model_path) / "config.json"
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
        if a.is_file() and b.is_file():
            ca, cb = json.loads(a.read_text()), json.loads(b.read_text())
            if all(ca.get(k) == cb.get(k) for k in keys):
                continue
        elif Path(recorded).name == Path(model_path).name:
            continue
        raise ValueError(f"reward model {str(reward_dir)!r} was trained on base {recorded!r} ({cfg_file}), "
                         f"but the policy's base is {str(model_path)!r}: the roles must share one base")


def resolve_sft_adapter(cfg: PPOConfig, log, sft_options: dict | None = None) -> Path | None:
    """The SFT adapter the policy starts from; for the embedded task, the default SFT
    run's (trained first when absent; ``sft_options`` replace its defaults, e.g. a short
    run in tests)."""
    from .peft_methods import adapter_config_file, require_lora_adapter

    if cfg.sft_adapter is not None:
        p = Path(cfg.sft_adapter)
        if not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"sft_adapter {str(p)!r} is not a PEFT adapter dir (no adapter_config.json)")
        return require_lora_adapter(p, "sft_adapter")
    if cfg.data is not None:
        return None
    p = Path(cfg.sft_output_dir) / "adapter"
    if adapter_config_file(p) is not None:
        return require_lora_adapter(p, "the SFT adapter")
    log(f"no SFT adapter at {p}: running the default SFT first (fastlora sft --output-dir {cfg.sft_output_dir})")
    from .config import SFTConfig
    from .sft import sft

    # the whole config in one constructor: sft(config, **overrides) rebuilds it through
    # SFTConfig.from_dict, which turned target_modules 'all-linear' into ['all-linear']
    sft(SFTConfig(model=cfg.model, cache_dir=cfg.cache_dir, output_dir=cfg.sft_output_dir, progress=cfg.progress,
                  device=cfg.device, seed=cfg.seed,
                  resume=ckpt.latest_checkpoint(cfg.sft_output_dir) is not None, **(sft_options or {})))
    return p


def resolve_reward(cfg: PPOConfig) -> tuple[Path | None, Any, str]:
    """(reward save dir or None, reward function or None, description). Checks imports
    before anything is loaded or written."""
    from .rewards import healthcare_rule_reward, load_reward_fn

    fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
    rm = None
    if cfg.reward_model is not None:
        rm = find_reward_adapter(cfg.reward_model)
    elif cfg.data is None and cfg.reward_fn is None:
        try:
            rm = find_reward_adapter(DEFAULT_RM_DIR)
        except FileNotFoundError:
            rm = None
    if rm is None and fn is None:
        if cfg.data is None:
            fn = healthcare_rule_reward
        else:
            raise ValueError("no reward: set reward_model (a `fastlora rm` result) and/or reward_fn ('module:function')")
    parts = []
    if rm is not None:
        parts.append(f"reward model {rm}" + (f" x{cfg.reward_model_weight:g}" if fn is not None else ""))
    if fn is not None:
        name = cfg.reward_fn or "the healthcare rule reward (+1 right label, -1 wrong label, -2 unparsable)"
        parts.append(name + (f" x{cfg.reward_fn_weight:g}" if rm is not None else ""))
    return rm, fn, " + ".join(parts)


def _mean_score(scorer: Scorer, base, tokenizer, cfg: PPOConfig, items, details) -> float | None:
    """Mean score of the greedy test answers (the PPO reward before/after)."""
    scores = _test_scores(scorer, base, tokenizer, cfg, items, details)
    return sum(scores) / len(scores) if scores else None


def _test_scores(scorer: Scorer, base, tokenizer, cfg: PPOConfig, items, details) -> list[float]:
    """The scores of the greedy test answers whose reward did not fail."""
    if not details:
        return []
    # score the greedy outputs as rollouts: prompt + output tokens (+ the stop token)
    eos = tokenizer.eos_token_id
    prompt_ids, seqs = [], []
    for it, d in zip(items, details):
        prompt_ids.append(list(tokenizer(it.prompt, add_special_tokens=it.special_tokens)["input_ids"]))
        out = list(tokenizer(d["output"], add_special_tokens=False)["input_ids"]) + [eos]
        seqs.append(torch.tensor(out, dtype=torch.long))
    ids, attn, P, tokens, mask, old = build_rollout(prompt_ids, seqs, [torch.zeros(len(s)) for s in seqs],
                                                    tokenizer.pad_token_id)
    cols = {"label": [it.label for it in items]}
    ro = Rollout(ids, attn, P, tokens, mask, old, [it.prompt for it in items], [d["output"] for d in details],
                 torch.zeros(len(items), dtype=torch.bool), cols, [not it.special_tokens for it in items])
    scores = []
    for s in range(0, len(items), cfg.eval_batch_size):
        sc, ok = scorer(ro.select(list(range(s, min(len(items), s + cfg.eval_batch_size)))))
        scores.extend(sc[ok].tolist())
    return scores


# ------------------------------------------------------------------------ the run
def ppo(config: PPOConfig | None = None, *, on_step: Callable[[int, dict], bool | None] | None = None,
        **overrides: Any) -> dict:
    """Run PPO (or GRPO) and return the summary (also written to ``output_dir/summary.json``).

    ``config`` defaults to ``PPOConfig(**overrides)``; with ``config`` given, ``overrides``
    replace its fields. ``on_step(step, metrics)`` is called after every rollout step;
    returning True stops early (the final evaluation and saving still happen).
    """
    # only the main rank logs and writes; every rank rolls out and trains
    return lifecycle.start(PPOConfig, config, overrides, "ppo()", _ppo, on_step, enabled=dist.is_main())


def _ppo(cfg: PPOConfig, log: Console, on_step) -> dict:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(cfg.output_dir)

    main, world = dist.is_main(), dist.world_size()

    # ---- checks that write nothing
    from .model import load_base, load_tokenizer, resolve_device, resolve_dtype, resolve_model_path

    def check_inputs():
        found = ckpt.check_output_dir(out, resume=cfg.resume, log=log.warn)
        if found is not None:
            # another number of processes only with the same global batches (per-rank sizes x processes)
            regrouped = dist.check_resume_world_size(out / ckpt.RUN_FILE, cfg.to_dict(),
                                                     per_rank=("batch_size", "mini_batch_size"))
            ckpt.check_resume_config(out, cfg.to_dict(), resumable=ckpt.RESUMABLE_CHANGES | regrouped)
        reward = resolve_reward(cfg)
        model_path = resolve_model_path(cfg.model, cfg.cache_dir)
        if reward[0] is not None:
            check_same_base(reward[0], model_path)
        tokenizer = load_tokenizer(model_path)
        return found, reward, model_path, tokenizer, load_prompts(cfg, tokenizer)

    # Under torchrun a rank that cannot read its inputs ends every rank with its error.
    resume_from, (reward_dir, reward_fn, reward_desc), model_path, tokenizer, data = dist.agree(
        check_inputs, "checking the output dir and reading the prompts and rewards")
    device = dist.local_device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    lifecycle.preflight_run(out, cfg, model_path, copies=len(_trained_roles(cfg)) + 1)
    prompts = data["prompts"]
    sft_adapter = resolve_sft_adapter(cfg, log)
    if sft_adapter is not None:
        check_same_base_adapter(sft_adapter, model_path)

    # ---- model
    lm = load_base(model_path, load_in_4bit=cfg.load_in_4bit, dtype=dtype, device=device)
    base = build_base(cfg, lm, sft_adapter, reward_dir)
    roles = _trained_roles(cfg)
    pol = base.trainable_parameters(["policy"])
    groups = [{"params": pol}]
    if cfg.advantage == "gae":
        cri = [p for p in base.trainable_parameters(["critic"]) if all(p is not q for q in pol)]
        groups.append({"params": cri, "lr": cfg.critic_lr or cfg.lr})
    params = [p for g in groups for p in g["params"]]
    from .sft import make_optimizer

    optimizer = make_optimizer(cfg, groups, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant; checkpoints keep one
    kl_ctl = (rl_kl_controller(cfg))
    scorer = Scorer(cfg, base, reward_fn, log, tokenizer)
    log(f"PPO ({cfg.advantage}, critic {cfg.critic if cfg.advantage == 'gae' else 'none'}) on {model_path.name}: "
        f"{len(prompts)} prompts, reward: {reward_desc}; reference: "
        + (f"frozen SFT adapter {sft_adapter}" if sft_adapter else "the base (adapters off)"))

    def save(root=None, keep=cfg.keep_checkpoints):
        if world > 1:  # each rank's torch RNG (dropout), so that a resumed run draws what it would have
            state["rng_per_rank"] = dist.all_gather_object(ckpt.rng_state())
        state["kl_ctl"] = kl_ctl.state_dict()
        return ckpt.save_checkpoint(out, step, _Saver(base, roles), optimizer, scheduler, state, keep=keep, root=root)

    if resume_from is None:
        with dist.main_writes() as writer:
            if writer:
                ckpt.init_output_dir(out, lifecycle.run_info(
                    cfg.to_dict(), model_path=str(model_path), device=str(device), dtype=str(dtype),
                    reward=reward_desc, sft_adapter=str(sft_adapter) if sft_adapter else None, world_size=world))
    elif main:
        ckpt.clean_stale(out)
    metrics_path = out / "metrics.jsonl"
    metrics = lifecycle.MetricsWriter(metrics_path, log=log, enabled=main)
    samples_path = out / "samples.jsonl"

    state: dict[str, Any] = {"cursor": 0, "seconds": 0.0, "cpu_seconds": 0.0, "episodes": 0, "tokens": 0,
                             "before": {}, "history": [], "kl_ctl": kl_ctl.state_dict()}
    step = 0
    if resume_from is not None:
        # Every rank reads the checkpoint rank 0 wrote (the output dir must be shared).
        state.update(dist.agree(lambda: load_ppo_checkpoint(resume_from, base, roles, optimizer),
                                f"loading {resume_from}"))
        kl_ctl.load_state_dict(state["kl_ctl"])
        step = state.pop("step")
        per_rank = state.pop("rng_per_rank", None)
        if per_rank is not None and len(per_rank) == world:
            ckpt.set_rng_state(per_rank[dist.rank()])
        with dist.main_writes() as writer:
            if writer:
                for path in (metrics_path, samples_path):
                    kept = [m for m in ckpt.read_jsonl(path) if m.get("step", 0) <= step]
                    ckpt.write_text_atomic(path, "".join(ckpt.json_line(m) for m in kept))
        log(f"resumed from {resume_from} at step {step}/{cfg.max_steps}")

    # ---- before
    if resume_from is None:
        state["before"] = _evaluate(base, tokenizer, cfg, data, scorer, log, "before")
        metrics.write({"step": 0, "event": "before", **_flat(state["before"])})

    # ---- train
    per = cfg.group_size if cfg.advantage == "grpo" else 1
    bar = log.progress(cfg.max_steps, initial=step, desc=f"ppo ({cfg.advantage})", log_every=cfg.log_every)
    stopped_early = False
    prefix_meter = PrefixMeter(base)
    try:
        while step < cfg.max_steps:
            t0, c0 = time.perf_counter(), time.process_time()
            items = []
            for j in range(cfg.batch_size * world):  # the step's global prompts; this rank's contiguous part
                epoch, pos = divmod(state["cursor"], len(prompts))
                if j // cfg.batch_size == dist.rank():
                    order = _prompt_order(len(prompts), cfg.seed, epoch)
                    items.extend([prompts[order[pos]]] * per)
                state["cursor"] += 1
            ro, rst = make_rollout(base, tokenizer, cfg, items, step)
            # scoring (reward, reference, values) and the updates: this step's own forwards, not generation's
            with prefix_meter.window() as prefix:
                scores, ok = scorer(ro)
                skipped = int((~ok).sum())
                keep = _kept_rows(ok, per) if skipped else list(range(len(ok)))
                if dist.all_sum([not keep])[0]:  # a rank without rows would have nothing to update with
                    log(f"step {step + 1}: every sample's reward failed" + (" on some rank" if world > 1 else "")
                        + "; rollout skipped")
                    step += 1
                    continue
                if skipped:
                    ro, scores = ro.select(keep), scores[torch.tensor(keep)]
                baseline = None
                if cfg.score_baseline == "greedy":
                    baseline, ok_b = greedy_scores(base, tokenizer, cfg, items, scorer, step)
                    if skipped:
                        baseline, ok_b = baseline[torch.tensor(keep)], ok_b[torch.tensor(keep)]
                    baseline = torch.where(ok_b, baseline, scores)  # no baseline where its reward failed
                beta = kl_ctl.value
                batch, bst = prepare_batch(base, cfg, ro, scores, beta, baseline)
                ust = ppo_updates(base, cfg, batch, optimizer, params, step, beta)
            # the whole step's counts over every rank: the KL controller sees the global KL and episodes
            episodes, skipped, truncated, n_tok = (int(v) for v in dist.all_sum(
                [len(ro.texts), skipped, int(ro.truncated.sum()), rst["rollout_tokens"]]))
            gen_s = max(dist.all_gather_object(rst["generate_seconds"]))  # the ranks generate at once
            kl_ctl.update(bst["kl"], episodes)
            step += 1
            dt = time.perf_counter() - t0
            state["seconds"] += dt
            state["cpu_seconds"] += time.process_time() - c0
            state["episodes"] += episodes
            state["tokens"] += n_tok
            rec = {"step": step, **bst, **ust, "beta": beta, "skipped": skipped,
                   "truncated": truncated / episodes, "episodes_per_second": episodes / dt,
                   "rollout_tokens_per_second": n_tok / gen_s if gen_s > 0 else None, "step_seconds": dt,
                   "generate_seconds": gen_s, "tokens_run_fraction": prefix["tokens_run_fraction"]}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics.write(rec)
            state["history"].append({"step": step, "score": rec["score"], "kl": rec["kl"]})
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1) and main:
                for i in range(min(3, len(ro.texts))):
                    ckpt.append_jsonl(samples_path, {"step": step, "prompt": ro.prompts[i][-200:],
                                                     "response": ro.texts[i], "score": float(scores[i])})
                log(f"step {step} sample: {ro.texts[0]!r} -> score {float(scores[0]):.2f}")
            bar.update(step, rec)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                lifecycle.try_checkpoint(save, log=log)  # every rank (rank 0 writes)
            stopped_early = on_step is not None and bool(on_step(step, rec))
            if world > 1:  # a rank that stops alone would leave the others waiting in the next collective
                stopped_early = dist.all_sum([stopped_early])[0] > 0
            if stopped_early:
                break
    except KeyboardInterrupt:
        lifecycle.report_interrupt(out, step, log)
        raise
    finally:
        bar.close()

    # ---- after: the policy first, with an emergency checkpoint (every trained role) if it cannot be written
    state["kl_ctl"] = kl_ctl.state_dict()
    adapter_dir = lifecycle.save_final_adapter(_PolicySaver(base), out, log=log,
                                               emergency=lambda root: save(root, 0))
    dist.on_main(lambda: base.save(out / "roles", roles=roles), f"writing {out / 'roles'}")
    after = _evaluate(base, tokenizer, cfg, data, scorer, log, "after")
    metrics.write({"step": step, "event": "after", **_flat(after)})
    before = state["before"]
    hist = state["history"]
    k = max(1, len(hist) // 4)
    summary = {
        "task": data["task"],
        "model": str(model_path),
        "device": str(device),
        "advantage": cfg.advantage,
        "critic": cfg.critic if cfg.advantage == "gae" else None,
        "share_prefix": bool(cfg.patch and cfg.share_prefix),
        # positions the decoder layers ran / real tokens, over scoring and updates (this rank)
        "tokens_run_fraction": prefix_meter.total_fraction,
        "reward": reward_desc,
        "reference": f"frozen SFT adapter {sft_adapter}" if sft_adapter else "base model (adapters off)",
        "steps": step,
        "stopped_early": stopped_early,
        "episodes": state["episodes"],
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "test_reward_before": before.get("reward"),
        "test_reward_after": after.get("reward"),
        "general_qa_after": after.get("general_qa"),
        "rollout_score_first": sum(h["score"] for h in hist[:k]) / k if hist else None,
        "rollout_score_last": sum(h["score"] for h in hist[-k:]) / k if hist else None,
        "kl_last": sum(h["kl"] for h in hist[-k:]) / k if hist else None,
        "kl_max": max((h["kl"] for h in hist), default=None),
        "train_seconds": state["seconds"],
        "train_cpu_seconds": state["cpu_seconds"],
        "rollout_tokens": state["tokens"],
        "eval_seconds_before": before.get("seconds"),
        "eval_seconds_after": after.get("seconds"),
        "total_seconds": time.perf_counter() - t_start,
        "total_cpu_seconds": time.process_time() - cpu_start,
        "adapter": str(adapter_dir),
        "world_size": world,
    }
    if not main:
        return summary
    if after.get("details") is not None:
        ckpt.write_json_atomic(out / "test_outputs.json", after["details"])
    ckpt.write_json_atomic(out / "summary.json", summary)
    try:
        plot_curves(metrics_path, out / "curves.png")
    except Exception as e:  # a plot must never lose a finished run
        log(f"could not draw the curves: {e}")
    lifecycle.finish(out, log=log)
    print_summary(summary)
    return summary


def check_same_base_adapter(adapter: Path, model_path: Path) -> None:
    """An SFT adapter made on another base is refused (shapes would not even fit)."""
    import json

    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded or Path(recorded) == Path(model_path) or Path(recorded).name == Path(model_path).name:
        return
    raise ValueError(f"SFT adapter {str(adapter)!r} was trained on base {recorded!r}, not on {str(model_path)!r}")


def rl_kl_controller(cfg: PPOConfig):
    from fastlora import rl

    if cfg.kl_target is not None:
        return rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return rl.FixedKLController(cfg.kl_coef)


def _prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    from .data import batch_order

    return batch_order(n, n, seed=seed, epoch=epoch)[0]


def _kept_rows(ok: torch.Tensor, per: int) -> list[int]:
    """Rows kept after failed rewards; with groups (GRPO), a failed sample drops its group."""
    if per == 1:
        return ok.nonzero().flatten().tolist()
    g = ok.reshape(-1, per).all(1)
    return [i for gi in g.nonzero().flatten().tolist() for i in range(gi * per, gi * per + per)]


def _save_policy(base, tmp: Path) -> None:
    """The final policy in PEFT's own format (loads with PeftModel.from_pretrained on the base)."""
    from fastlora.rl.base import save_adapter_dir

    save_adapter_dir(base.model, base.roles["policy"].adapter, tmp)


def _evaluate(base, tokenizer, cfg: PPOConfig, data: dict, scorer: Scorer, log, when: str) -> dict:
    from . import evaluate as ev

    items = data["test"]
    if not items:
        return {}
    t0 = time.perf_counter()
    mine = dist.shard(items)  # under torchrun each rank answers and scores its share
    with base.activate("policy") as model:
        local = ev.task_accuracy(model, tokenizer, mine, parse=data["parse"], max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.eval_batch_size)[1] if mine else []
        # general QA: for the summary, which the main rank writes
        general = ev.general_ability(model, tokenizer, batch_size=cfg.eval_batch_size) if (
            when == "after" and cfg.measure_forgetting and dist.is_main()) else None
    scores = _test_scores(scorer, base, tokenizer, cfg, mine, local)
    total, n = dist.all_sum([sum(scores), len(scores)])
    details = dist.gather_in_order(local, len(items))
    acc = sum(d["correct"] for d in details) / len(details)
    reward = total / n if n else None
    res = {"accuracy": acc, "reward": reward, "seconds": time.perf_counter() - t0, "details": details}
    if general is not None:
        res["general_qa"] = general["qa_accuracy"]
    log(f"test {when}: accuracy {acc:.1%}" + (f", mean reward {reward:.3f}" if reward is not None else "")
        + f" ({len(items)} examples, greedy)")
    return res


def _flat(d: dict) -> dict:
    return {k: d[k] for k in ("accuracy", "reward", "general_qa", "seconds") if d.get(k) is not None}


# ------------------------------------------------------------------------ reporting
def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Score, KL, entropy and clip fractions per step, from metrics.jsonl, to a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ckpt.read_jsonl(metrics_path) if "event" not in r]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    panels = [("score", "mean score", ["score", "reward"]), ("kl", "KL (per response)", ["kl", "approx_kl"]),
              ("entropy", "entropy (per token)", ["entropy"]), ("clip", "clip fractions", ["clip_frac", "vf_clip_frac"])]
    for ax, (_, title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.suptitle("fastlora ppo")
    fig.tight_layout()
    return ckpt.write_png_atomic(fig, png_path, dpi=100)


_SUMMARY_ROWS = (
    ("accuracy_before", "test accuracy before", "{:.1%}"),
    ("accuracy_after", "test accuracy after", "{:.1%}"),
    ("test_reward_before", "test reward before (greedy)", "{:.3f}"),
    ("test_reward_after", "test reward after (greedy)", "{:.3f}"),
    ("rollout_score_first", "rollout score, first quarter", "{:.3f}"),
    ("rollout_score_last", "rollout score, last quarter", "{:.3f}"),
    ("kl_last", "KL, last quarter", "{:.4f}"),
    ("kl_max", "KL, max", "{:.4f}"),
    ("steps", "steps", "{}"),
    ("episodes", "episodes", "{}"),
    ("train_seconds", "train time (s)", "{:.1f}"),
    ("train_cpu_seconds", "train CPU time of this process (s)", "{:.1f}"),
    ("total_seconds", "whole run (s)", "{:.1f}"),
    ("total_cpu_seconds", "whole run, CPU time of this process (s)", "{:.1f}"),
    ("adapter", "policy adapter", "{}"),
)


def print_summary(summary: dict) -> None:
    from .sft import print_summary as _print

    _print(summary, _SUMMARY_ROWS, title="fastlora ppo")
