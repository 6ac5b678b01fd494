"""Before/after figures of issue 12, measured side by side in one process (interleaved).

1. ``eval``: the default SFT run's test-set evaluation (healthcare test split, greedy,
   ``max_new_tokens`` 12, batch 32) on the default model as ``fastlora sft`` loads it
   (SmolLM2-135M-Instruct, NF4 + double quant, fp32 compute, LoRA r=16 all-linear,
   patched). "before" is what the run did until now: transformers' ``generate`` on the
   patched model, whose LoRA layers dequantize every weight at every step (the CPU GEMV
   branch switched off); "after" is ``fastlora.generate``. Same prompts, same batches;
   the generated texts must be identical.
2. ``decode``: new tokens per second, ``fastlora.generate`` (patched model) against
   transformers' ``generate`` on the unpatched bitsandbytes 4-bit model, a fixed batch,
   every row forced to make the same number of tokens.

    python scripts/measure_generation.py [--rounds 3] [--threads 2] [--what eval decode]

Prints one JSON line per measurement and a summary; timings are wall seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def load(patch: bool, lora_seed: int = 0):
    from fastlora.train.config import SFTConfig
    from fastlora.train.model import add_lora, apply_patch, default_model_dir, load_base, load_tokenizer

    cfg = SFTConfig()
    path = default_model_dir()
    tok = load_tokenizer(path)
    base = load_base(path, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    model = add_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=cfg.target_modules)
    # a trained-looking adapter (PEFT initializes B to 0, which would hide the LoRA term)
    g = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.002)
    if patch:
        apply_patch(model, True)
    return model, tok, cfg


def hf_texts(model, tok, prompts, max_new_tokens, batch_size):
    """The evaluation as it was: transformers' generate, left-padded batches by length."""
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(tok(prompts[i], add_special_tokens=False)["input_ids"]))
    tok.padding_side = "left"
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
            for i, ids in zip(idx, gen[:, enc["input_ids"].shape[1]:]):
                out[i] = tok.decode(ids, skip_special_tokens=True)
    return out


def fl_texts(model, tok, prompts, max_new_tokens, batch_size):
    import fastlora

    return fastlora.generate(model, prompts, tokenizer=tok, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             add_special_tokens=False, stop_token_ids=[tok.eos_token_id]).texts


def measure_eval(rounds: int) -> dict:
    from fastlora.ops import nf4_gemv
    from fastlora.train.defaults.healthcare import parse_answer
    from fastlora.train.evaluate import task_items
    from fastlora.train.sft import SFTConfig, load_data

    model, tok, cfg = load(patch=True)
    data = load_data(SFTConfig().resolved())
    items = task_items(data["test"], tok, data["format"])
    prompts = [it.prompt for it in items]
    applies = nf4_gemv.applies
    times = {"before": [], "after": []}
    outs = {}
    for r in range(rounds):
        for name in ("before", "after"):
            if name == "before":
                nf4_gemv.applies = lambda *a, **k: False  # the pre-issue path: dequantize every call
            t = time.perf_counter()
            texts = (hf_texts if name == "before" else fl_texts)(model, tok, prompts, cfg.max_new_tokens,
                                                                  cfg.eval_batch_size)
            times[name].append(time.perf_counter() - t)
            nf4_gemv.applies = applies
            outs.setdefault(name, texts)
            assert texts == outs[name], f"{name}: outputs changed between rounds"
            print(json.dumps({"what": "eval", "round": r, "impl": name, "seconds": round(times[name][-1], 2)}),
                  flush=True)
    same = outs["before"] == outs["after"]
    acc = {k: sum(parse_answer(o) == it.label for o, it in zip(v, items)) / len(items) for k, v in outs.items()}
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    return {"what": "eval", "examples": len(items), "batch": cfg.eval_batch_size, "max_new_tokens": cfg.max_new_tokens,
            "before_s_median": statistics.median(times["before"]), "after_s_median": statistics.median(times["after"]),
            "speedup_median": statistics.median(ratios), "identical_outputs": same,
            "differing": sum(a != b for a, b in zip(outs["before"], outs["after"])), "accuracy": acc}


def measure_decode(rounds: int, batch: int = 8, new: int = 32) -> dict:
    import fastlora
    from fastlora.train.defaults.healthcare import SYSTEM_PROMPT

    ref, tok, _ = load(patch=False)
    pat, _, _ = load(patch=True)
    msgs = ["I have had a fever for three days", "Why was I charged twice for my visit?",
            "Can I book a check-up next Tuesday?", "my knee is swollen since yesterday",
            "please cancel my appointment on friday", "question about my invoice from march",
            "my son has a rash on his arm", "do you have openings on monday morning?"]
    prompts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": m}],
                                       tokenize=False, add_generation_prompt=True) for m in msgs[:batch]]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    times = {"transformers": [], "fastlora": []}
    toks = {}
    for r in range(rounds):
        for name in ("transformers", "fastlora"):
            t = time.perf_counter()
            if name == "transformers":
                with torch.no_grad():
                    ref.eval()
                    out = ref.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
                seqs = out[:, enc["input_ids"].shape[1]:].tolist()
            else:
                res = fastlora.generate(pat, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                        max_new_tokens=new, stop_token_ids=[])
                seqs = [s.tolist() for s in res.sequences]
            dt = time.perf_counter() - t
            times[name].append(dt)
            toks[name] = seqs
            print(json.dumps({"what": "decode", "round": r, "impl": name, "seconds": round(dt, 3),
                              "tokens_per_s": round(batch * new / dt, 1)}), flush=True)
    agree = sum(a == b for x, y in zip(toks["transformers"], toks["fastlora"]) for a, b in zip(x, y)) / (batch * new)
    ratios = [a / b for a, b in zip(times["transformers"], times["fastlora"])]
    return {"what": "decode", "batch": batch, "new_tokens": new,
            "transformers_tok_s_median": batch * new / statistics.median(times["transformers"]),
            "fastlora_tok_s_median": batch * new / statistics.median(times["fastlora"]),
            "speedup_median": statistics.median(ratios), "greedy_token_agreement": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--what", nargs="+", default=["eval", "decode"], choices=["eval", "decode"])
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for w in args.what:
        res = measure_eval(args.rounds) if w == "eval" else measure_decode(args.rounds, batch=args.batch)
        res.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=args.threads)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
