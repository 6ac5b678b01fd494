"""Data errors point at their cause: file and line (CSV row, datasets index) in every format,
before the eval split, whichever file the record came from; invalid UTF-8 by line and byte;
duplicate JSON keys; empty responses counted, warned about, and refused when nothing is left."""
from __future__ import annotations

import json

import pytest

from fastlora.train import data as D
from fastlora.train.config import SFTConfig
from fastlora.train.sft import load_data
from tests.train import smollm2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _alpaca(n: int) -> list[dict]:
    return [{"instruction": f"say {i}", "output": f"{i}"} for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad_line", [15, 1])
def test_bad_record_named_by_file_and_line_before_the_split(tmp_path, bad_line):
    # Before: "record 13" (counted after the split, over all files joined), or, when the record
    # landed in the eval split, "format 'alpaca' needs columns ... but the records have ['instruction']".
    first = _jsonl(tmp_path / "first.jsonl", _alpaca(16))
    rows = _alpaca(20)
    rows[bad_line - 1] = {"instruction": "no answer here"}
    second = _jsonl(tmp_path / "second.jsonl", rows)
    for eval_split in (0.0, 0.5):
        with pytest.raises(ValueError) as info:
            load_data(SFTConfig(data=[str(first), str(second)], eval_split=eval_split, seed=1))
        msg = str(info.value)
        assert msg.startswith(f"{second}, line {bad_line}: alpaca record is missing column(s) ['output']"), msg
        assert "but the records have" not in msg


def test_every_format_names_its_source(tmp_path):
    import csv

    import datasets

    # .json: the line where the record starts
    p = tmp_path / "a.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": "b"},\n  {"text": 3}\n]\n')
    with pytest.raises(ValueError, match=r"a\.json, line 4: text record: column 'text' must be a string, got int"):
        load_data(SFTConfig(data=[str(p)]))
    # .json with a "data" list
    p.write_text('{"meta": {"x": [1, 2]},\n "data": [\n  {"text": "a"},\n  {"txt": "b"}\n]}\n')
    with pytest.raises(ValueError, match=r"a\.json, line 4: text record is missing column"):
        load_data(SFTConfig(data=[str(p)]))
    # .csv: the row and its line (a quoted cell spanning two lines shifts the line)
    p = tmp_path / "a.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerow(["two\nlines", "x"])
        w.writerow(["p", "y"])
    origins = []
    D.load_records(p, origins=origins)
    assert origins == [f"{p}, row 1 (line 2)", f"{p}, row 2 (line 4)"]
    # a datasets dir: the split and index
    d = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]) \
        .save_to_disk(str(d))
    with pytest.raises(ValueError, match=r"ds, index 1: prompt_completion record: column 'completion' must be a "
                                         r"string, got NoneType"):
        load_data(SFTConfig(data=[str(d)], eval_split=0.0))


def test_non_utf8_names_file_line_and_byte(tmp_path):
    good = json.dumps({"text": "ok"}).encode() + b"\n"
    bad = b'{"text": "caf\xe9"}\n'
    for name, content, line, byte in [
        ("a.jsonl", good * 2 + bad, 3, 14),
        ("a.json", b"[\n" + good.rstrip() + b",\n" + bad + b"]", 3, 14),
        ("a.csv", b"text\nok\ncaf\xe9\n", 3, 4),
    ]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError) as info:
            D.load_records(p)
        msg = str(info.value)
        assert msg.startswith(f"{p}, line {line}, byte {byte} ") and "not valid UTF-8 (0xe9)" in msg, msg


def test_duplicate_json_keys_are_refused(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b", "text": "c"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl, line 2: duplicate key 'text'"):
        D.load_records(p)
    p = tmp_path / "a.json"
    p.write_text('[\n{"text": "a"},\n{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}\n]')
    with pytest.raises(ValueError, match=r"a\.json, line 3: duplicate key 'role'"):
        D.load_records(p)
    p = tmp_path / "b.csv"
    p.write_text("text,text\na,b\n")
    with pytest.raises(ValueError, match=r"b\.csv, line 1: duplicate column"):
        D.load_records(p)


def test_empty_responses_counted_warned_and_refused_when_all(tmp_path, tok):
    rows = _alpaca(6)
    rows[2]["output"] = ""
    rows[4]["output"] = "   "
    p = _jsonl(tmp_path / "a.jsonl", rows)
    origins = []
    records = D.load_records(p, origins=origins)
    examples, stats = D.prepare(records, tok, max_length=64, origins=origins)
    assert stats.empty_responses == 2 and stats.kept == 6
    assert "2 with an empty response" in str(stats)
    (warning,) = stats.warnings()
    assert f"{p}, line 3" in warning and f"{p}, line 5" in warning and "end-of-sequence" in warning
    # Nothing but end-of-sequence tokens to learn: refused, naming the first record.
    p = _jsonl(tmp_path / "b.jsonl", [{"instruction": "x", "output": ""}] * 3)
    origins = []
    records = D.load_records(p, origins=origins)
    with pytest.raises(ValueError, match=rf"no trainable tokens: all 3 records have an empty response \(e\.g\. {p}, "
                                         r"line 1\)"):
        D.prepare(records, tok, max_length=64, origins=origins)
    msgs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    with pytest.raises(ValueError, match="no trainable tokens"):
        D.prepare(msgs, tok, max_length=64)
