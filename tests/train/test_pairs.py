"""Preference data for ``fastlora rm``: formats, truncation from the start, and bad rows named
by file and line; the embedded healthcare pairs."""
from __future__ import annotations

import csv
import json

import pytest

from fastlora.train.pairs import check_pairs, collate_pairs, detect_format, encode_pairs, load_pairs
from tests.train import smollm2_tokenizer


def _jsonl(path, rows, blank_first=False):
    path.write_text(("\n" if blank_first else "") + "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load(path):
    recs = load_pairs([path])
    return check_pairs(recs, detect_format(recs))


PAIR = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
CHAT = {"prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}]}


def test_formats_and_margin(tmp_path):
    assert detect_format(load_pairs([_jsonl(tmp_path / "a.jsonl", [PAIR])])) == "pairs"
    assert detect_format(load_pairs([_jsonl(tmp_path / "b.jsonl", [CHAT])])) == "chat_pairs"
    rows = _load(_jsonl(tmp_path / "c.jsonl", [{**PAIR, "margin": 1.5}, PAIR]))
    assert [r["margin"] for r in rows] == [1.5, 0.0]
    # unpaired rows pair up per prompt: every desirable x undesirable completion
    unp = [{"prompt": "p", "completion": "good", "label": True}, {"prompt": "p", "completion": "bad", "label": False},
           {"prompt": "p", "completion": "worse", "label": "false"}, {"prompt": "q", "completion": "x", "label": True}]
    rows = _load(_jsonl(tmp_path / "d.jsonl", unp))
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("good", "bad"), ("good", "worse")]


@pytest.mark.parametrize("row, message", [
    ({**PAIR, "rejected": " 4"}, r"line 3: chosen and rejected are the same response"),
    ({"prompt": "Q", "chosen": "a"}, r"line 3: missing field 'rejected'"),
    ({**PAIR, "chosen": "   "}, r"line 3: the chosen response is empty"),
    ({**PAIR, "margin": "big"}, r"line 3: margin 'big' is not a number"),
    ({**PAIR, "chosen": 4}, r"line 3: 'chosen' must be a string"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = _jsonl(tmp_path / "prefs.jsonl", [PAIR, row], blank_first=True)  # line 1 blank: lines, not records
    with pytest.raises(ValueError, match="prefs.jsonl, " + message):
        _load(path)


def test_bad_chat_rows_and_csv(tmp_path):
    bad = {**CHAT, "rejected": [{"role": "assistant", "content": ""}]}
    with pytest.raises(ValueError, match=r"chat.jsonl, line 2: the rejected response is empty"):
        _load(_jsonl(tmp_path / "chat.jsonl", [CHAT, bad]))
    p = tmp_path / "prefs.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows([PAIR, {**PAIR, "rejected": PAIR["chosen"]}])
    with pytest.raises(ValueError, match=r"prefs.csv, row 2 \(line 3\): chosen and rejected are the same"):
        _load(str(p))


def test_one_class_of_outcome_only(tmp_path):
    rows = [{"prompt": "p", "completion": c, "label": True} for c in ("a", "b")]
    with pytest.raises(ValueError, match=r"one.jsonl: every row is desirable \(label true\).*one class of outcome"):
        _load(_jsonl(tmp_path / "one.jsonl", rows))
    rows = [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "q", "completion": "b", "label": False}]
    with pytest.raises(ValueError, match="no prompt has both a desirable and an undesirable completion"):
        _load(_jsonl(tmp_path / "apart.jsonl", rows))


def test_truncation_keeps_the_end_and_is_counted(tmp_path):
    tok = smollm2_tokenizer()
    long_prompt = "word " * 200
    pairs = check_pairs([{"prompt": long_prompt, "chosen": " the final answer is yes",
                          "rejected": " the final answer is no", "_where": "x"},
                         {**PAIR, "_where": "y"}], "pairs")
    items, stats = encode_pairs(pairs, tok, "pairs", max_length=32)
    full = tok(long_prompt)["input_ids"] + tok(" the final answer is yes", add_special_tokens=False)["input_ids"]
    assert items[0]["chosen_ids"] == full[-32:]  # the END is kept
    assert stats.truncated == 2 and stats.pairs == 2 and stats.sequences == 4
    batch = collate_pairs(items, tok.pad_token_id)
    assert batch["input_ids"].shape == (4, 32) and batch["attention_mask"][3].sum() == len(items[1]["rejected_ids"])
    # chat pairs render through the template, chosen first then rejected
    chat, _ = encode_pairs(check_pairs([{**CHAT, "_where": "z"}], "chat_pairs"), tok, "chat_pairs", max_length=512)
    text = tok.decode(chat[0]["chosen_ids"])
    assert "hi" in text and text.rstrip().endswith("hello<|im_end|>")


def test_embedded_preference_pairs():
    from fastlora.train.defaults import healthcare, preferences

    test = preferences.pairs("test")
    assert test == preferences.pairs("test")  # deterministic
    assert len(test) == len(healthcare.load_split("test"))
    kinds = {k: [p for p in test if p["kind"] == k] for k in preferences.KINDS}
    assert all(len(v) >= 70 for v in kinds.values())
    for p in test:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert healthcare.parse_answer(chosen) == p["label"]
        got = healthcare.parse_answer(rejected)
        if p["kind"] == "wrong_label":
            assert got is not None and got != p["label"]
        else:
            assert got is None, rejected  # unparsable and unsafe answers are never a valid routing
    check_pairs(test, "chat_pairs")  # no bad row
    train_queries = {p["prompt"][-1]["content"] for p in preferences.pairs("train")}
    assert not train_queries & {p["prompt"][-1]["content"] for p in test}
