"""Time the default SFT run's two evaluations, as the checked-out fastlora runs them.

Issue 12's bar compares the default run's evaluation time with what it was when the
issue was filed, at the same outputs. Training twice would train two different
adapters, so this script runs only the evaluations, on one fixed adapter, with whichever
fastlora is on ``PYTHONPATH``, and writes the timings and every generated answer to a
JSON file. Run it with the old tree and with the new one, interleaved, then compare:

    git worktree add /tmp/old 1c460ce   # main when issue 12 was filed; build its _C
    for r in 1 2 3; do
      PYTHONPATH=/tmp/old python scripts/sft_eval_phases.py --adapter runs/sft/adapter --out old$r.json
      PYTHONPATH=.        python scripts/sft_eval_phases.py --adapter runs/sft/adapter --out new$r.json
    done
    python scripts/sft_eval_phases.py --compare old*.json -- new*.json

- ``before``: what the run evaluates before training, on a fresh LoRA adapter (PEFT
  initializes B = 0, so it is the base model): test accuracy, general QA, perplexity.
- ``after``: what it evaluates after training, on ``--adapter``: the eval loss, test
  accuracy, general QA, perplexity.

The evaluation calls are the tree's own sft helpers, in the order its ``sft()`` runs
them, so the figure is the run's. Newer trees also compute the label-restricted accuracy
in the same phase; it is reported, and its cost is inside their time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _load(adapter: str | None):
    from fastlora.train import model as fm
    from fastlora.train.config import SFTConfig

    cfg = SFTConfig()
    cfg = cfg.resolved() if hasattr(cfg, "resolved") else cfg
    path = fm.default_model_dir()
    tok = fm.load_tokenizer(path)
    base = fm.load_base(path, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, adapter)
    else:
        model = fm.add_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target_modules=cfg.target_modules)
    fm.apply_patch(model, True)
    return model, tok, cfg


def _phase(model, tok, cfg, with_loss: bool) -> dict:
    import importlib

    from fastlora.train import evaluate as ev
    from fastlora.train.data import prepare

    S = importlib.import_module("fastlora.train.sft")  # the module (the package exports the function)

    data = S.load_data(cfg)
    items = ev.task_items(S._limit(data["test"], cfg.test_max_examples), tok, data["format"])
    eval_ex = []
    if with_loss and data["eval"]:
        eval_ex, _ = prepare(S._limit(data["eval"], cfg.eval_max_examples), tok, fmt=data["format"],
                             max_length=cfg.max_length)
    out: dict = {}
    t0 = time.perf_counter()
    if eval_ex:
        if "sharded" in S._evaluate.__code__.co_varnames:
            rec = S._evaluate(model, tok, eval_ex, [], None, cfg, "loss", 0, False)
        else:
            rec = S._evaluate(model, tok, eval_ex, [], None, cfg, "loss", 0)
        out["eval_loss"] = rec["loss"]
    t1 = time.perf_counter()
    if hasattr(S, "_test_eval"):
        acc, details, restricted = S._test_eval(model, tok, items, data["parse"], cfg, lambda *a, **k: None, "x",
                                                False)
        out["restricted"] = restricted
    else:
        acc, details = ev.task_accuracy(model, tok, items, parse=data["parse"], max_new_tokens=cfg.max_new_tokens,
                                        batch_size=cfg.eval_batch_size)
    t2 = time.perf_counter()
    gen = S._general(model, tok, cfg)
    t3 = time.perf_counter()
    out.update(accuracy=acc, test_outputs=[d["output"] for d in details],
               general_outputs=[q["output"] for q in gen["qa_outputs"]], qa_accuracy=gen["qa_accuracy"],
               perplexity=gen["perplexity"],
               seconds={"total": t3 - t0, "eval_loss": t1 - t0, "test": t2 - t1, "general": t3 - t2})
    return out


def run(args) -> None:
    import fastlora

    torch.set_num_threads(args.threads)
    res = {"fastlora": fastlora.__file__, "threads": args.threads, "adapter": args.adapter,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    model, tok, cfg = _load(None)
    res["before"] = _phase(model, tok, cfg, with_loss=False)
    del model
    model, tok, cfg = _load(args.adapter)
    res["after"] = _phase(model, tok, cfg, with_loss=True)
    with open(args.out, "w") as f:
        json.dump(res, f)
    print(json.dumps({w: res[w]["seconds"] for w in ("before", "after")}))


def compare(old_files: list[str], new_files: list[str]) -> None:
    old = [json.load(open(f)) for f in old_files]
    new = [json.load(open(f)) for f in new_files]
    summary = {}
    for w in ("before", "after"):
        o = [r[w]["seconds"]["total"] for r in old]
        n = [r[w]["seconds"]["total"] for r in new]
        a, b = old[-1][w], new[-1][w]
        summary[w] = {
            "old_s": [round(x, 1) for x in o], "new_s": [round(x, 1) for x in n],
            "old_median_s": round(statistics.median(o), 2), "new_median_s": round(statistics.median(n), 2),
            "speedup_median": round(statistics.median(o) / statistics.median(n), 2),
            "old_parts_s": {k: round(v, 1) for k, v in a["seconds"].items()},
            "new_parts_s": {k: round(v, 1) for k, v in b["seconds"].items()},
            "accuracy": [a["accuracy"], b["accuracy"]],
            "identical_test_outputs": a["test_outputs"] == b["test_outputs"],
            "differing_test_outputs": sum(x != y for x, y in zip(a["test_outputs"], b["test_outputs"])),
            "identical_general_outputs": a["general_outputs"] == b["general_outputs"],
            "eval_loss": [a.get("eval_loss"), b.get("eval_loss")],
            "perplexity": [a["perplexity"], b["perplexity"]],
        }
    print(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", help="the trained adapter evaluated 'after' (e.g. runs/sft/adapter)")
    ap.add_argument("--out", help="the JSON file to write")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", nargs="+", metavar="OLD.json [-- NEW.json ...]",
                    help="compare the files before '--' (old) with those after it (new)")
    args, rest = ap.parse_known_args()
    if args.compare:
        files = args.compare + rest
        if "--" not in files:
            sys.exit("--compare OLD.json ... -- NEW.json ...")
        k = files.index("--")
        compare(files[:k], files[k + 1:])
        return
    if not args.adapter or not args.out:
        sys.exit("--adapter and --out are required")
    run(args)


if __name__ == "__main__":
    main()
