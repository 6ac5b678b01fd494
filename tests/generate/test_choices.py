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


def test_choice_accuracy_of_the_sft_evaluation(qlora, chat_tokenizer):
    from fastlora.train.defaults.healthcare import answer_of, parse_answer
    from fastlora.train.evaluate import TaskItem, choice_accuracy

    tok = chat_tokenizer
    qs = [("why was I charged twice", "billing"), ("my throat hurts", "symptoms"), ("book a visit", "appointment"),
          ("refund for my copay", "billing")]
    items = [TaskItem(chat(tok, q), answer_of(lab), lab, special_tokens=False) for q, lab in qs]
    res = choice_accuracy(qlora, tok, items, parse=parse_answer, min_confidence=0.5, batch_size=3)
    direct = fastlora.generate(qlora, [it.prompt for it in items], tokenizer=tok,
                               choices=list(dict.fromkeys(it.reference for it in items)), add_special_tokens=False)
    want = [parse_answer(p) for p in direct.predictions]
    assert [d["predicted"] for d in res["details"]] == want
    assert res["accuracy"] == sum(w == lab for w, (_, lab) in zip(want, qs)) / 4
    assert res["below_threshold"] == sum(c < 0.5 for c in direct.confidences)
    # not a classification task: no labels
    assert choice_accuracy(qlora, tok, [TaskItem("x", "y")], parse=parse_answer) is None


def _own_choices(tok, prompts, seqs, n_tokens):
    """Distinct choices made of each row's own first greedy tokens (those that tokenize back
    to themselves after every prompt), so greedy decoding walks the trie."""
    from fastlora.generate.choices import check_continuation, choice_token_ids

    out = []
    for q in seqs:
        text = tok.decode(q[:n_tokens].tolist())
        if not text or text in out:
            continue
        try:
            ids = choice_token_ids([text], tok)
            check_continuation(prompts, [text], ids, tok, False)
        except ValueError:
            continue
        out.append(text)
    return out


def test_with_greedy_is_plain_greedy(qlora, chat_tokenizer):
    """with_greedy=True gives the tokens plain greedy decoding gives, on every route: rows
    off the trie at once, rows that follow a choice and go on, rows that end on a stop
    token right after a choice (no decode step), rows that run out of budget inside it."""
    tok = chat_tokenizer
    prompts = [chat(tok, q) for q in ("why was I charged twice", "my throat hurts", "book a visit for friday",
                                      "a bill I do not understand", "fever since monday")]
    qlora.eval()
    kw = dict(tokenizer=tok, add_special_tokens=False, batch_size=2)
    plain = fastlora.generate(qlora, prompts, max_new_tokens=6, **kw)
    # 1. the usual labels: a random tiny model leaves the trie at its first token
    res = fastlora.generate(qlora, prompts, choices=CHOICES, max_new_tokens=6, with_greedy=True, **kw)
    assert [s.tolist() for s in res.greedy.sequences] == [s.tolist() for s in plain.sequences]
    assert res.greedy.texts == plain.texts and res.greedy.finish_reasons == plain.finish_reasons
    assert res.greedy.info["rows_decoded_from_their_prompt_cache"] == len(prompts)
    # restricted predictions are those of a call without with_greedy
    alone = fastlora.generate(qlora, prompts, choices=CHOICES, **kw)
    assert res.predictions == alone.predictions
    torch.testing.assert_close(res.choice_logprobs, alone.choice_logprobs, rtol=0, atol=1e-5)
    # 2. choices made of the rows' own first greedy tokens: those rows walk the trie
    own = _own_choices(tok, prompts, plain.sequences, 3)
    assert len(own) >= 2, f"too few usable choices from the tiny model's greedy output: {own}"
    res = fastlora.generate(qlora, prompts, choices=own, max_new_tokens=6, with_greedy=True, **kw)
    assert [s.tolist() for s in res.greedy.sequences] == [s.tolist() for s in plain.sequences]
    assert res.greedy.info["rows_decoded_after_trie_tokens"] >= 2
    # 3. the token after a choice is a stop token: that row costs no decode step
    walked = [i for i, q in enumerate(plain.sequences) if tok.decode(q[:3].tolist()) in own]
    stop = int(plain.sequences[walked[0]][3])
    plain_s = fastlora.generate(qlora, prompts, max_new_tokens=6, stop_token_ids=[stop], **kw)
    res = fastlora.generate(qlora, prompts, choices=own, max_new_tokens=6, with_greedy=True, stop_token_ids=[stop],
                            **kw)
    assert [s.tolist() for s in res.greedy.sequences] == [s.tolist() for s in plain_s.sequences]
    assert res.greedy.finish_reasons[walked[0]] == "stop_token"
    assert res.greedy.info["rows_without_a_decode_step"] >= 1
    # 4. a budget that ends inside the trie
    plain2 = fastlora.generate(qlora, prompts, max_new_tokens=2, **kw)
    res = fastlora.generate(qlora, prompts, choices=own, max_new_tokens=2, with_greedy=True, **kw)
    assert [s.tolist() for s in res.greedy.sequences] == [s.tolist() for s in plain2.sequences]
    assert all(r == "length" for i, r in enumerate(res.greedy.finish_reasons) if i in walked)


def test_with_greedy_bad_input(qlora, chat_tokenizer):
    tok = chat_tokenizer
    p = [chat(tok, "my throat hurts")]
    with pytest.raises(ValueError, match="pass choices="):
        fastlora.generate(qlora, p, tokenizer=tok, with_greedy=True)
    with pytest.raises(ValueError, match="cannot sample"):
        fastlora.generate(qlora, p, tokenizer=tok, choices=CHOICES, with_greedy=True, temperature=0.7)
    with pytest.raises(ValueError, match="stop_strings"):
        fastlora.generate(qlora, p, tokenizer=tok, choices=CHOICES, with_greedy=True, stop_strings=["}"])
