"""One rank of the distributed trainer tests, started by ``torchrun`` from
tests/train/test_distributed.py: ``python -m torch.distributed.run --standalone
--nproc_per_node 2 -m tests.train.dist_worker SPEC.json``.

SPEC is a list of scenarios run in order in the same process group:

* ``{"cfg": {...}}``: ``fastlora.train.sft`` with these SFTConfig options;
  ``{"trainer": "rm", "cfg": {...}}``: ``fastlora.train.reward`` (RewardConfig);
  ``{"trainer": "ppo", "cfg": {...}, "fixed_rollouts": true}``: ``fastlora.train.ppo``
  (PPOConfig), with :func:`fixed_rollout` in place of the sampled rollouts when asked;
* ``{"cfg": {...}, "die_at": k, "die_rank": r}``: the same, but rank r dies (``os._exit``,
  no cleanup, as a killed process) after optimizer step k; torchrun then ends the others;
  ``"stop_at": k`` instead: every rank raises KeyboardInterrupt after step k (Ctrl-C: the
  run ends with its last checkpoint) and the next scenario runs;
* ``{"step": dir, "out": file}``: one forward/backward of :func:`qlora_step` on the tiny
  untied Llama in ``dir``, sharded with FSDP2 (lm_head its own unit); rank 0 saves the loss
  and the gathered LoRA gradients to ``out``;
* ``{"moments": file}``: ``distributed.global_mean_var`` of :func:`moments_data`, rank 0
  holding its first 4 rows and rank 1 the other 3 (unequal shares); rank 0 saves the result;
* ``{"rlhf": dir, "small": {"sft": {...}, "rm": {...}, "ppo": {...}}}``: ``fastlora.train.rlhf``
  into ``dir``, each stage's config (the embedded defaults) overridden with these options;
* ``{"cli": [...], "cli_rank": {"1": [...]}}``: ``fastlora.cli.main`` with these
  arguments (rank 1 may get others, e.g. a bad data file); the process exits with its code.
"""
from __future__ import annotations

import json
import os
import sys


def qlora_step(model_dir: str, *, fsdp: bool) -> dict:
    """Loss and LoRA gradients of one patched QLoRA forward/backward on ``tiny.batch``.
    With ``fsdp`` each rank takes half of the batch's rows (the loss is normalized by the
    global token count as the trainer does) and the model is sharded by
    ``distributed.wrap_fsdp``; the gradients come back whole."""
    import torch

    import fastlora
    from fastlora.train import distributed
    from fastlora.train.model import load_base
    from tests.patch import tiny

    base = load_base(model_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"),
                     quant_storage=torch.float32 if fsdp else torch.uint8)
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(base, tiny.lora_config())
    fastlora.patch(model)
    b = tiny.batch(0, B=4, T=12)
    n_total = int((b["labels"][:, 1:] != -100).sum())
    if fsdp:
        distributed.wrap_fsdp(model)
        r = distributed.rank()
        b = {k: v[2 * r:2 * r + 2] for k, v in b.items()}
    model.train()
    out = model(**b, use_cache=False, num_items_in_batch=n_total)
    (out.loss * distributed.world_size()).backward()
    loss = distributed.all_sum([float(out.loss.detach())])[0]
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return {"loss": loss, "grads": grads}


def fixed_rollout(base, tokenizer, cfg, items, step, temperature=None):
    """A stand-in for ``ppo.make_rollout`` whose responses depend on the prompt, the sample's
    place in its group and the step only, never on the batch or the rank: 2 ranks x b
    prompts and 1 process x 2b then train on the same rollouts (sampled ones differ, since
    each rank draws its own stream). 1 to max_new_tokens tokens from a hash, ended by the
    eos token when the hash says so (else truncated); the old log-probs are the policy's
    own, in eval mode without grad, as the decode gives them."""
    import zlib

    import torch

    from fastlora.train.ppo import Rollout, build_rollout, response_logprobs

    seqs, truncated, member = [], [], 0
    for i, it in enumerate(items):
        member = member + 1 if i and items[i - 1] is it else 0  # a GRPO group repeats one prompt object
        h = zlib.crc32(f"{it.prompt}|{step}|{member}|{temperature}".encode())
        n = 1 + h % cfg.max_new_tokens
        toks = [3 + (h >> (3 * j + 4)) % (len(tokenizer) - 3) for j in range(n)]
        stopped = n < cfg.max_new_tokens or (h >> 30) & 1
        if stopped:
            toks[-1] = tokenizer.eos_token_id
        seqs.append(torch.tensor(toks))
        truncated.append(not stopped)
    prompt_ids = [list(tokenizer(it.prompt, add_special_tokens=it.special_tokens)["input_ids"]) for it in items]
    ids, attn, P, tokens, mask, old = build_rollout(prompt_ids, seqs, [torch.zeros(len(q)) for q in seqs],
                                                    tokenizer.pad_token_id)
    keys = sorted({k for it in items for k in it.columns})
    ro = Rollout(ids, attn, P, tokens, mask, old, [it.prompt for it in items],
                 [tokenizer.decode(q, skip_special_tokens=True) for q in seqs], torch.tensor(truncated),
                 {k: [it.columns.get(k) for it in items] for k in keys}, [not it.special_tokens for it in items])
    was = base.training
    base.eval()
    try:
        with torch.no_grad():
            ro.old_logp = (response_logprobs(base, "policy", ro) * ro.mask.to(ids.device)).float().cpu()
    finally:
        base.train(was)
    n_tok = int(mask.sum())
    return ro, {"generate_seconds": 0.0, "rollout_tokens": n_tok, "rollout_tokens_per_second": None,
                "prompts_truncated": 0}


def run_trainer(sc: dict, on_step=None):
    """The trainer a scenario names, with its config (and fixed rollouts for PPO if asked)."""
    from fastlora.train import SFTConfig, sft

    kind = sc.get("trainer", "sft")
    if kind == "rm":
        from fastlora.train.reward import RewardConfig, reward

        return reward(RewardConfig(**sc["cfg"]), on_step=on_step)
    if kind == "ppo":
        import fastlora.train.ppo as ppo_mod
        from fastlora.train.ppo_config import PPOConfig

        real = ppo_mod.make_rollout
        if sc.get("fixed_rollouts"):
            ppo_mod.make_rollout = fixed_rollout
        try:
            return ppo_mod.ppo(PPOConfig(**sc["cfg"]), on_step=on_step)
        finally:
            ppo_mod.make_rollout = real
    return sft(SFTConfig(**sc["cfg"]), on_step=on_step)


def run_rlhf(runs_dir: str, small: dict) -> None:
    """``fastlora.train.rlhf`` with every stage's config overridden by ``small[stage]`` (a
    tiny model, few steps): the three trainers are looked up when a stage starts."""
    import dataclasses
    import importlib

    from fastlora.train.rlhf import rlhf

    # the modules (fastlora.train's own attribute `sft` is the function of the same name)
    mods = {k: importlib.import_module(f"fastlora.train.{m}") for k, m in (("sft", "sft"), ("rm", "reward"),
                                                                          ("ppo", "ppo"))}
    real = {"sft": (mods["sft"], "sft"), "rm": (mods["rm"], "reward"), "ppo": (mods["ppo"], "ppo")}
    saved = {k: getattr(mod, name) for k, (mod, name) in real.items()}
    for k, (mod, name) in real.items():
        # dataclasses.replace, not the trainers' **overrides: those round-trip the config through
        # from_dict, which turns target_modules="all-linear" into ["all-linear"] (then refused)
        setattr(mod, name, lambda cfg, _f=saved[k], _o=small[k], **kw: _f(dataclasses.replace(cfg, **_o), **kw))
    try:
        rlhf(runs_dir, progress=False)
    finally:
        for k, (mod, name) in real.items():
            setattr(mod, name, saved[k])


def moments_data():
    """(x, mask): 7 rows of odd length with a ragged mask, values far from 0 (a cancelling
    E[x²] - E[x]² would lose digits)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3 + 100
    mask = torch.rand(7, 5, generator=g) > 0.3
    return x, mask


def main(spec_path: str) -> int:
    import warnings

    import torch

    torch.set_num_threads(1)  # two ranks share the CI's two cores
    scenarios = json.loads(open(spec_path).read())
    rank = int(os.environ["RANK"])
    # fastlora warns once when a patched module falls back to its original forward at run
    # time (e.g. a sharded head it does not recognize): record them per rank after every
    # scenario, the test wants none.
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for sc in scenarios:
            code = _scenario(sc, rank, torch)
            fallbacks = [str(w.message) for w in seen if str(w.message).startswith("fastlora:")]
            with open(f"{spec_path}.fallbacks.{rank}.json", "w") as f:
                json.dump(fallbacks, f)
            if code is not None:
                return code
    from fastlora.train import distributed

    distributed.teardown()
    return 0


def _scenario(sc: dict, rank: int, torch) -> int | None:
    if "cli" in sc:
        from fastlora.cli import main as cli_main

        return cli_main(sc.get("cli_rank", {}).get(str(rank), sc["cli"]))
    from fastlora.train import distributed

    distributed.setup(local_rank=int(os.environ["LOCAL_RANK"]))
    if "moments" in sc:
        x, mask = moments_data()
        rows = slice(0, 4) if rank == 0 else slice(4, 7)
        res = distributed.global_mean_var(x[rows], mask[rows])
        if rank == 0:
            torch.save(res, sc["moments"])
        return None
    if "rlhf" in sc:
        run_rlhf(sc["rlhf"], sc["small"])
        return None
    if "step" in sc:
        res = qlora_step(sc["step"], fsdp=True)
        if rank == 0:
            torch.save(res, sc["out"])
        return None

    def die(step, metrics):
        if step == sc.get("die_at") and rank == sc.get("die_rank"):
            os._exit(9)
        if step == sc.get("stop_at"):
            raise KeyboardInterrupt

    try:
        run_trainer(sc, on_step=die)
    except KeyboardInterrupt:
        if "stop_at" not in sc:
            raise
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
