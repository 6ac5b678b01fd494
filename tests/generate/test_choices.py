"""Label-restricted prediction (``choices=``) on a tiny 4-bit Llama with SmolLM2's tokenizer:
each choice's log-probability equals the sum of its tokens' log-probs in a plain
teacher-forced forward, probabilities renormalize over the choices, and bad choices fail
with a clear message."""
from __future__ import annotations

import json

import pytest
import torch

import fastlora
from tests.helpers import requires_bnb
from tests.patch import tiny

pytestmark = requires_bnb

LABELS = ["billing", "symptoms", "appointment"]
CHOICES = [json.dumps({"category": c}) for c in LABELS]


@pytest.fixture(scope="module")
def qlora(tiny_chat_model_dir):
    model = tiny.load_qlora(tiny_chat_model_dir)
    assert fastlora.patch(model).ok
    return model


def chat(tok, text):
    msgs = [{"role": "system", "content": "Classify the query."}, {"role": "user", "content": text}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def teacher_forced(model, tok, prompt, answer_ids):
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    seq = torch.tensor([ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0].double()
    lp = logits[len(ids) - 1: -1].log_softmax(-1)
    return float(lp.gather(-1, torch.tensor(answer_ids)[:, None]).sum())


def test_choice_probabilities_match_teacher_forcing(qlora, chat_tokenizer):
    tok = chat_tokenizer
    prompts = [chat(tok, q) for q in ("why was I charged twice", "my throat hurts", "book a visit for friday")]
    qlora.eval()
    res = fastlora.generate(qlora, prompts, tokenizer=tok, choices=CHOICES, add_special_tokens=False, batch_size=2)
    assert res.choice_probs.shape == (3, 3) and res.choice_logprobs.shape == (3, 3)
    torch.testing.assert_close(res.choice_probs.sum(-1).double(), torch.ones(3, dtype=torch.float64))
    assert res.info["shared_tokens"] > 0, "the trie shares the JSON prefix"
    for i, p in enumerate(prompts):
        want = [teacher_forced(qlora, tok, p, list(tok(c, add_special_tokens=False)["input_ids"])) for c in CHOICES]
        torch.testing.assert_close(res.choice_logprobs[i].double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=0, atol=2e-4)
        best = max(range(3), key=lambda c: want[c])
        assert res.predictions[i] == CHOICES[best] == res.texts[i]
        assert res.confidences[i] == pytest.approx(float(res.choice_probs[i, best]))
        assert res.sequences[i].tolist() == list(tok(CHOICES[best], add_special_tokens=False)["input_ids"])


def test_prefix_choices_end_with_the_stop_token(qlora, chat_tokenizer):
    tok = chat_tokenizer
    prompt = chat(tok, "is it urgent?")
    choices = ["yes", "yes!", "no"]
    ids = [list(tok(c, add_special_tokens=False)["input_ids"]) for c in choices]
    assert ids[1][: len(ids[0])] == ids[0], "the test needs a token-prefix pair"
    qlora.eval()
    res = fastlora.generate(qlora, [prompt], tokenizer=tok, choices=choices, add_special_tokens=False)
    assert res.info["end_token_appended"]
    eos = tok.eos_token_id
    want = [teacher_forced(qlora, tok, prompt, i + [eos]) for i in ids]
    torch.testing.assert_close(res.choice_logprobs[0].double(), torch.tensor(want, dtype=torch.float64),
                               rtol=0, atol=2e-4)


def test_bad_choices(qlora, chat_tokenizer):
    tok = chat_tokenizer
    p = [chat(tok, "hello")]
    with pytest.raises(ValueError, match="choices is empty"):
        fastlora.generate(qlora, p, tokenizer=tok, choices=[])
    with pytest.raises(ValueError, match=r"choices\[2\] 'a' duplicates choices\[0\]"):
        fastlora.generate(qlora, p, tokenizer=tok, choices=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"choices\[1\] is the empty string"):
        fastlora.generate(qlora, p, tokenizer=tok, choices=["a", ""])
    # the prompt ends with a newline: a choice starting with two merges into it
    with pytest.raises(ValueError, match=r"choices\[1\] '\\n\\nno' cannot be tokenized as a continuation of prompt 0"):
        fastlora.generate(qlora, p, tokenizer=tok, choices=["yes", "\n\nno"], add_special_tokens=False)
    with pytest.raises(TypeError, match="choices must be a list of strings"):
        fastlora.generate(qlora, p, tokenizer=tok, choices="yes")
