"""The first minutes on 2 GPUs: every trainer under torchrun (NCCL), DDP and FSDP2 over the
4-bit base, FSDP checkpoints and resume. Meant for scripts/gpu/run_gpu.sh (only when the
host has 2 GPUs); every result goes into the JSON file (rank 0) as soon as it exists, so a
run cut short still returns what it found.

    torchrun --nproc_per_node 2 scripts/gpu/two_gpu.py --out two_gpu.json
    torchrun --nproc_per_node 2 scripts/gpu/two_gpu.py --out two_gpu.json --cpu   # gloo, CI's machine

On a tiny random Llama (2 layers, hidden 256, untied head) with a word-level tokenizer,
both built here (no hub, no download), bf16 compute on the GPU (the trainers' default):

1. the process group: backend, each rank's device;
2. SFT with DDP, then with FSDP2 (quant_storage = bf16): both finish, every patched layer
   ran fused (no fastlora fallback warning), peak memory per rank;
3. FSDP2 SFT stopped after step 3 (checkpoint at step 2, DCP shards) and resumed: the
   adapter equals the uninterrupted run's;
4. the reward model with DDP and FSDP2, PPO (GAE) with DDP: they finish.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

RESULTS: dict = {"checks": [], "errors": []}
WORDS = ["<pad>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + ["say", "the", "letter", "question"]


def save(path: str) -> None:
    from fastlora.train import distributed as dist

    if dist.is_main():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
        os.replace(tmp, path)


def build(d: Path) -> None:
    """The tiny model, its tokenizer, and the data of every trainer (rank 0 writes them)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    letters = [chr(97 + i % 26) for i in range(40)]
    with open(d / "sft.jsonl", "w") as f:
        for c in letters:
            f.write(json.dumps({"prompt": f"question say the letter {c}", "completion": f" {c}"}) + "\n")
    with open(d / "pairs.jsonl", "w") as f:
        for i, c in enumerate(letters):
            f.write(json.dumps({"prompt": f"say the letter {c}", "chosen": c, "rejected": letters[i - 1]}) + "\n")
    with open(d / "prompts.jsonl", "w") as f:
        for c in letters:
            f.write(json.dumps({"prompt": f"question say the letter {c}"}) + "\n")
    (d / "reward.py").write_text("def first(prompts, responses):\n"
                                 "    return [1.0 if r.split()[:1] == [p.split()[-1]] else 0.0 "
                                 "for p, r in zip(prompts, responses)]\n")


def check(name: str, out: str, fn) -> None:
    """Run one check on every rank; record its result or its error (rank 0 writes)."""
    import torch

    from fastlora.train import distributed as dist

    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            res = dist.agree(fn, name) or {}
            fallbacks = sorted({str(w.message) for w in seen if str(w.message).startswith("fastlora:")})
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            peaks = dist.all_gather_object(peak)
            RESULTS["checks"].append({"name": name, "passed": not fallbacks and res.get("passed", True),
                                      "seconds": time.perf_counter() - t0, "fastlora_fallbacks": fallbacks,
                                      "peak_bytes_per_rank": peaks, **res})
        except Exception as e:  # noqa: BLE001 - recorded, the next check runs
            RESULTS["errors"].append({"name": name, "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()[-3000:]})
    save(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="two_gpu.json")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU (proves the script on a machine without GPUs)")
    args = ap.parse_args()
    import torch

    from fastlora.train import distributed as dist

    device = dist.setup(local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend="gloo" if args.cpu else None)
    if args.cpu:
        torch.set_num_threads(1)
    RESULTS["environment"] = {"backend": torch.distributed.get_backend(), "world_size": dist.world_size(),
                              "devices": dist.all_gather_object(str(device)), "torch": torch.__version__,
                              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        import bitsandbytes

        RESULTS["environment"]["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as e:
        RESULTS["errors"].append({"name": "environment", "error": f"bitsandbytes: {e}"})
        save(args.out)
        dist.teardown()
        return 1
    save(args.out)

    d = Path(dist.broadcast_object(tempfile.mkdtemp(prefix="fastlora-2gpu.") if dist.is_main() else None))
    dist.on_main(lambda: build(d), "building the tiny model and data")
    dev = "cpu" if args.cpu else "auto"
    common = dict(model=str(d / "model"), progress=False, lora_r=8, lora_alpha=16, seed=0, device=dev)
    sft_cfg = dict(common, data=[str(d / "sft.jsonl")], max_steps=4, batch_size=4, lr=1e-3, warmup_steps=0,
                   eval_split=0.1, max_length=32, measure_forgetting=False, max_new_tokens=2)

    def sft_run(name: str, **kw):
        from fastlora.train import SFTConfig, sft

        def run():
            s = sft(SFTConfig(**{**sft_cfg, "output_dir": str(d / name), **kw}))
            return {"final_train_loss": s["final_train_loss"], "eval_loss": s["eval_loss"]}

        return run

    check("sft ddp", args.out, sft_run("sft_ddp"))
    check("sft fsdp", args.out, sft_run("sft_fsdp", parallel="fsdp", save_every=2))

    def fsdp_resume():
        from safetensors.torch import load_file

        from fastlora.train import SFTConfig, sft

        cfg = {**sft_cfg, "output_dir": str(d / "sft_fsdp_stopped"), "parallel": "fsdp", "save_every": 2}

        def stop(step, _):
            if step == 3:
                raise KeyboardInterrupt  # on every rank: the run ends with its checkpoint of step 2

        try:
            sft(SFTConfig(**cfg), on_step=stop)
        except KeyboardInterrupt:
            pass
        sft(SFTConfig(**{**cfg, "resume": True}))
        a = load_file(d / "sft_fsdp_stopped" / "adapter" / "adapter_model.safetensors")
        b = load_file(d / "sft_fsdp" / "adapter" / "adapter_model.safetensors")
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
        return {"adapter_max_abs_difference": diff, "passed": diff <= 1e-6}

    check("sft fsdp stop + resume", args.out, fsdp_resume)

    def rm_run(name: str, **kw):
        def run():
            from fastlora.train.reward import RewardConfig, reward

            s = reward(RewardConfig(**{**common, "data": [str(d / "pairs.jsonl")], "max_steps": 3, "batch_size": 4,
                                       "lr": 1e-3, "warmup_steps": 0, "output_dir": str(d / name), **kw}))
            return {"final_train_loss": s["final_train_loss"], "accuracy_after": s["accuracy_after"]}

        return run

    check("rm ddp", args.out, rm_run("rm_ddp"))
    check("rm fsdp", args.out, rm_run("rm_fsdp", parallel="fsdp"))

    def ppo_run():
        from fastlora.train.ppo import ppo
        from fastlora.train.ppo_config import PPOConfig

        s = ppo(PPOConfig(**{**common, "data": [str(d / "prompts.jsonl")], "reward_fn": f"{d / 'reward.py'}:first",
                             "max_steps": 2, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 3,
                             "lr": 1e-3, "measure_forgetting": False, "output_dir": str(d / "ppo")}))
        return {"episodes": s["episodes"], "kl_last": s["kl_last"]}

    check("ppo gae ddp", args.out, ppo_run)
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(d, ignore_errors=True)
    RESULTS["passed"] = not RESULTS["errors"] and all(c["passed"] for c in RESULTS["checks"])
    save(args.out)
    dist.teardown()
    return 0 if RESULTS["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
