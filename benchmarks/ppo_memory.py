"""Peak memory of one PPO step: four separate bitsandbytes-4bit + PEFT models vs fastlora's shared base.

    python benchmarks/ppo_memory.py                 # Llama-3-8B widths, 4 decoder layers, batch 4 x (128 + 64)
    python benchmarks/ppo_memory.py --layers 32 --device cuda

The model: a Llama with Llama-3-8B widths (hidden 4096, MLP 14336, 32 heads, 8 KV heads,
vocab 128256, untied LM head) and ``--layers`` decoder layers, random weights, saved once
to a temporary directory as safetensors and loaded the way users load theirs:
transformers + ``BitsAndBytesConfig`` (NF4, double quantization, bf16 compute), through
``fastlora.train.model.load_base`` for both setups, so the two hold identical 4-bit bases.

The two setups (each in its own process, so one's memory never inflates the other's):

``separate``
    four independent 4-bit models, each wrapped by PEFT LoRA (r=16, every linear layer):
    policy (trainable), reference (frozen), critic (trainable, plus a scalar value head on
    the last hidden state), reward (frozen, plus a scalar score head). The step, the way a
    peer (the old TRL ``PPOTrainer``) runs it: reward forward -> score at the last token;
    reference forward -> full ``[batch, length, vocab]`` logits (fp32) -> log_softmax ->
    gather the response tokens; critic forward -> values; advantages (GAE); then the
    training pass: policy forward with full logits (log_softmax, gather, clipped policy
    loss) + critic forward (clipped value loss), backward, gradient clipping, AdamW step on
    the trainable LoRA parameters and the value head. In the peer's favour: the critic and
    reward run their decoder only (no logits), no entropy is computed from the logits, and
    no ``prepare_model_for_kbit_training`` (which would upcast the embeddings and the LM
    head of all four models to fp32).
``shared``
    one :class:`fastlora.rl.SharedBase` built by ``fastlora ppo``'s own ``build_base``
    (policy and critic: fresh trainable LoRA, a value head on the critic), plus a frozen
    ``reference`` adapter (what ``fastlora ppo`` makes of an SFT adapter) and a frozen
    ``reward`` adapter with a score head (what it makes of a ``fastlora rm`` result). The
    step is the trainer's own code: ``Scorer`` (reward score), ``prepare_batch`` (reference
    log-probs, critic values, advantages), ``ppo_updates`` (one mini-batch of the whole
    rollout: policy + critic loss, backward, clipping, AdamW). Log-probs come from
    ``fastlora.token_logprobs`` on hidden states: the logits never exist.

Both get the same rollout: the same random token ids, laid out as
``fastlora.train.ppo.Rollout`` (left-padded prompts, right-padded responses, one row at
full length). **Generation is excluded from both**: the rollout, with its old log-probs,
is given. Both use ``torch.optim.AdamW`` (``optimizer="adamw"``; on a GPU ``fastlora ppo``
would pick the 8-bit paged AdamW, which would favour the shared setup). Before the
measured step, each setup runs one step on a one-row rollout, so the optimizer states
and anything created lazily exist, as in every step after the first.

How the peak is measured (CPU): *resident* = the bytes of every live CPU tensor storage at
the start of the step (each storage once, found through the garbage collector after a
collection); *step peak* = the highest running total of the bytes allocated inside the
step, replayed from every allocation and free the torch profiler records
(``profile_memory=True``; frees are matched to allocations by address, so a block that
existed before the step never counts). Peak = resident + step peak. The profiler's own
"Total Allocated" is not used: it leaves out blocks allocated before profiling started and
carries blocks over from earlier profiling sessions. The check that nothing escaped the
count: the bytes live after the step must equal resident + the step's net allocations,
to the byte (``balance_bytes`` = 0 in the JSON). On a GPU: the caching allocator's
``memory_allocated`` (resident) and ``max_memory_allocated`` (peak).

Output: a table on stdout, and a JSON (``--out``) with the date, the machine, versions,
shapes, and per setup the resident weight bytes (counted as ``fastlora.rl.memory``
counts them, and checked against ``memory_estimate``), optimizer state bytes, resident
bytes, peak bytes and peak minus resident, and the ratio shared / separate; plus a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and a source-tree `fastlora` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SETUPS = ("separate", "shared")
ROLES = ("policy", "reference", "critic", "reward")
TRAINED = ("policy", "critic")
# Chrome-trace "Device Type" of CPU memory events (c10::DeviceType::CPU)
_CPU_DEVICE_TYPE = 0


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256
    layers: int = 4
    batch: int = 4
    prompt_len: int = 128
    response_len: int = 64
    lora_r: int = 16
    dtype: str = "bfloat16"

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
            max_position_embeddings=max(8192, self.prompt_len + self.response_len), tie_word_embeddings=False,
            rms_norm_eps=1e-5, rope_theta=500000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _say(msg: str) -> None:
    print(f"[ppo_memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ exact allocation accounting
class AllocationTrace:
    """Peak and net bytes allocated inside a ``with`` block, from every allocation and free
    the torch profiler records on the CPU.

    ``peak``: the highest running total of bytes allocated inside the block and not yet
    freed; ``net``: that total at the end; ``ignored_free_bytes``: frees of blocks
    allocated before the block (left out, matched by address); ``events``: allocation and
    free records replayed. Sizes are what the allocator was asked for, as torch reports them.
    """

    def __enter__(self) -> "AllocationTrace":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return False
        with tempfile.TemporaryDirectory(prefix="fastlora-ppo-memory-trace-") as d:
            path = os.path.join(d, "trace.json")
            self._prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
        del self._prof
        records = []
        for i, e in enumerate(trace.get("traceEvents", [])):
            if e.get("name") != "[memory]":
                continue
            a = e.get("args", {})
            if a.get("Device Type") != _CPU_DEVICE_TYPE:
                continue
            records.append((float(e["ts"]), i, int(a["Addr"]), int(a["Bytes"])))
        records.sort()  # by time; records at the same microsecond keep the trace's order
        self.peak, self.net, self.ignored_free_bytes = replay(r[2:] for r in records)
        self.events = len(records)
        return False


def replay(records) -> tuple[int, int, int]:
    """(peak, net, ignored free bytes) of (address, bytes) records in time order: bytes > 0
    allocates at the address, bytes < 0 frees it. A free whose address was not allocated
    in these records (a block from before) is ignored."""
    live: dict[int, int] = {}
    cur = peak = ignored = 0
    for addr, nbytes in records:
        if nbytes > 0:
            if addr in live:
                raise ValueError(f"allocation at address {addr:#x} while a block of {live[addr]} bytes is live there "
                                 "(a free was not recorded)")
            live[addr] = nbytes
            cur += nbytes
            peak = max(peak, cur)
        elif nbytes < 0:
            size = live.pop(addr, None)
            if size is None:
                ignored += -nbytes
                continue
            if size != -nbytes:
                raise ValueError(f"free of {-nbytes} bytes at {addr:#x}, but {size} were allocated there")
            cur -= size
    return peak, cur, ignored


def live_tensor_bytes(device_type: str = "cpu", *, collect: bool = True) -> int:
    """Bytes of every live tensor storage on ``device_type`` that Python can reach, each
    storage once (views, tied weights and quantization states counted once)."""
    if collect:
        gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor) or obj.device.type != device_type:
            continue
        try:
            st = obj.untyped_storage()
            ptr = st.data_ptr()  # fake tensors (left by torch.compile's tracing) have none
        except (RuntimeError, NotImplementedError):  # a tensor without storage (wrapper subclasses)
            continue
        if st.nbytes():
            storages[ptr] = max(storages.get(ptr, 0), st.nbytes())
    return sum(storages.values())


def measure(step, device: torch.device) -> dict:
    """Resident bytes before ``step()``, its peak, and the balance check (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        end = torch.cuda.memory_allocated(device)
        return {"method": "torch.cuda memory_allocated / max_memory_allocated (caching allocator statistics)",
                "resident_bytes": start, "peak_bytes": peak, "peak_minus_resident_bytes": peak - start,
                "resident_after_bytes": end}
    start = live_tensor_bytes("cpu")  # collects first: no garbage of earlier work is freed inside the step
    with AllocationTrace() as tr:
        step()
    end = live_tensor_bytes("cpu", collect=False)  # garbage not yet collected is still allocated
    return {"method": "live CPU tensor storages at the start (gc) + replay of the torch profiler's allocation "
                      "records inside the step",
            "resident_bytes": start, "peak_bytes": start + tr.peak, "peak_minus_resident_bytes": tr.peak,
            "resident_after_bytes": end, "step_net_bytes": tr.net, "balance_bytes": end - start - tr.net,
            "ignored_free_bytes": tr.ignored_free_bytes, "allocation_records": tr.events}


def weight_bytes(modules) -> int:
    """Bytes of the parameters, buffers and bitsandbytes quantization states of ``modules``,
    each storage once (as ``fastlora.rl.memory`` counts them)."""
    from fastlora.rl.memory import _quant_state_tensors, _storages

    tensors = []
    for m in modules:
        for p in m.parameters():
            tensors.append(p)
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                tensors += _quant_state_tensors(qs)
        tensors += list(m.buffers())
    return sum(_storages(tensors).values())


def dequant_buffer_bytes() -> int:
    """Bytes of fastlora's reused dequantize buffer (one layer's weight in the compute dtype,
    kept between calls: part of the shared setup's resident memory); 0 where fastlora's
    LoRA op never ran (the separate setup does not import it)."""
    mod = sys.modules.get("fastlora.ops.lora_linear")
    return sum(mod.dequant_buffer_bytes().values()) if mod is not None else 0


def optimizer_state_bytes(optimizer) -> int:
    from fastlora.rl.memory import _storages

    return sum(_storages([v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]).values())


# ------------------------------------------------------------------------ the model and the rollout
def save_checkpoint(shape: Shape, path: Path, seed: int = 0) -> Path:
    """A random Llama of ``shape`` in the compute dtype, as safetensors (what users load)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape.config(), dtype=shape.torch_dtype)
    with _quiet():
        model.save_pretrained(path)
    del model
    gc.collect()
    return path


@contextlib.contextmanager
def _quiet():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def load_4bit(path: Path, shape: Shape, device: torch.device):
    from fastlora.train.model import load_base

    with _quiet():
        return load_base(path, load_in_4bit=True, dtype=shape.torch_dtype, device=device)


def make_rollout(shape: Shape, *, batch: int, prompt_len: int, response_len: int, seed: int):
    """A ``fastlora.train.ppo.Rollout`` of random tokens: row 0 at full prompt and response
    length, the others shorter (left-padded prompts, right-padded responses)."""
    from fastlora.train.ppo import Rollout, build_rollout

    g = torch.Generator().manual_seed(seed)

    def lengths(full: int) -> list[int]:
        rest = torch.randint(max(1, full // 2), full + 1, (batch - 1,), generator=g).tolist()
        return [full] + rest

    p_lens, r_lens = lengths(prompt_len), lengths(response_len)
    prompts = [torch.randint(3, shape.vocab, (n,), generator=g).tolist() for n in p_lens]
    responses = [torch.randint(3, shape.vocab, (n,), generator=g) for n in r_lens]
    old_logp = [-(0.05 + 4.0 * torch.rand(n, generator=g)) for n in r_lens]  # the rollout's own log-probs
    ids, attn, P, tokens, mask, old = build_rollout(prompts, responses, old_logp, pad_id=0)
    return Rollout(ids, attn, P, tokens, mask, old, prompts=[""] * batch, texts=[""] * batch,
                   truncated=torch.zeros(batch, dtype=torch.bool), columns={}, chat=None)


def ppo_config(shape: Shape):
    from fastlora.train.ppo_config import PPOConfig

    # one mini-batch of the whole rollout, one epoch: one optimizer step per measured step
    return PPOConfig(batch_size=shape.batch, mini_batch_size=shape.batch, ppo_epochs=1, grad_accum=1, lr=1e-5,
                     optimizer="adamw", lora_r=shape.lora_r, lora_alpha=2 * shape.lora_r, target_modules="all-linear")


def _to(ro, device: torch.device):
    return dataclasses.replace(ro, input_ids=ro.input_ids.to(device), attention_mask=ro.attention_mask.to(device),
                               tokens=ro.tokens.to(device), mask=ro.mask.to(device), old_logp=ro.old_logp.to(device))


# ------------------------------------------------------------------------ the two setups
class Shared:
    """fastlora: one SharedBase, the PPO trainer's own step."""

    def __init__(self, checkpoint: Path, shape: Shape, device: torch.device):
        from fastlora.train.ppo import build_base
        from fastlora.train.sft import make_optimizer

        self.cfg = cfg = ppo_config(shape)
        _say("shared: loading the 4-bit base")
        base = build_base(cfg, load_4bit(checkpoint, shape, device), None, None)  # policy, critic (+ value head)
        base.add_role("reference", adapter="reference", trainable=False, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=3)
        base.add_role("reward", kind="score", head=True, trainable=False, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=4)
        self.base = base
        pol = base.trainable_parameters(["policy"])
        cri = [p for p in base.trainable_parameters(["critic"]) if all(p is not q for q in pol)]
        self.params = pol + cri
        self.optimizer = make_optimizer(cfg, [{"params": pol}, {"params": cri, "lr": cfg.critic_lr or cfg.lr}], device)
        self.modules = [base]

    def step(self, ro, step: int) -> None:
        from fastlora.train.ppo import Scorer, ppo_updates, prepare_batch

        cfg, base = self.cfg, self.base
        scores, _ = Scorer(cfg, base, None, _say)(ro)
        batch, _ = prepare_batch(base, cfg, ro, scores, cfg.kl_coef)
        ppo_updates(base, cfg, batch, self.optimizer, self.params, step, cfg.kl_coef)


class Separate:
    """The peer: four bitsandbytes-4bit + PEFT LoRA models, full logits."""

    def __init__(self, checkpoint: Path, shape: Shape, device: torch.device):
        from peft import LoraConfig, get_peft_model

        from fastlora.train.sft import make_optimizer

        self.cfg = cfg = ppo_config(shape)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                          bias="none", task_type="CAUSAL_LM")
        self.models = {}
        for i, role in enumerate(ROLES):
            _say(f"separate: loading 4-bit model {i + 1}/4 ({role})")
            torch.manual_seed(10 + i)
            m = get_peft_model(load_4bit(checkpoint, shape, device), lcfg)
            if role in TRAINED:
                m.train()
            else:
                m.requires_grad_(False)
                m.eval()
            self.models[role] = m
        H = shape.hidden
        self.heads = {r: torch.nn.Linear(H, 1, bias=False, device=device, dtype=torch.float32)
                      for r in ("critic", "reward")}
        with torch.no_grad():
            self.heads["critic"].weight.zero_()  # as fastlora ppo starts its value head
            self.heads["reward"].weight.normal_(0.0, H ** -0.5)
        self.heads["reward"].requires_grad_(False)
        pol = [p for p in self.models["policy"].parameters() if p.requires_grad]
        cri = [p for p in self.models["critic"].parameters() if p.requires_grad] + [self.heads["critic"].weight]
        self.params = pol + cri
        self.optimizer = make_optimizer(cfg, [{"params": pol}, {"params": cri, "lr": cfg.critic_lr or cfg.lr}], device)
        self.modules = list(self.models.values()) + list(self.heads.values())

    def _hidden(self, role: str, ids, attn, pos):
        dec = self.models[role].get_base_model().model  # the decoder, under this model's LoRA
        return dec(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state

    def _response_logprobs(self, role: str, ro, pos):
        """Full logits, log_softmax over the vocabulary, gather the sampled tokens (the peer's way)."""
        ids, attn = ro.input_ids, ro.attention_mask
        logits = self.models[role](input_ids=ids, attention_mask=attn, position_ids=pos,
                                   use_cache=False).logits.float()  # (B, L, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        P, Lr = ro.P, ro.tokens.shape[1]
        return logp[:, P - 1: P - 1 + Lr] * ro.mask  # hidden at P-1+j predicts response token j

    def _values(self, h, ro):
        P, Lr = ro.P, ro.tokens.shape[1]
        return self.heads["critic"](h[:, P - 1: P - 1 + Lr].float()).squeeze(-1).masked_fill(ro.mask == 0, 0.0)

    def step(self, ro, step: int) -> None:
        from fastlora import rl
        from fastlora.rl.base import last_token_index, position_ids_from_mask

        cfg = self.cfg
        ids, attn, mask, old = ro.input_ids, ro.attention_mask, ro.mask, ro.old_logp
        pos = position_ids_from_mask(attn)
        with torch.no_grad():
            h = self._hidden("reward", ids, attn, pos)
            scores = self.heads["reward"](h.float()).squeeze(-1).gather(1, last_token_index(attn)[:, None]).squeeze(1)
            del h
            ref = self._response_logprobs("reference", ro, pos)
            values = self._values(self._hidden("critic", ids, attn, pos), ro)
            rewards, _ = rl.token_rewards(scores, old, ref, mask, cfg.kl_coef, cfg.kl_kind)
            adv, ret = rl.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            adv = rl.whiten(adv, mask)
        logp = self._response_logprobs("policy", ro, pos)
        pl, _ = rl.policy_loss(logp, old, adv, mask, clip=cfg.clip)
        new_values = self._values(self._hidden("critic", ids, attn, pos), ro)
        vl, _ = rl.value_loss(new_values, values, ret, mask, clip=cfg.vf_clip)
        (pl + cfg.vf_coef * vl).backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def predicted_weight_bytes(shape: Shape) -> dict:
    """``fastlora.rl.memory.memory_estimate`` for these roles (every role its own adapter)."""
    from fastlora.rl.memory import memory_estimate

    est = memory_estimate(shape.config(), lora_r=shape.lora_r, adapters={r: r for r in ROLES},
                          heads=("critic", "reward"), dtype=shape.torch_dtype)
    return {"shared": est["shared"]["bytes"], "separate": est["separate"]["bytes"]}


def run_setup(name: str, checkpoint: Path, shape: Shape, device: torch.device) -> dict:
    """Build one setup, warm it up on a one-row rollout, measure one step on the full rollout."""
    t0 = time.perf_counter()
    runner = (Separate if name == "separate" else Shared)(checkpoint, shape, device)
    weights = weight_bytes(runner.modules)
    warm = _to(make_rollout(shape, batch=1, prompt_len=min(8, shape.prompt_len),
                            response_len=min(4, shape.response_len), seed=1), device)
    ro = _to(make_rollout(shape, batch=shape.batch, prompt_len=shape.prompt_len, response_len=shape.response_len,
                          seed=0), device)
    _say(f"{name}: warm-up step (one row)")
    runner.step(warm, 0)
    del warm
    _say(f"{name}: measured step")
    res = measure(lambda: runner.step(ro, 1), device)
    res.update(setup=name, weight_bytes=weights, predicted_weight_bytes=predicted_weight_bytes(shape)[name],
               optimizer_state_bytes=optimizer_state_bytes(runner.optimizer),
               dequant_buffer_bytes=dequant_buffer_bytes(),
               trainable_parameters=sum(p.numel() for p in runner.params),
               wall_seconds=time.perf_counter() - t0)  # load + warm-up + the profiled step: not a speed figure
    res["other_resident_bytes"] = (res["resident_bytes"] - weights - res["optimizer_state_bytes"]
                                   - res["dequant_buffer_bytes"])  # the rollout's tensors and small constants
    _say(f"{name}: peak {res['peak_bytes']:,} bytes ({time.perf_counter() - t0:.0f} s)")
    return res


# ------------------------------------------------------------------------ report
def _gib(b) -> str:
    return f"{b / 2**30:.3f} GiB"


def table(result: dict) -> str:
    rows = [("", "weights", "optimizer states", "dequant buffer", "resident at step start", "peak", "peak - resident")]
    for name in SETUPS:
        s = result["setups"].get(name)
        if s is None:
            continue
        rows.append((name, _gib(s["weight_bytes"]), _gib(s["optimizer_state_bytes"]), _gib(s["dequant_buffer_bytes"]),
                     _gib(s["resident_bytes"]),
                     _gib(s["peak_bytes"]), _gib(s["peak_minus_resident_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if result.get("ratio") is not None:
        lines.append(f"peak shared / separate = {result['ratio']:.4f} (bar: <= 1/3)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlora.train.checkpoint import write_png_atomic

    names = [n for n in SETUPS if n in result["setups"]]
    parts = [("weights", "weight_bytes", "#4477aa"), ("optimizer states, dequantize buffer, inputs", None, "#66ccee"),
             ("step (peak - resident)", "peak_minus_resident_bytes", "#ee6677")]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(names)
    for label, key, color in parts:
        s = [result["setups"][n] for n in names]
        vals = [(x[key] if key else x["resident_bytes"] - x["weight_bytes"]) / 2**30 for x in s]
        ax.bar(names, vals, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, n in enumerate(names):
        ax.text(i, bottom[i], _gib(result["setups"][n]["peak_bytes"]), ha="center", va="bottom")
    sh = result["shape"]
    ax.set_ylabel("GiB")
    title = (f"Peak memory of one PPO step ({result['device']}): {sh['layers']} layers, hidden {sh['hidden']}, "
             f"vocab {sh['vocab']}, batch {sh['batch']} x ({sh['prompt_len']} + {sh['response_len']})")
    if result.get("ratio") is not None:
        title += f"\nshared / separate = {result['ratio']:.3f}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_png_atomic(fig, path)


def _machine(device: torch.device) -> str:
    from benchmarks.harness import device_name

    if device.type == "cuda":
        return device_name(device)
    return f"{device_name(device)}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def default_out(device: torch.device) -> Path:
    from fastlora.bench import _slug

    tag = _slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else f"cpu-{os.cpu_count()}core"
    return ROOT / "benchmarks" / "results" / f"ppo_memory_{tag}.json"


# ------------------------------------------------------------------------ command line
def _parser() -> argparse.ArgumentParser:
    d = Shape()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Shape):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS))
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default benchmarks/results/ppo_memory_<device>.json); a PNG goes next to it")
    p.add_argument("--date", default=None, help="date to record (default today)")
    # internal: run one setup in this process and write its figures to --result
    p.add_argument("--setup", choices=SETUPS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.setup is not None:  # a child: one setup, figures to --result
        if args.checkpoint is None or args.result is None:
            raise SystemExit("--setup needs --checkpoint and --result")
        res = run_setup(args.setup, args.checkpoint, shape, device)
        from fastlora.train.checkpoint import write_json_atomic

        write_json_atomic(args.result, res)
        return res
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    bad = [s for s in setups if s not in SETUPS]
    if bad or not setups:
        raise SystemExit(f"--setups {args.setups!r}: expected a comma-separated subset of {','.join(SETUPS)}")
    out = args.out or default_out(device)
    result = {"what": "peak allocated bytes of one PPO step (generation excluded): four separate bitsandbytes-4bit + "
                      "PEFT models with full logits vs fastlora's shared 4-bit base",
              "date": args.date or _dt.date.today().isoformat(), "device": device.type, "machine": _machine(device),
              "versions": _versions(), "git": _git(ROOT), "shape": dataclasses.asdict(shape),
              "excluded": "generation (the rollout and its old log-probs are given to both setups); memory that "
                          "does not come from torch's allocator (the Python heap, oneDNN scratch space)",
              "command": "python benchmarks/ppo_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "setups": {}}
    with tempfile.TemporaryDirectory(prefix="fastlora-ppo-memory-") as tmp:
        ckpt = Path(tmp) / "model"
        _say(f"writing a random {shape.layers}-layer model (hidden {shape.hidden}, vocab {shape.vocab}) to {ckpt}")
        save_checkpoint(shape, ckpt)
        for name in setups:  # one process per setup: the other's memory never counts
            res_file = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--setup", name, "--checkpoint", str(ckpt),
                   "--result", str(res_file), "--device", args.device, "--threads", str(args.threads)]
            for f in dataclasses.fields(Shape):
                cmd += ["--" + f.name.replace("_", "-"), str(getattr(shape, f.name))]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in
                                                                             [os.environ.get("PYTHONPATH")] if p]))
            rc = subprocess.run(cmd, env=env).returncode
            if rc != 0:
                raise SystemExit(f"setup {name!r} failed (exit {rc}): {' '.join(cmd)}")
            result["setups"][name] = json.loads(res_file.read_text())
    if all(s in result["setups"] for s in SETUPS):
        result["ratio"] = result["setups"]["shared"]["peak_bytes"] / result["setups"]["separate"]["peak_bytes"]
        result["meets_bar_one_third"] = result["ratio"] <= 1 / 3
    from fastlora.train.checkpoint import write_json_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def _versions() -> dict:
    from fastlora.bench import _versions as versions

    return {k: v for k, v in versions().items() if v is not None}


def _git(root: Path) -> dict:
    from fastlora.bench import _git as git

    return git(root)


if __name__ == "__main__":
    main()
