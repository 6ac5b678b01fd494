"""The PPO loop on tiny models: KL 0 at step 0 (the reference is the SFT adapter),
reference log-probs equal to the base model's, no (batch, length, vocab) tensor kept by
autograd, a toy reward that rises, resume equality, GRPO, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close, requires_bnb

pytestmark = requires_bnb

WORDS = ["<pad>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + ["say", "something", "question"]


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama over a 32-word vocabulary with a word-level tokenizer: a PPO step
    takes a fraction of a second, and the output head is large enough (init std 0.3) for
    LoRA to move the first word's distribution."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("toy_lm")
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    with open(out / "prompts.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"question {chr(97 + i % 26)} say something", "label": "a"}) + "\n")
    (out / "toy_reward.py").write_text(
        "def first_word(prompts, responses):\n"
        "    return [1.0 if r.split() and r.split()[0] in 'abcdefgh' else 0.0 for r in responses]\n"
        "def nan_first(prompts, responses):\n"
        "    return [float('nan')] + [0.0] * (len(responses) - 1)\n"
        "def broken(prompts, responses):\n"
        "    raise RuntimeError('scorer crashed')\n")
    return out


def _cfg(toy_dir, out, **kw):
    from fastlora.train.ppo_config import PPOConfig

    base = dict(model=str(toy_dir), data=[str(toy_dir / "prompts.jsonl")],
                reward_fn=f"{toy_dir / 'toy_reward.py'}:first_word", output_dir=str(out), max_steps=8,
                batch_size=16, mini_batch_size=8, max_new_tokens=4, lr=3e-3, lora_r=8, lora_alpha=16,
                kl_coef=0.01, progress=False, measure_forgetting=False, seed=0)
    base.update(kw)
    return PPOConfig(**base)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _steps(out):
    return {r["step"]: r for r in _metrics(out) if "event" not in r}


# ------------------------------------------------------------------ the loop
def test_toy_reward_rises_and_outputs(toy_dir, tmp_path):
    """GAE PPO on a toy reward (first word in a..h: 8 of 32 words): the rollout score
    rises; the run leaves metrics, samples, curves, summary and a PEFT adapter."""
    from fastlora.train.ppo import ppo

    out = tmp_path / "run"
    summary = ppo(_cfg(toy_dir, out))
    steps = _steps(out)
    assert sorted(steps) == list(range(1, 9))
    first = sum(steps[s]["score"] for s in (1, 2, 3)) / 3
    last = sum(steps[s]["score"] for s in (6, 7, 8)) / 3
    assert last > first + 0.25, (first, last)
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before the first update
    for k in ("score", "kl", "non_score_reward", "clip_frac", "vf_clip_frac", "approx_kl", "entropy", "value_loss",
              "episodes_per_second", "rollout_tokens_per_second", "beta"):
        assert all(math.isfinite(steps[s][k]) for s in steps), k
    for f in ("summary.json", "metrics.jsonl", "samples.jsonl", "curves.png", "run.json",
              "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "roles/shared_base.json"):
        assert (out / f).is_file(), f
    assert summary["steps"] == 8 and summary["episodes"] == 8 * 16
    from peft import PeftModel

    from fastlora.train.model import load_base

    lm = load_base(toy_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    loaded = PeftModel.from_pretrained(lm, str(out / "adapter"))
    assert sum(float(p.abs().sum()) for n, p in loaded.named_parameters() if "lora_B" in n) > 0


def test_resume_gives_identical_metrics(toy_dir, tmp_path):
    """Killed after step 3 (checkpoint at 2), resumed: steps 3-4 equal an uninterrupted run's."""
    from fastlora.train.ppo import ppo

    a, b = tmp_path / "a", tmp_path / "b"
    small = dict(max_steps=4, save_every=2, batch_size=8)
    ppo(_cfg(toy_dir, a, **small))

    def kill(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ppo(_cfg(toy_dir, b, **small), on_step=kill)
    with pytest.raises(ValueError, match="already holds a run"):
        ppo(_cfg(toy_dir, b, **small))
    ppo(_cfg(toy_dir, b, resume=True, **small))
    sa, sb = _steps(a), _steps(b)
    assert sorted(sb) == [1, 2, 3, 4]
    for s in range(1, 5):
        for k in ("score", "kl", "policy_loss", "value_loss", "approx_kl"):
            assert sb[s][k] == pytest.approx(sa[s][k], rel=1e-5, abs=1e-6), (s, k)


def test_grpo_and_shared_critic_run(toy_dir, tmp_path):
    from fastlora.train.ppo import ppo

    s1 = ppo(_cfg(toy_dir, tmp_path / "grpo", advantage="grpo", group_size=4, batch_size=2, max_steps=2))
    s2 = ppo(_cfg(toy_dir, tmp_path / "shared", critic="shared", batch_size=8, max_steps=2, kl_target=0.5,
                  kl_horizon=100))
    assert s1["episodes"] == 2 * 8 and s2["episodes"] == 2 * 8
    g = _steps(tmp_path / "grpo")
    assert "value_loss" not in g[1] and math.isfinite(g[2]["policy_loss"])
    sh = _steps(tmp_path / "shared")
    assert sh[2]["beta"] != sh[1]["beta"]  # the adaptive controller moved β
    roles = json.loads((tmp_path / "shared" / "roles" / "shared_base.json").read_text())["roles"]
    assert roles["critic"]["adapter"] == "policy"



def test_greedy_score_baseline(toy_dir, tmp_path, monkeypatch):
    """score_baseline=greedy subtracts, per prompt, the score of the policy's greedy answer
    (the same answer whatever the sampling seed); the metrics report the raw score and
    the baseline."""
    import fastlora.train.ppo as ppo_mod

    seen = []
    real = ppo_mod.greedy_scores

    def spy(base, tok, cfg, items, scorer, step):
        scores, ok = real(base, tok, cfg, items, scorer, step)
        a, _ = ppo_mod.make_rollout(base, tok, cfg, items, step, temperature=0.0)
        b, _ = ppo_mod.make_rollout(base, tok, cfg, items, step + 99, temperature=0.0)
        assert a.texts == b.texts  # greedy: the seed changes nothing
        assert torch.equal(scorer(a)[0], scores)
        seen.append(scores)
        return scores, ok

    monkeypatch.setattr(ppo_mod, "greedy_scores", spy)
    ppo_mod.ppo(_cfg(toy_dir, tmp_path / "run", score_baseline="greedy", batch_size=8, max_steps=2))
    steps = _steps(tmp_path / "run")
    assert len(seen) == 2
    for s in (1, 2):
        assert steps[s]["score_baseline"] == pytest.approx(float(seen[s - 1].mean()), abs=1e-6)
        assert math.isfinite(steps[s]["score"]) and math.isfinite(steps[s]["policy_loss"])
    with pytest.raises(ValueError, match="score_baseline"):
        _cfg(toy_dir, tmp_path / "bad", score_baseline="mean")

# ------------------------------------------------------------------ roles
def _sft_adapter(toy_dir, path):
    """A random non-zero LoRA adapter standing in for an SFT result."""
    from fastlora.train.model import add_lora, load_base

    lm = load_base(toy_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(1)
    model = add_lora(lm, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return model


def _rollout(tok, texts, responses):
    from fastlora.train.ppo import Rollout, build_rollout

    p = [tok(t)["input_ids"] for t in texts]
    r = [torch.tensor(tok(x)["input_ids"] + [tok.eos_token_id]) for x in responses]
    ids, attn, P, tokens, mask, old = build_rollout(p, r, [torch.zeros(len(x)) for x in r], tok.pad_token_id)
    return Rollout(ids, attn, P, tokens, mask, old, texts, responses, torch.zeros(len(texts), dtype=torch.bool), {})


def test_reference_is_the_sft_model_and_kl_is_zero_at_step0(toy_dir, tmp_path):
    """With an SFT adapter the reference role is the SFT model (compared with PEFT's own
    forward on full logits), and the policy's log-probs equal it exactly at step 0.
    Without one, the reference is the bare 4-bit base."""
    from transformers import AutoTokenizer

    from fastlora import rl
    from fastlora.train.model import load_base
    from fastlora.train.ppo import build_base, response_logprobs

    tok = AutoTokenizer.from_pretrained(toy_dir)
    sft = _sft_adapter(toy_dir, tmp_path / "sft")
    ro = _rollout(tok, ["question a say something", "say b"], ["c d e", "f"])
    cfg = _cfg(toy_dir, tmp_path / "x")
    lm = load_base(toy_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    base = build_base(cfg, lm, tmp_path / "sft", None)
    with torch.no_grad():
        ref = response_logprobs(base, "reference", ro)
        pol = response_logprobs(base, "policy", ro)
        assert torch.equal(ref * ro.mask, pol * ro.mask)
        assert float(rl.masked_sum(rl.kl_penalty(pol, ref, "k3"), ro.mask)) == 0.0

        def full_logits_logp(model):
            model.eval()
            pos = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
            lp = torch.log_softmax(logits.float(), -1)[:, ro.P - 1: -1]
            return lp.gather(-1, ro.tokens[:, :, None]).squeeze(-1)

        exp = full_logits_logp(sft)  # the SFT model: bnb 4-bit + PEFT, plain forward
        assert_close(ref * ro.mask, exp * ro.mask, rtol=1e-5, atol=1e-5)

        lm2 = load_base(toy_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
        plain = build_base(cfg, lm2, None, None)
        ref0 = response_logprobs(plain, "reference", ro)
        lm3 = load_base(toy_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
        assert_close(ref0 * ro.mask, full_logits_logp(lm3) * ro.mask, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ref0 * ro.mask, ref * ro.mask)  # the SFT adapter matters


def test_no_batch_length_vocab_tensor_is_saved(tiny_model_dir, smollm_tokenizer, tmp_path):
    """One PPO micro-batch on a 49152-word vocabulary: nothing autograd saves has the
    (rows, length, vocab) size of full logits (the head weight (V, H) is the only
    vocab-sized tensor)."""
    from fastlora.train.model import load_base
    from fastlora.train.ppo import build_base, micro_loss, prepare_batch

    cfg = _cfg(tiny_model_dir, tmp_path / "x", lora_r=4, lora_alpha=8)
    lm = load_base(tiny_model_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    base = build_base(cfg, lm, None, None)
    tok = smollm_tokenizer
    ro = _rollout(tok, ["Hello there, how are you today?", "Route this"] * 2,
                  ["fine thanks and you", "billing", "ok", "a much longer answer with more tokens in it"])
    V = base.lm.config.vocab_size
    batch, _ = prepare_batch(base, cfg, ro, torch.tensor([1.0, -1.0, 0.5, 0.0]), beta=0.05)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = micro_loss(base, cfg, batch, [0, 1, 2, 3], 0.05)
    loss.backward()
    N, T = ro.input_ids.shape
    assert saved, "autograd saved nothing: the hook did not run"
    head = (V, base.hidden_size)  # the output weight (a parameter, shared by every row)
    big = [s for s, n in saved if n >= N * ro.tokens.shape[1] * V and s != head]
    assert not big, big
    vocab_sized = {s for s, _ in saved if V in s}
    assert vocab_sized <= {head}, vocab_sized


# ------------------------------------------------------------------ bad input
def test_bad_input(toy_dir, tmp_path):
    from fastlora.train.ppo import ppo
    from fastlora.train.rewards import RewardError

    with pytest.raises(ValueError, match="does not divide into mini-batches of mini_batch_size=5"):
        _cfg(toy_dir, tmp_path / "a", batch_size=16, mini_batch_size=5)
    with pytest.raises(ValueError, match="does not import"):
        ppo(_cfg(toy_dir, tmp_path / "b", reward_fn="no_such_module_xyz:score"))
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        ppo(_cfg(toy_dir, tmp_path / "c", reward_fn=f"{toy_dir / 'toy_reward.py'}:nope"))
    with pytest.raises(ValueError, match="must be 'module:function'"):
        ppo(_cfg(toy_dir, tmp_path / "d", reward_fn="no_colon"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # nothing written
    # a reward function that raises: stop names the prompt and response
    with pytest.raises(RewardError, match=r"raised RuntimeError: scorer crashed on sample 0: prompt 'question"):
        ppo(_cfg(toy_dir, tmp_path / "e", reward_fn=f"{toy_dir / 'toy_reward.py'}:broken",
                 on_reward_error="stop", max_steps=1, batch_size=8))
    # NaN on some samples: skipped (reported), the run goes on
    s = ppo(_cfg(toy_dir, tmp_path / "f", reward_fn=f"{toy_dir / 'toy_reward.py'}:nan_first", max_steps=2,
                 batch_size=8))
    steps = _steps(tmp_path / "f")
    assert s["steps"] == 2 and [r["skipped"] for r in steps.values()] == [1, 1]
    assert all(math.isfinite(r["policy_loss"]) for r in steps.values())


def test_reward_model_on_another_base_is_refused(toy_dir, tmp_path):
    from fastlora.train.ppo import check_same_base

    d = tmp_path / "rm"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/Llama-3-8B"}))
    with pytest.raises(ValueError, match="was trained on base '/models/Llama-3-8B'"):
        check_same_base(d, toy_dir)


def test_zero_length_response_is_refused():
    from fastlora.train.ppo import build_rollout

    with pytest.raises(ValueError, match=r"response length 0 for rollout row\(s\) \[1\]"):
        build_rollout([[1, 2], [1]], [torch.tensor([3]), torch.tensor([], dtype=torch.long)],
                      [torch.zeros(1), torch.zeros(0)], 0)


def test_rule_reward():
    from fastlora.train.rewards import healthcare_rule_reward

    out = healthcare_rule_reward(["p"] * 5, ['{"category": "billing"}', ' {"category": "symptoms"} ',
                                             '{"category": "dentist"}', "billing", '{"category": "billing", "x": 1}'],
                                 label=["billing", "billing", "billing", "billing", "billing"])
    assert out == [1.0, -1.0, -1.0, -2.0, -2.0]


def test_reward_model_role_scores_rollouts(toy_dir, tmp_path):
    """A `fastlora rm`-format reward model (SEQ_CLS adapter + score head) becomes the
    frozen reward role; its score plus a weighted reward function drive a PPO step."""
    from fastlora.rl.base import SharedBase
    from fastlora.train.model import load_base
    from fastlora.train.ppo import ppo

    lm = load_base(toy_dir, load_in_4bit=True, dtype=torch.float32, device=torch.device("cpu"))
    rm = SharedBase.from_model(lm, patch=False)
    rm.add_role("reward", r=4, alpha=8, seed=5, head_init_std=0.5)
    rm.export_sequence_classification("reward", tmp_path / "rm" / "adapter")
    s = ppo(_cfg(toy_dir, tmp_path / "run", reward_model=str(tmp_path / "rm"), reward_fn_weight=0.5, max_steps=1,
                 batch_size=8))
    assert "reward model" in s["reward"] and "x0.5" in s["reward"]
    rec = _steps(tmp_path / "run")[1]
    assert math.isfinite(rec["score"]) and rec["score_std"] > 0  # the head gives varied scores


def test_cli_parses_and_reports_bad_options(capsys, tmp_path):
    from fastlora.cli import main

    assert main(["ppo", "--data", "p.jsonl", "--batch-size", "16", "--mini-batch-size", "5",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not divide into mini-batches of mini_batch_size=5" in capsys.readouterr().err
    assert main(["ppo", "--kl-kind", "k2", "--output-dir", str(tmp_path / "o")]) == 2
    assert "kl_kind='k2' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_embedded_task_prompts_and_test_reward(smollm_tokenizer):
    """The no-argument run's inputs: the healthcare train prompts rendered with the chat
    template up to the generation prompt (labels reach the rule reward), and the mean rule
    reward of greedy test answers."""
    from fastlora.train.ppo import Scorer, _mean_score, load_prompts
    from fastlora.train.ppo_config import PPOConfig
    from fastlora.train.rewards import healthcare_rule_reward

    cfg = PPOConfig(test_max_examples=3).resolved()
    data = load_prompts(cfg, smollm_tokenizer)
    assert data["task"] == "healthcare" and len(data["prompts"]) == 1920 and len(data["test"]) == 3
    p = data["prompts"][0]
    assert p.prompt.endswith("<|im_start|>assistant\n") and p.columns["label"] in ("symptoms", "appointment", "billing")
    assert '"category"' not in p.prompt.split("<|im_start|>user")[-1]  # the answer is not in the prompt
    items = data["test"]
    wrong = next(c for c in ("symptoms", "appointment", "billing") if c != items[1].label)
    details = [{"output": json.dumps({"category": items[0].label})}, {"output": json.dumps({"category": wrong})},
               {"output": "I think it is billing"}]
    scorer = Scorer(cfg, None, healthcare_rule_reward, print)
    assert _mean_score(scorer, None, smollm_tokenizer, cfg, items, details) == pytest.approx((1 - 1 - 2) / 3)


def test_reward_model_reads_what_rm_trained_on(smollm_tokenizer):
    """The reward model scores a rollout exactly as `fastlora rm` encoded its training pairs
    (the template's end of turn after the answer, not the stop token generation ended on)."""
    from fastlora.train.pairs import encode_sequence
    from fastlora.train.ppo import Rollout, Scorer, build_rollout, chat_turn_tail, load_prompts
    from fastlora.train.ppo_config import PPOConfig

    tok = smollm_tokenizer
    assert chat_turn_tail(tok) == "<|im_end|>\n"
    cfg = PPOConfig(test_max_examples=2).resolved()
    items = load_prompts(cfg, tok)["test"]
    answers = ['{"category": "billing"}', "I am not sure"]
    eos = tok.eos_token_id
    prompt_ids = [list(tok(it.prompt, add_special_tokens=False)["input_ids"]) for it in items]
    seqs = [torch.tensor(tok(a, add_special_tokens=False)["input_ids"] + [eos]) for a in answers]
    ids, attn, P, tokens, mask, old = build_rollout(prompt_ids, seqs, [torch.zeros(len(s)) for s in seqs],
                                                    tok.pad_token_id)
    ro = Rollout(ids, attn, P, tokens, mask, old, [it.prompt for it in items], answers,
                 torch.zeros(2, dtype=torch.bool), {}, [True, True])
    got_ids, got_mask = Scorer(cfg, None, None, print, tok).reward_inputs(ro)
    from fastlora.train.defaults import healthcare

    records = healthcare.load_split("test")[:2]
    for i, (rec, a) in enumerate(zip(records, answers)):
        # the pair as the reward trainer encodes it: the prompt turns, then the answer turn
        want = encode_sequence(tok, "chat_pairs", [m for m in rec["messages"] if m["role"] != "assistant"],
                               [{"role": "assistant", "content": a}])
        n = int(got_mask[i].sum())
        assert got_ids[i, :n].tolist() == want
        assert want[-1] != eos and want[-2] == eos  # read at the newline after <|im_end|>, as in training
    # a plain-text prompt: prompt tokens then the answer's, no EOS (encode_sequence's other path)
    ro.chat = [False, False]
    got_ids, got_mask = Scorer(cfg, None, None, print, tok).reward_inputs(ro)
    want = encode_sequence(tok, "pairs", items[1].prompt, answers[1])
    assert got_ids[1, : int(got_mask[1].sum())].tolist() == want


def test_rlhf_skips_finished_stages_and_tabulates(tmp_path, capsys):
    from fastlora.train.rlhf import rlhf

    sums = {"sft": {"accuracy_before": 0.0, "accuracy_after": 0.95, "retention": 0.97, "general_qa_before": 0.5,
                    "final_train_loss": 0.2},
            "rm": {"accuracy_before": 0.4, "accuracy_after": 0.98},
            "ppo": {"accuracy_after": 0.96, "general_qa_after": 0.45, "test_reward_before": 0.9,
                    "test_reward_after": 0.95}}
    for stage, s in sums.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "summary.json").write_text(json.dumps(s))
    out = rlhf(tmp_path, progress=False)
    rows = {r[0]: r for r in out["table"]}
    assert rows["SFT"][1] == "95.0%" and rows["PPO"][2] == "90.0%"  # retention against the base's general QA
    assert "98.0%" in rows["reward model"][3] and "0.900 -> 0.950" in rows["PPO"][3]
    (tmp_path / "rm" / "summary.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"rm/summary.json, line 1: malformed JSON"):
        rlhf(tmp_path, progress=False)


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_shared_prefix_ppo_equals_the_plain_one(toy_dir, tmp_path, advantage):
    """Rollout scoring and every update forward run the shared tokens once (GRPO: a group's
    prompt; GAE: what the prompts share): the same step statistics as --no-share-prefix."""
    from fastlora.train.ppo import ppo

    kw = dict(advantage=advantage, max_steps=2)
    if advantage == "grpo":
        kw.update(group_size=4, batch_size=2)
    runs = {}
    for share in (True, False):
        summary = ppo(_cfg(toy_dir, tmp_path / str(share), share_prefix=share, **kw))
        runs[share] = (summary, _steps(tmp_path / str(share)))
    (on, s_on), (off, s_off) = runs[True], runs[False]
    for step in (1, 2):
        for key in ("score", "kl", "policy_loss", "ratio"):
            if key in s_off[step]:
                assert s_on[step][key] == pytest.approx(s_off[step][key], rel=1e-4, abs=1e-6), (step, key)
        # GRPO's groups share their whole prompt; the toy GAE prompts share a few template
        # tokens only, which the cost model may judge not worth planning: counted either way
        assert s_on[step]["tokens_run_fraction"] is not None
        assert s_off[step]["tokens_run_fraction"] is None
        if advantage == "grpo":
            assert s_on[step]["tokens_run_fraction"] < 1
    assert on["share_prefix"] is True and off["share_prefix"] is False
