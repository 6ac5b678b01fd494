"""``fastlora.generate`` answers as the adapted model does, for every ``fastlora sft --peft``
method (and PEFT's p-tuning): greedy tokens and choice probabilities on a tiny 4-bit Llama.

Every method's weights are randomized (virtual tokens, prefixes, scales, biases, LoRA's B),
and each test first asserts that the adapter changes the answer, so a path that drops the
adapter (runs the base model) fails.

The oracle is PEFT's forward: greedy decoding one forward per token over the whole
sequence, no cache (``PeftModel.__call__``, what PEFT trains; the bottleneck adapter and
BitFit live in the model itself). Where ``generate`` of the PEFT model is faithful it is a
second oracle, on the left-padded batch: LoRA, DoRA, (IA)³, LN tuning, the adapter and
BitFit, and for prompt tuning / p-tuning ``PeftModel.generate(use_cache=False)`` row by
row. Not for prefix tuning: PEFT 0.21's ``prepare_inputs_for_generation`` reads
``past_key_values``, which transformers 5 passes as ``cache``, so its ``generate`` drops the
prefix (with a cache) or feeds the previous step's cache back (without); its cached
``generate`` of prompt tuning likewise re-adds the virtual tokens at every step (see
``fastlora.generate.decode.VirtualPrefix``).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastlora
from fastlora.train import peft_methods as pm
from tests.helpers import assert_close, requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb

EOS = 2
N_VIRTUAL = 5
METHODS = ["lora", "dora", "ia3", "ln", "prefix", "prompt", "ptuning", "adapter", "bitfit"]
# PEFT's generate is a faithful second oracle for these (batched, left-padded)
GENERATE_ORACLE = {"lora", "dora", "ia3", "ln", "adapter", "bitfit"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    # qwen2 has q/k/v biases (real BitFit); llama has none
    return {f: tiny.save_random(f, root / f, max_position_embeddings=128) for f in ("llama", "qwen2")}


def _randomize(model, method):
    """Random trained weights, large enough that the answer changes."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if method in ("prefix", "prompt", "ptuning"):
                p.copy_(noise * (2.0 if method == "prefix" else 1.0))
            else:
                p.add_(noise * 0.5)


def build(dirs, method):
    """(adapted model in eval mode, 4-bit base without adapter)."""
    family = "qwen2" if method == "bitfit" else "llama"
    base = tiny.load_4bit(dirs[family])
    torch.manual_seed(3)
    if method == "ptuning":  # PEFT's p-tuning (not a `--peft` choice): virtual tokens from an MLP encoder
        import peft

        cfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=32)
        model = peft.get_peft_model(tiny.load_4bit(dirs[family]), cfg)
    else:
        model, info = pm.add_peft(tiny.load_4bit(dirs[family]), method, r=4, alpha=8, num_virtual_tokens=N_VIRTUAL,
                                  adapter_dim=8, log=lambda m: None)
        assert info["method_used"] == method
    _randomize(model, method)
    return model.eval(), base.eval()


def rows_with_shared_prefix(seed=0):
    """Prompts of different lengths sharing 9 leading tokens (the prefix-cache path)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, tiny.VOCAB, (9,), generator=g).tolist()
    return [head + torch.randint(3, tiny.VOCAB, (n,), generator=g).tolist() for n in (3, 7, 1)]


def rows_plain(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, tiny.VOCAB, (n,), generator=g).tolist() for n in (6, 11, 2)]


def left_padded(rows):
    T = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


def forward_greedy(model, row, n):
    """The oracle: greedy tokens by the model's own forward over the whole sequence."""
    seq = list(row)
    out = []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([seq])
            t = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
            if t == EOS:
                break
    return out


def generate_greedy(model, rows, n, **kw):
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=EOS, temperature=None, top_p=None, top_k=None, **kw)
    got = []
    for r in out[:, ids.shape[1]:].tolist():
        got.append(r[: r.index(EOS) + 1] if EOS in r else r)
    return got


def fl_greedy(model, rows, n, **kw):
    ids, mask = left_padded(rows)
    res = fastlora.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=n, stop_token_ids=[EOS], **kw)
    return [s.tolist() for s in res.sequences]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_generation_is_the_adapted_models(dirs, method):
    n = 8
    model, base = build(dirs, method)
    all_rows = rows_with_shared_prefix() + rows_plain()
    want = [forward_greedy(model, r, n) for r in all_rows]
    # the adapter changes the answer (so a path that drops it fails here)
    assert want != [forward_greedy(base, r, n) for r in all_rows], method
    if method in GENERATE_ORACLE:
        assert generate_greedy(model, all_rows[:3], n) == want[:3]
        assert generate_greedy(model, all_rows[3:], n) == want[3:]
    elif method != "prefix":
        assert [generate_greedy(model, [r], n, use_cache=False)[0] for r in all_rows] == want
    assert fastlora.patch(model) is not None  # the user's path: patched (LoRA fused, the rest kept)
    for decoder in ("dynamic", "static"):
        for share in (True, False):
            got = fl_greedy(model, all_rows[:3], n, decoder=decoder, share_prefix=share) \
                + fl_greedy(model, all_rows[3:], n, decoder=decoder, share_prefix=share)
            assert got == want, (method, decoder, share)
    # rows split over batches, sorted by length (the batch_size path)
    assert fl_greedy(model, all_rows, n, batch_size=2) == want


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_disabled_prompt_learning_adapter_answers_as_the_base(dirs, method):
    model, base = build(dirs, method)
    rows = rows_plain()
    want_base = [forward_greedy(base, r, 6) for r in rows]
    with model.disable_adapter():
        assert fl_greedy(model, rows, 6) == want_base
    assert fl_greedy(model, rows, 6) != want_base


def _choice_reference(model, prompts, choices, tok):
    """float64 log-probs of each choice after each prompt, summed over its tokens, from one
    forward of the adapted model over prompt + choice; and their softmax over the choices."""
    return _choice_reference_ids(model, [tok(p, add_special_tokens=False)["input_ids"] for p in prompts], choices,
                                 tok)


def _choice_reference_ids(model, heads, choices, tok):
    logp = torch.zeros((len(heads), len(choices)), dtype=torch.float64)
    with torch.no_grad():
        for i, head in enumerate(heads):
            for j, c in enumerate(choices):
                tail = tok(c, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([head + tail])
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
                # prompt tuning's forward also returns its virtual tokens' logits, first
                lp = logits[logits.shape[0] - ids.shape[1]:].double().log_softmax(-1)
                logp[i, j] = sum(lp[len(head) - 1 + k, t] for k, t in enumerate(tail))
    return logp, logp.softmax(-1)


@pytest.mark.parametrize("method", METHODS)
def test_choice_probabilities_are_the_adapted_models(dirs, method):
    tok = tiny.tokenizer()
    model, base = build(dirs, method)
    fastlora.patch(model)
    # a shared system-like head (the prefix cache), then different questions
    prompts = ["<|system|>triage the message</s><|user|>" + q + "</s><|assistant|>"
               for q in ("is it urgent?", "can i book a visit", "refill", "my head hurts a lot today")]
    choices = ["yes", "no", "maybe"]
    want_logp, want_p = _choice_reference(model, prompts, choices, tok)
    base_logp, _ = _choice_reference(base, prompts, choices, tok)
    assert (want_logp - base_logp).abs().max() > 0.1, method  # the adapter matters
    for bs in (None, 3):
        res = fastlora.generate(model, prompts, tokenizer=tok, choices=choices, add_special_tokens=False,
                                batch_size=bs)
        assert_close(res.choice_logprobs, want_logp, rtol=1e-4, atol=1e-4, msg=f"{method} logp")
        assert_close(res.choice_probs, want_p, rtol=1e-4, atol=1e-5, msg=f"{method} probs")
        assert res.predictions == [choices[int(k)] for k in want_p.argmax(-1)]
    # the free greedy answers read off the same forwards (trie as a draft, forked caches)
    res = fastlora.generate(model, prompts, tokenizer=tok, choices=choices, add_special_tokens=False,
                            with_greedy=True, max_new_tokens=6, stop_token_ids=[EOS])
    want = [forward_greedy(model, tok(p, add_special_tokens=False)["input_ids"], 6) for p in prompts]
    assert [s.tolist() for s in res.greedy.sequences] == want


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_eval_loss_is_the_adapted_models(dirs, method):
    """The eval loss's cached paths (shared untrained prefix, or none) with virtual tokens
    equal PEFT's forward with labels, token-weighted; also when a row's first token is
    trained (prompt tuning predicts it from its last virtual token)."""
    from fastlora.train.evaluate import eval_loss

    model, _ = build(dirs, method)
    fastlora.patch(model)
    g = torch.Generator().manual_seed(5)
    head = torch.randint(3, tiny.VOCAB, (10,), generator=g).tolist()
    shared = [{"input_ids": head + (t := torch.randint(3, tiny.VOCAB, (k,), generator=g).tolist()),
               "labels": [-100] * len(head) + t} for k in (4, 9, 6, 3)]
    first_trained = [{"input_ids": (t := torch.randint(3, tiny.VOCAB, (k,), generator=g).tolist()), "labels": t}
                     for k in (5, 8)]
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))  # PEFT's own forward (the uncached path)
    for examples, cached in ((shared, True), (first_trained, method == "prefix"),
                             (shared[:1] + first_trained, method == "prefix")):
        total = count = 0.0
        with torch.no_grad():
            for ex in examples:
                ids = torch.tensor([ex["input_ids"]])
                labels = torch.tensor([ex["labels"]])
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
                n = int((labels[:, 1:] != -100).sum())
                if method == "prompt":
                    n += int(labels[0, 0] != -100)
                total += float(out.loss) * n
                count += n
        calls.clear()
        got = eval_loss(model, examples, pad_token_id=0, batch_size=2)
        assert abs(got - total / count) <= 1e-5 * abs(total / count) + 1e-6, (method, got, total / count)
        assert (not calls) == cached, (method, len(calls))


def test_unsupported_adapter_is_refused_by_name(dirs):
    import peft

    model = peft.get_peft_model(tiny.load_4bit(dirs["llama"]), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=2))
    with pytest.raises(ValueError, match="MULTITASK_PROMPT_TUNING"):
        fastlora.generate(model, input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    lora = tiny.load_qlora(dirs["llama"])
    lora.peft_config["default"] = copy.copy(lora.peft_config["default"])
    lora.peft_config["default"].alora_invocation_tokens = [5]
    with pytest.raises(ValueError, match="activated LoRA"):
        fastlora.generate(lora, input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)


@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter"])
def test_predict_command_probabilities(dirs, tmp_path, capsys, method):
    """`fastlora predict --adapter DIR --choices ...` on a saved adapter: its probabilities
    (printed to 4 decimals) are the softmax of PEFT's forward's summed choice log-probs."""
    import shutil

    from fastlora.generate.commands import GenerateConfig, run_predict

    tok = tiny.tokenizer()
    model_dir = tmp_path / "model"
    shutil.copytree(dirs["llama"], model_dir)
    tok.save_pretrained(model_dir)
    model, _ = build(dirs, method)
    pm.save_trainable(model, tmp_path / "adapter")
    prompts = ["is it urgent?", "refill my prescription please", "book"]
    choices = ["yes", "no", "maybe"]
    rows = run_predict(GenerateConfig(prompts=prompts, model=str(model_dir), adapter=str(tmp_path / "adapter"),
                                      choices=choices, raw=True, json=True, device="cpu"))
    capsys.readouterr()
    # raw prompts are tokenized with the tokenizer's special tokens, as the command does
    heads = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    ref = pm.load_trainable(tiny.load_4bit(model_dir), tmp_path / "adapter").eval()
    _, want = _choice_reference_ids(ref, heads, choices, tok)
    _, base = _choice_reference_ids(tiny.load_4bit(model_dir).eval(), heads, choices, tok)
    tol = 6e-5  # printed with 4 decimals
    assert (want - base).abs().max() > 3 * tol, method  # the adapter matters at the printed precision
    got = torch.tensor([[r["probabilities"][c] for c in choices] for r in rows], dtype=torch.float64)
    assert_close(got, want, rtol=0, atol=tol, msg=method)
