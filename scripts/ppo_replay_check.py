"""PPO on N processes against ONE process on the same rollouts, on a real model.

Sampled rollouts cannot be compared: under torchrun each rank samples its own prompts with
its own random stream (rank 0 draws what one process would for its rows; the others draw
other numbers), so 2 ranks x b and 1 process x 2b train on different samples. What must be
equal is everything after the sampling. This script records every rank's rollouts and
replays them in one process:

    torchrun --nproc_per_node 2 scripts/ppo_replay_check.py record DIR [fastlora ppo options]
    python scripts/ppo_replay_check.py replay DIR [the same options, --batch-size and
                                                   --mini-batch-size x 2]
    python scripts/ppo_replay_check.py compare DIR

``record`` runs ``fastlora ppo`` (output ``DIR/ranks``) with the rollout function wrapped
to save each rank's rollout of every step (``DIR/rollouts``, safetensors + JSON).
``replay`` runs it in one process (output ``DIR/one``) with a rollout function that returns
the ranks' rollouts of the step joined in rank order, after checking that the prompts the
trainer asked for are exactly theirs (the global prompt order and its split). ``compare``
prints, per step, the largest relative difference of every logged loss and statistic, and
the largest difference of the policy adapters; it exits 1 above 1e-5 (relative, or absolute
for values below 1; not vf_clip_frac, which counts rounding ties).
Without options the runs are the embedded default (``fastlora ppo``'s).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMING = ("episodes_per_second", "rollout_tokens_per_second", "step_seconds", "generate_seconds", "seconds")
# counts tokens where old + (v - old) rounds above v (rl.value_loss): a coin flip of rounding
ROUNDING_COUNTS = ("vf_clip_frac",)


def _rows(ro):
    """Per row: prompt ids (without the left padding), response tokens and their old log-probs."""
    n = ro.mask.sum(1).long().tolist()
    prompts = [ro.input_ids[i, :ro.P][ro.attention_mask[i, :ro.P] != 0].tolist() for i in range(len(n))]
    return prompts, [ro.tokens[i, :k] for i, k in enumerate(n)], [ro.old_logp[i, :k] for i, k in enumerate(n)]


def record(out: Path, options: list[str]) -> int:
    import torch
    from safetensors.torch import save_file

    import fastlora.train.ppo as ppo_mod
    from fastlora.cli import main
    from fastlora.train import distributed as dist
    from fastlora.train.checkpoint import write_json_atomic

    real = ppo_mod.make_rollout

    def recording(base, tokenizer, cfg, items, step, temperature=None):
        ro, rst = real(base, tokenizer, cfg, items, step, temperature)
        d = out / "rollouts"
        d.mkdir(parents=True, exist_ok=True)
        name = f"step{step:04d}-rank{dist.rank()}"
        prompts, seqs, old = _rows(ro)
        save_file({f"tokens.{i}": s.contiguous() for i, s in enumerate(seqs)}
                  | {f"old.{i}": o.contiguous() for i, o in enumerate(old)}
                  | {"truncated": ro.truncated.to(torch.uint8)}, str(d / f"{name}.safetensors"))
        write_json_atomic(d / f"{name}.json", {"prompt_ids": prompts, "prompts": ro.prompts, "texts": ro.texts,
                                               "columns": ro.columns, "chat": ro.chat, "rst": rst})
        return ro, rst

    ppo_mod.make_rollout = recording
    return main(["ppo", "--output-dir", str(out / "ranks"), *options])


def replay(out: Path, options: list[str]) -> int:
    import torch
    from safetensors.torch import load_file

    import fastlora.train.ppo as ppo_mod
    from fastlora.cli import main

    def replaying(base, tokenizer, cfg, items, step, temperature=None):
        if temperature is not None:
            raise ValueError("replay: only sampled rollouts were recorded (no --score-baseline greedy)")
        files = sorted((out / "rollouts").glob(f"step{step:04d}-rank*.json"), key=lambda p: int(p.stem.split("rank")[1]))
        if not files:
            raise FileNotFoundError(f"replay: no recorded rollout of step {step} in {out / 'rollouts'}")
        prompt_ids, seqs, old, texts, prompts, chat, truncated, columns = [], [], [], [], [], [], [], {}
        for f in files:
            meta = json.loads(f.read_text())
            t = load_file(str(f.with_suffix(".safetensors")))
            n = len(meta["prompts"])
            prompt_ids += meta["prompt_ids"]
            seqs += [t[f"tokens.{i}"] for i in range(n)]
            old += [t[f"old.{i}"] for i in range(n)]
            texts += meta["texts"]
            prompts += meta["prompts"]
            chat += meta["chat"] or [False] * n
            truncated += t["truncated"].bool().tolist()
            for k, v in meta["columns"].items():
                columns.setdefault(k, []).extend(v)
        asked = [it.prompt for it in items]
        if asked != prompts:
            raise ValueError(f"replay: step {step} asks for other prompts than the ranks rolled out "
                             f"({sum(a != b for a, b in zip(asked, prompts))} differ of {len(asked)}, "
                             f"{len(asked)} vs {len(prompts)})")
        ids, attn, P, tokens, mask, old_logp = ppo_mod.build_rollout(prompt_ids, seqs, old, tokenizer.pad_token_id)
        ro = ppo_mod.Rollout(ids, attn, P, tokens, mask, old_logp, prompts, texts, torch.tensor(truncated), columns,
                             chat)
        n_tok = int(mask.sum())
        return ro, {"generate_seconds": 0.0, "rollout_tokens": n_tok, "rollout_tokens_per_second": None,
                    "prompts_truncated": 0}

    ppo_mod.make_rollout = replaying
    return main(["ppo", "--output-dir", str(out / "one"), *options])


def compare(out: Path, tol: float = 1e-5) -> int:
    from safetensors.torch import load_file

    def steps(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "event" not in r}

    a, b = steps(out / "ranks"), steps(out / "one")
    worst = 0.0
    for s in sorted(b):
        diffs = {}
        for k, v in b[s].items():
            if k in TIMING or k in ROUNDING_COUNTS or not isinstance(v, float) or k not in a[s]:
                continue
            # relative to the value, or to 1 for values near 0 (differences of O(1) numbers)
            diffs[k] = abs(a[s][k] - v) / max(abs(v), 1.0)
        k_max = max(diffs, key=diffs.get)
        worst = max(worst, diffs[k_max])
        print(f"step {s}: {len(diffs)} statistics, largest difference {diffs[k_max]:.2e} ({k_max}: "
              f"{a[s][k_max]!r} on the ranks, {b[s][k_max]!r} in one process); "
              f"policy_loss {a[s].get('policy_loss')!r} vs {b[s].get('policy_loss')!r}")
    wa, wb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out / "ranks", out / "one"))
    adapter = max(float((wa[k] - wb[k]).abs().max()) for k in wb)
    print(f"policy adapters: largest difference {adapter:.2e} over {len(wb)} tensors")
    ok = worst <= tol and adapter <= tol
    print("OK" if ok else "DIFFERENT", f"(tolerance {tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("record", "replay", "compare"):
        print(__doc__)
        sys.exit(2)
    mode, directory, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    sys.exit({"record": record, "replay": replay}[mode](directory, rest) if mode != "compare" else compare(directory))
