"""fastlora.train.data: loading, format detection, loss masks token by token, prepare, batching,
collation. Packing against a real model is in test_packing.py."""
import csv
import json

import pytest
import torch

from fastlora.train import data as D
from fastlora.train.data import IGNORE_INDEX
from tests.train import smollm2_tokenizer


@pytest.fixture(scope="module")
def tok():
    t = smollm2_tokenizer()
    assert t.chat_template, "SmolLM2's tokenizer must come with its chat template"
    assert t.eos_token == "<|im_end|>"
    return t


def pieces(tok, ex):
    """(token, trained?) for each position: the explicit form every expectation below uses."""
    return [(tok.convert_ids_to_tokens(i), lab != IGNORE_INDEX) for i, lab in zip(ex["input_ids"], ex["labels"])]


def check_labels_copy_ids(ex):
    assert len(ex["labels"]) == len(ex["input_ids"])
    for i, lab in zip(ex["input_ids"], ex["labels"]):
        assert lab in (IGNORE_INDEX, i)


SMOL_DEFAULT_SYSTEM = [
    ("<|im_start|>", False), ("system", False), ("Ċ", False), ("You", False), ("Ġare", False), ("Ġa", False),
    ("Ġhelpful", False), ("ĠAI", False), ("Ġassistant", False), ("Ġnamed", False), ("ĠSm", False), ("ol", False),
    ("LM", False), (",", False), ("Ġtrained", False), ("Ġby", False), ("ĠH", False), ("ugging", False),
    ("ĠFace", False), ("<|im_end|>", False), ("Ċ", False),
]


# ---------------------------------------------------------------------------------------------
# load_records
# ---------------------------------------------------------------------------------------------

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_load_jsonl_json_csv(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")  # blank line skipped
    assert D.load_records(p) == ROWS
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS))
    assert D.load_records(p) == ROWS
    p.write_text(json.dumps({"data": ROWS}))
    assert D.load_records(str(p)) == ROWS
    p = tmp_path / "d.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(ROWS)
    assert D.load_records(p) == ROWS
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())  # a byte-order mark, as spreadsheets write it
    assert D.load_records(p) == ROWS
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\r\n")
    assert D.load_records(p) == ROWS[:1]


def test_load_saved_dataset_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert D.load_records(tmp_path / "ds") == ROWS
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS[1:])}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert D.load_records(tmp_path / "dd") == ROWS[:1]
    assert D.load_records(tmp_path / "dd", split="test") == ROWS[1:]
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        D.load_records(tmp_path / "dd", split="validation")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain: directory is not a dataset saved by datasets.save_to_disk"):
        D.load_records(tmp_path / "plain")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.load_records(tmp_path / "nope.jsonl")


def test_load_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n{"text": "ok"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: malformed JSON"):
        D.load_records(p)
    p.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: expected a JSON object, got list"):
        D.load_records(p)


def test_load_malformed_json_and_csv(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(ValueError, match=r"bad\.json, line 3: malformed JSON"):
        D.load_records(p)
    p.write_text('{"rows": []}')
    with pytest.raises(ValueError, match=r"bad\.json: expected a JSON list"):
        D.load_records(p)
    p.write_text('[{"text": "a"}, "b"]')
    with pytest.raises(ValueError, match=r"bad\.json, line 1: record 1 is a str"):
        D.load_records(p)
    p = tmp_path / "bad.csv"
    p.write_text("text\nhello\nworld,extra\n")
    with pytest.raises(ValueError, match=r"bad\.csv, row 2 \(line 3\): more cells than header"):
        D.load_records(p)


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", ""),
                                          ("e.csv", "text\n")])
def test_load_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ValueError, match=rf"{name}: the dataset is empty"):
        D.load_records(p)


def test_load_unsupported_extension(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("hello")
    with pytest.raises(ValueError, match=r"d\.txt: unsupported dataset file type '\.txt'"):
        D.load_records(p)


# ---------------------------------------------------------------------------------------------
# detect_format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record,fmt", [
    ({"messages": []}, "messages"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"text": "t"}, "text"),
    ({"text": "t", "messages": [], "meta": 1}, "messages"),  # a chat wins over its text rendering
])
def test_detect_format(record, fmt):
    assert D.detect_format([record]) == fmt
    assert D.detect_format([record], fmt) == fmt


def test_detect_format_missing_columns_names_found_and_accepted():
    with pytest.raises(ValueError) as e:
        D.detect_format([{"question": "q", "answer": "a"}])
    msg = str(e.value)
    assert "['answer', 'question']" in msg
    for fmt, cols in [("messages", "'messages'"), ("alpaca", "'instruction', 'output', optional 'input'"),
                      ("prompt_completion", "'prompt', 'completion'"), ("text", "'text'")]:
        assert f"{fmt} ({cols})" in msg
    with pytest.raises(ValueError, match=r"format 'alpaca' needs columns \['instruction', 'output'\] but the "
                                         r"records have \['prompt', 'text'\] \(missing \['instruction', 'output'\]\)"):
        D.detect_format([{"prompt": "p", "text": "t"}], "alpaca")
    with pytest.raises(ValueError, match="unknown format 'sharegpt'"):
        D.detect_format([{"text": "t"}], "sharegpt")
    with pytest.raises(ValueError, match="empty"):
        D.detect_format([])
    with pytest.raises(ValueError, match="records must be dicts"):
        D.detect_format(["text"])


# ---------------------------------------------------------------------------------------------
# encode: masks token by token (SmolLM2's real tokenizer and chat template)
# ---------------------------------------------------------------------------------------------


def test_messages_single_turn_default_system(tok):
    ex = D.encode({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
                  tok, "messages", max_length=512)
    check_labels_copy_ids(ex)
    # the template's default system prompt and the user turn are masked; the answer and its
    # end-of-turn token are trained; the newline the template adds after <|im_end|> is not
    assert pieces(tok, ex) == SMOL_DEFAULT_SYSTEM + [
        ("<|im_start|>", False), ("user", False), ("Ċ", False), ("hi", False), ("<|im_end|>", False), ("Ċ", False),
        ("<|im_start|>", False), ("ass", False), ("istant", False), ("Ċ", False),
        ("ok", True), ("<|im_end|>", True), ("Ċ", False),
    ]
    # the prompt part is exactly what generation sees with add_generation_prompt=True
    n_prompt = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX)
    gen = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert ex["input_ids"][:n_prompt] == tok(gen, add_special_tokens=False)["input_ids"]


def test_messages_multi_turn_only_assistant_trained(tok):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "sure thing"},
    ]
    ex = D.encode({"messages": msgs}, tok, "messages", max_length=512)
    check_labels_copy_ids(ex)
    assert pieces(tok, ex) == [
        ("<|im_start|>", False), ("system", False), ("Ċ", False), ("S", False), ("<|im_end|>", False), ("Ċ", False),
        ("<|im_start|>", False), ("user", False), ("Ċ", False), ("hi", False), ("Ġthere", False),
        ("<|im_end|>", False), ("Ċ", False),
        ("<|im_start|>", False), ("ass", False), ("istant", False), ("Ċ", False),
        ("ok", True), ("<|im_end|>", True), ("Ċ", False),
        ("<|im_start|>", False), ("user", False), ("Ċ", False), ("more", False), ("<|im_end|>", False), ("Ċ", False),
        ("<|im_start|>", False), ("ass", False), ("istant", False), ("Ċ", False),
        ("s", True), ("ure", True), ("Ġthing", True), ("<|im_end|>", True), ("Ċ", False),
    ]
    # the whole chat is the template's own tokenization, unchanged
    assert ex["input_ids"] == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])


def test_messages_without_assistant_dropped(tok):
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]}
    assert D.encode(rec, tok, "messages", max_length=512) is None


@pytest.mark.parametrize("messages,match", [
    ("hello", "non-empty list of turns"),
    ([], "non-empty list of turns"),
    ([{"role": "user"}], "turn 0 must be"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], "turn 1 must be"),
])
def test_messages_malformed(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        D.encode({"messages": messages}, tok, "messages", max_length=64)


def test_prompt_completion(tok):
    ex = D.encode({"prompt": "Q: 1+1?", "completion": " 2"}, tok, "prompt_completion", max_length=64)
    check_labels_copy_ids(ex)
    assert pieces(tok, ex) == [
        ("Q", False), (":", False), ("Ġ", False), ("1", False), ("+", False), ("1", False), ("?", False),
        ("Ġ", True), ("2", True), ("<|im_end|>", True),
    ]


def test_prompt_completion_conversational(tok):
    rec = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
           "completion": [{"role": "assistant", "content": "ok"}]}
    ex = D.encode(rec, tok, "prompt_completion", max_length=64)
    assert pieces(tok, ex) == [
        ("<|im_start|>", False), ("system", False), ("Ċ", False), ("S", False), ("<|im_end|>", False), ("Ċ", False),
        ("<|im_start|>", False), ("user", False), ("Ċ", False), ("hi", False), ("<|im_end|>", False), ("Ċ", False),
        ("<|im_start|>", False), ("ass", False), ("istant", False), ("Ċ", False),
        ("ok", True), ("<|im_end|>", True), ("Ċ", False),
    ]


def test_alpaca_without_and_with_input(tok):
    ex = D.encode({"instruction": "Add", "output": "3"}, tok, "alpaca", max_length=512)
    check_labels_copy_ids(ex)
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nAdd\n\n### Response:\n")
    assert D.render_alpaca("Add") == prompt
    n = len(tok(prompt)["input_ids"])
    assert pieces(tok, ex)[n:] == [("3", True), ("<|im_end|>", True)]
    assert not any(t for _, t in pieces(tok, ex)[:n]) and len(ex["input_ids"]) == n + 2

    ex = D.encode({"instruction": "Add", "input": "1 2", "output": "3"}, tok, "alpaca", max_length=512)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd\n\n"
              "### Input:\n1 2\n\n### Response:\n")
    assert D.render_alpaca("Add", "1 2") == prompt
    assert ex["input_ids"] == tok(prompt)["input_ids"] + tok("3", add_special_tokens=False)["input_ids"] + [2]
    assert pieces(tok, ex)[-3:] == [("Ċ", False), ("3", True), ("<|im_end|>", True)]
    # an empty input is the no-input template
    assert D.encode({"instruction": "Add", "input": "", "output": "3"}, tok, "alpaca", max_length=512)["input_ids"] \
        == D.encode({"instruction": "Add", "output": "3"}, tok, "alpaca", max_length=512)["input_ids"]


def test_text_trains_every_token_and_eos(tok):
    ex = D.encode({"text": "hello world"}, tok, "text", max_length=64)
    assert pieces(tok, ex) == [("hello", True), ("Ġworld", True), ("<|im_end|>", True)]


def test_wrong_column_types(tok):
    with pytest.raises(ValueError, match="column 'text' must be a string, got int"):
        D.encode({"text": 3}, tok, "text", max_length=64)
    with pytest.raises(ValueError, match=r"alpaca record is missing columns \['output'\]; it has \['instruction'\]"):
        D.encode({"instruction": "x"}, tok, "alpaca", max_length=64)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        D.encode({"text": "x"}, tok, "text", max_length=1)


def test_truncation(tok):
    rec = {"prompt": "Q: 1+1?", "completion": " 2"}  # 7 prompt tokens + 3 trained
    ex = D.encode(rec, tok, "prompt_completion", max_length=8)
    assert pieces(tok, ex) == [("Q", False), (":", False), ("Ġ", False), ("1", False), ("+", False), ("1", False),
                               ("?", False), ("Ġ", True)]
    # nothing trained left within max_length -> dropped
    assert D.encode(rec, tok, "prompt_completion", max_length=7) is None
    ex = D.encode({"text": "hello world"}, tok, "text", max_length=2)
    assert pieces(tok, ex) == [("hello", True), ("Ġworld", True)]


@pytest.fixture(scope="module")
def tiny_tok():
    """A hand-made word-level tokenizer with another chat template (Zephyr-like: EOS ends every
    turn, with nothing between the role tag and the content)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "hi", "ok", "sure", "more", "be", "brief"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return fast


def test_other_chat_template(tiny_tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "sure"}]
    ex = D.encode({"messages": msgs}, tiny_tok, "messages", max_length=64)
    assert pieces(tiny_tok, ex) == [
        ("<|system|>", False), ("be", False), ("brief", False), ("</s>", False),
        ("<|user|>", False), ("hi", False), ("</s>", False),
        ("<|assistant|>", False), ("ok", True), ("</s>", True),
        ("<|user|>", False), ("more", False), ("</s>", False),
        ("<|assistant|>", False), ("sure", True), ("</s>", True),
    ]


def test_no_chat_template_or_eos(tiny_tok):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tiny_tok.backend_tokenizer)
    with pytest.raises(ValueError, match="no eos_token"):
        D.encode({"text": "hi"}, bare, "text", max_length=8)
    bare.eos_token = "</s>"
    with pytest.raises(ValueError, match="no chat_template"):
        D.encode({"messages": [{"role": "user", "content": "hi"}]}, bare, "messages", max_length=8)


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


def test_prepare_counts(tok):
    recs = [
        {"prompt": "Q: 1+1?", "completion": " 2"},  # 10 tokens, kept
        {"prompt": "Q: 1+1? " * 3, "completion": " 2"},  # answer beyond max_length: dropped
        {"prompt": "Q:", "completion": " 2 3 4 5 6 7 8 9"},  # truncated but kept
        {"prompt": "Q:", "completion": ""},  # EOS only: still trained (the model learns to stop)
    ]
    examples, stats = D.prepare(recs, tok, max_length=10)
    assert (stats.total, stats.kept, stats.truncated, stats.dropped_empty) == (4, 3, 1, 1)
    assert [len(e["input_ids"]) for e in examples] == [10, 10, 3]
    assert stats.tokens == 23
    assert stats.trained_tokens == 3 + 8 + 1
    assert str(stats).startswith("3/4 examples kept, 1 truncated, 1 dropped")


def test_prepare_empty_after_filtering(tok):
    recs = [{"prompt": "a long prompt with many words", "completion": "x"}] * 3
    with pytest.raises(ValueError, match=r"empty after filtering: all 3 records were dropped.*max_length=4"):
        D.prepare(recs, tok, max_length=4)


def test_prepare_names_bad_record(tok):
    recs = [{"text": "ok"}, {"text": "ok"}, {"text": None}]
    with pytest.raises(ValueError, match=r"record 2: .*'text' must be a string, got NoneType"):
        D.prepare(recs, tok)
    with pytest.raises(ValueError, match=r"record 1: text record is missing columns \['text'\]; it has \['body'\]"):
        D.prepare([{"text": "ok"}, {"body": "x"}], tok)


# ---------------------------------------------------------------------------------------------
# batch_order, collate, pack (structure; the model-level proof is in test_packing.py)
# ---------------------------------------------------------------------------------------------


def test_batch_order_deterministic():
    a = D.batch_order(23, 4, seed=1, epoch=0)
    assert a == D.batch_order(23, 4, seed=1, epoch=0)
    assert [len(b) for b in a] == [4] * 5 + [3]
    assert sorted(i for b in a for i in b) == list(range(23))
    assert a != D.batch_order(23, 4, seed=1, epoch=1)
    assert a != D.batch_order(23, 4, seed=2, epoch=0)
    # pinned: the order must not change with Python or library versions, or resume breaks
    assert D.batch_order(6, 4, seed=0, epoch=0) == [[4, 2, 1, 0], [5, 3]]
    assert D.batch_order(5, 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        D.batch_order(5, 0, seed=0, epoch=0)


def test_collate_unpacked():
    b = D.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["input_ids"].dtype == torch.long


def test_collate_packed_and_errors():
    rows = D.pack([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]},
                   {"input_ids": [4, 3, 2, 1], "labels": [4, 3, 2, 1]}], max_length=5)
    b = D.collate(rows, pad_token_id=0)
    assert set(b) == {"input_ids", "labels", "position_ids"}
    # longest first: [4 3 2 1] opens row 0, [5 6 7] does not fit there and opens row 1, and
    # [8 9] only fits in row 1
    assert b["input_ids"].tolist() == [[4, 3, 2, 1, 0], [5, 6, 7, 8, 9]]
    assert b["labels"].tolist() == [[-100, 3, 2, 1, -100], [-100, 6, 7, -100, 9]]
    # the padding is its own pseudo-document: positions restart at 0
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="packed and unpacked"):
        D.collate([rows[0], {"input_ids": [1], "labels": [1]}], pad_token_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        D.collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        D.collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_token_id=0)


def test_pack_best_fit_decreasing():
    lengths = [7, 5, 4, 3, 3, 2, 1, 1]  # 26 tokens; BFD fills rows of 8 as 7+1, 5+3, 4+3+1, 2
    exs = [{"input_ids": list(range(100 * i, 100 * i + n)), "labels": list(range(100 * i, 100 * i + n))}
           for i, n in enumerate(lengths)]
    rows = D.pack(exs, max_length=8)
    assert [r["seq_lengths"] for r in rows] == [[7, 1], [5, 3], [4, 3, 1], [2]]
    seen = []
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == sum(r["seq_lengths"]) <= 8
        start = 0
        for n in r["seq_lengths"]:
            doc = r["input_ids"][start:start + n]
            seen.append(doc[0] // 100)
            assert r["position_ids"][start:start + n] == list(range(n))
            # the first token of each document is never a target; the others keep their labels
            assert r["labels"][start:start + n] == [IGNORE_INDEX] + doc[1:]
            start += n
    assert sorted(seen) == list(range(len(lengths)))
    with pytest.raises(ValueError, match="example 0 has 7 tokens, more than the packing max_length=6"):
        D.pack(exs, max_length=6)


def test_messages_answer_text_also_in_prompt_and_first_turn(tok):
    """The trained span is the assistant's turn even when its text also occurs earlier, and when
    the chat opens with the assistant (the template then inserts its default system prompt)."""
    ex = D.encode({"messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": "ok"},
                                {"role": "assistant", "content": "ok"}]}, tok, "messages", max_length=64)
    assert pieces(tok, ex) == [
        ("<|im_start|>", False), ("system", False), ("Ċ", False), ("ok", False), ("<|im_end|>", False), ("Ċ", False),
        ("<|im_start|>", False), ("user", False), ("Ċ", False), ("ok", False), ("<|im_end|>", False), ("Ċ", False),
        ("<|im_start|>", False), ("ass", False), ("istant", False), ("Ċ", False),
        ("ok", True), ("<|im_end|>", True), ("Ċ", False),
    ]
    ex = D.encode({"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "hi"}]},
                  tok, "messages", max_length=64)
    assert pieces(tok, ex) == SMOL_DEFAULT_SYSTEM + [
        ("<|im_start|>", False), ("ass", False), ("istant", False), ("Ċ", False),
        ("Hello", True), ("<|im_end|>", True), ("Ċ", False),
        ("<|im_start|>", False), ("user", False), ("Ċ", False), ("hi", False), ("<|im_end|>", False), ("Ċ", False),
    ]


def test_messages_empty_answer_trains_end_of_turn(tok):
    ex = D.encode({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
                  tok, "messages", max_length=64)
    assert pieces(tok, ex)[-4:] == [("istant", False), ("Ċ", False), ("<|im_end|>", True), ("Ċ", False)]


def test_template_that_trims_content(tiny_tok):
    import copy

    trimming = copy.deepcopy(tiny_tok)
    trimming.chat_template = tiny_tok.chat_template.replace("m['content']", "m['content'] | trim")
    ex = D.encode({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ok \n"}]},
                  trimming, "messages", max_length=64)
    assert pieces(trimming, ex) == [("<|user|>", False), ("hi", False), ("</s>", False),
                                    ("<|assistant|>", False), ("ok", True), ("</s>", True)]


def test_messages_truncation_keeps_earlier_turns(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "sure thing"}]
    full = D.encode({"messages": msgs}, tok, "messages", max_length=512)
    ex = D.encode({"messages": msgs}, tok, "messages", max_length=32)  # cuts "sure thing" after "ure"
    assert ex["input_ids"] == full["input_ids"][:32] and ex["labels"] == full["labels"][:32]
    assert pieces(tok, ex)[-3:] == [("Ċ", False), ("s", True), ("ure", True)]
    # cut before the first answer: nothing trained is left
    assert D.encode({"messages": msgs}, tok, "messages", max_length=17) is None
    examples, stats = D.prepare([{"messages": msgs}, {"messages": msgs[:2]}, {"messages": msgs[:3]}], tok,
                                max_length=18)
    assert (stats.total, stats.kept, stats.truncated, stats.dropped_empty) == (3, 2, 2, 1)
    assert [sum(lab != IGNORE_INDEX for lab in e["labels"]) for e in examples] == [1, 1]  # just "ok"
