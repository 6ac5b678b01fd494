"""Before/after figures of issue 12, measured side by side in one process (interleaved).

1. ``eval``: the default SFT run's whole evaluation (what it runs before and after
   training) on the default model as ``fastlora sft`` loads it (SmolLM2-135M-Instruct,
   NF4 + double quant, fp32 compute, LoRA r=16 all-linear, patched), with the adapter of
   ``--adapter`` (e.g. ``runs/sft/adapter``: a trained one, as after training) or a random
   one (as before training: answers that are not the labels). "before" is the evaluation
   as it was before issue 12: test accuracy and the general-QA answers by transformers'
   ``generate`` on the patched model (the CPU GEMV switched off), then perplexity.
   "after" is the evaluation now: the test answers AND the label-restricted accuracy in
   one pass (``evaluate.classify``), the general-QA answers by ``fastlora.generate``, the
   perplexity. Same prompts, same batches; the generated texts must be identical.
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


def measure_eval(rounds: int, limit: int = 0, adapter: str | None = None) -> dict:
    from fastlora.ops import nf4_gemv
    from fastlora.patch import lora as patch_lora
    from fastlora.train import evaluate as ev
    from fastlora.train.sft import SFTConfig, load_data

    if adapter:
        from peft import PeftModel

        from fastlora.train.model import apply_patch, default_model_dir, load_base, load_tokenizer

        path = default_model_dir()
        tok = load_tokenizer(path)
        base = load_base(path, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
        model = PeftModel.from_pretrained(base, adapter)
        apply_patch(model, True)
        cfg = SFTConfig()
    else:
        model, tok, cfg = load(patch=True)
    cfg = cfg.resolved()
    data = load_data(cfg)
    items = ev.task_items(data["test"][:limit] if limit else data["test"], tok, data["format"])
    parse = data["parse"]
    bs, new = cfg.eval_batch_size, cfg.max_new_tokens

    def old():  # issue 12's "now": transformers' generate, the GEMV off
        applies, decode = nf4_gemv.applies, patch_lora._cpu_decode
        nf4_gemv.applies = lambda *a, **k: False
        patch_lora._cpu_decode = lambda *a, **k: None
        gen = ev.generate
        ev.generate = lambda m, t, p, max_new_tokens=12, batch_size=16, special_tokens=False: ev._hf_generate(
            m, t, p, max_new_tokens=max_new_tokens, batch_size=batch_size, special_tokens=special_tokens)
        try:
            t0 = time.perf_counter()
            acc, det = ev.task_accuracy(model, tok, items, parse=parse, max_new_tokens=new, batch_size=bs)
            t1 = time.perf_counter()
            gen_qa = ev.general_ability(model, tok, batch_size=bs)
            t2 = time.perf_counter()
        finally:
            nf4_gemv.applies, patch_lora._cpu_decode, ev.generate = applies, decode, gen
        return {"accuracy": acc, "texts": [d["output"] for d in det], "qa": [q["output"] for q in gen_qa["qa_outputs"]],
                "restricted": None, "seconds": {"test": t1 - t0, "general": t2 - t1}}

    def new_():
        t0 = time.perf_counter()
        acc, det, res = ev.classify(model, tok, items, parse=parse, max_new_tokens=new, batch_size=bs)
        t1 = time.perf_counter()
        gen_qa = ev.general_ability(model, tok, batch_size=bs)
        t2 = time.perf_counter()
        return {"accuracy": acc, "texts": [d["output"] for d in det], "qa": [q["output"] for q in gen_qa["qa_outputs"]],
                "restricted": res["accuracy"] if res else None, "seconds": {"test": t1 - t0, "general": t2 - t1}}

    times = {"before": [], "after": []}
    cpu = {"before": [], "after": []}
    outs: dict = {}
    for r in range(rounds):
        for name, fn in (("before", old), ("after", new_)):
            t, c = time.perf_counter(), time.process_time()
            got = fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            if name in outs:
                assert got["texts"] == outs[name]["texts"], f"{name}: outputs changed between rounds"
            outs[name] = got
            print(json.dumps({"what": "eval", "round": r, "impl": name, "seconds": round(times[name][-1], 2),
                              "cpu_seconds": round(cpu[name][-1], 2),
                              "parts": {k: round(v, 2) for k, v in got["seconds"].items()}}), flush=True)
    b, a = outs["before"], outs["after"]
    ratios = [x / y for x, y in zip(times["before"], times["after"])]
    return {"what": "eval", "examples": len(items), "general_qa": len(a["qa"]), "batch": bs, "max_new_tokens": new,
            "adapter": adapter or "random (B ~ N(0, 0.002^2))",
            "before_s_median": statistics.median(times["before"]), "after_s_median": statistics.median(times["after"]),
            "speedup_median": statistics.median(ratios),
            "before_cpu_s_median": statistics.median(cpu["before"]), "after_cpu_s_median": statistics.median(cpu["after"]),
            "cpu_speedup_median": statistics.median([x / y for x, y in zip(cpu["before"], cpu["after"])]),
            "identical_test_answers": b["texts"] == a["texts"],
            "differing_test_answers": sum(x != y for x, y in zip(b["texts"], a["texts"])),
            "identical_general_answers": b["qa"] == a["qa"],
            "accuracy": {"before": b["accuracy"], "after": a["accuracy"]},
            "restricted_accuracy_after_only": a["restricted"],
            "parts_s_last_round": {"before": b["seconds"], "after": a["seconds"]}}


def measure_decode(rounds: int, batch: int = 8, new: int = 32) -> dict:
    """Decode tokens/s: each implementation makes 1 and then ``new`` tokens for the same
    batch; the decode rate is ``batch * (new - 1) / (t_new - t_1)`` (the prefill cancels)."""
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

    def run(name, n):
        t, c = time.perf_counter(), time.process_time()
        if name == "transformers":
            with torch.no_grad():
                ref.eval()
                out = ref.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            seqs = out[:, enc["input_ids"].shape[1]:].tolist()
        else:
            res = fastlora.generate(pat, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    max_new_tokens=n, stop_token_ids=[])
            seqs = [s.tolist() for s in res.sequences]
        return time.perf_counter() - t, time.process_time() - c, seqs

    rate = {"transformers": [], "fastlora": []}
    cpu_rate = {"transformers": [], "fastlora": []}
    toks = {}
    for r in range(rounds):
        for name in ("transformers", "fastlora"):
            w1, c1, _ = run(name, 1)
            wn, cn, seqs = run(name, new)
            toks[name] = seqs
            rate[name].append(batch * (new - 1) / (wn - w1))
            cpu_rate[name].append(batch * (new - 1) / (cn - c1))
            print(json.dumps({"what": "decode", "round": r, "impl": name, "decode_tokens_per_s": round(rate[name][-1], 1),
                              "decode_tokens_per_cpu_s": round(cpu_rate[name][-1], 1),
                              "end_to_end_s": round(wn, 2)}), flush=True)
    # transformers' min_new_tokens bans eos, fastlora.generate (no stop token) may pick it:
    # compare each row up to fastlora's first eos
    eos = tok.eos_token_id
    pairs = [(a, b) for x, y in zip(toks["transformers"], toks["fastlora"])
             for a, b in zip(x, y[: y.index(eos) if eos in y else len(y)])]
    agree = sum(a == b for a, b in pairs) / max(1, len(pairs))
    ratios = [f / t for f, t in zip(rate["fastlora"], rate["transformers"])]
    cpu_ratios = [f / t for f, t in zip(cpu_rate["fastlora"], cpu_rate["transformers"])]
    return {"what": "decode", "batch": batch, "new_tokens": new,
            "transformers_decode_tok_s_median": statistics.median(rate["transformers"]),
            "fastlora_decode_tok_s_median": statistics.median(rate["fastlora"]),
            "speedup_median": statistics.median(ratios), "cpu_speedup_median": statistics.median(cpu_ratios),
            "greedy_token_agreement": agree, "tokens_compared": len(pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--what", nargs="+", default=["eval", "decode"], choices=["eval", "decode"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--limit", type=int, default=0, help="eval: first N test examples only (0 = all)")
    ap.add_argument("--adapter", default=None, help="eval: a trained adapter dir (default: a random one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for w in args.what:
        res = measure_eval(args.rounds, args.limit, args.adapter) if w == "eval" else measure_decode(args.rounds, batch=args.batch)
        res.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=args.threads)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
