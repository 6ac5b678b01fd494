"""The embedded default data: the generated healthcare task (shipped files == generate(),
size, balance, no test/train overlap, variety, answer format) and the general-knowledge set."""
import collections
import json
import re

import pytest

from fastlora.train import data as D
from fastlora.train.defaults import general, healthcare as H
from tests.train import smollm2_tokenizer


@pytest.fixture(scope="module")
def splits():
    return H.generate()


def _query(r):
    return r["messages"][1]["content"]


def _norm(q):
    return re.sub(r"[^a-z0-9]+", " ", q.lower()).strip()


# ---------------------------------------------------------------------------------------------
# healthcare
# ---------------------------------------------------------------------------------------------


def test_shipped_files_equal_generate(splits):
    for name in H.SPLITS:
        shipped = H._data_file(name).read_bytes()
        assert shipped == H.dumps(splits[name]).encode("utf-8"), f"healthcare_{name}.jsonl differs from generate()"
        assert H.load_split(name) == splits[name]


def test_generate_deterministic_and_seeded(splits):
    assert H.generate() == splits
    other = H.generate(seed=1, n=400)
    assert [len(other[s]) for s in H.SPLITS] == [321, 39, 39]  # 133 per class: 107 + 13 + 13
    assert {_query(r) for r in other["train"]} != {_query(r) for r in H.generate(seed=2, n=400)["train"]}
    with pytest.raises(ValueError, match="n must be at least"):
        H.generate(n=10)


def test_size_and_class_balance(splits):
    sizes = {s: len(splits[s]) for s in H.SPLITS}
    assert sum(sizes.values()) >= 2000
    assert sizes == {"train": 1920, "validation": 240, "test": 240}
    assert len(H.CATEGORIES) >= 3 and {"symptoms", "appointment", "billing"} <= set(H.CATEGORIES)
    for s in H.SPLITS:
        counts = collections.Counter(r["label"] for r in splits[s])
        assert set(counts) == set(H.CATEGORIES)
        assert max(counts.values()) == min(counts.values()), (s, counts)
    # shuffled: the labels of a split are not in runs by class
    labels = [r["label"] for r in splits["train"][:40]]
    assert len(set(labels)) == len(H.CATEGORIES)


def test_no_overlap_between_splits(splits):
    keys = {s: [_norm(_query(r)) for r in splits[s]] for s in H.SPLITS}
    all_keys = [k for s in H.SPLITS for k in keys[s]]
    # unique even ignoring case, spacing and punctuation, so certainly no verbatim test query in train
    assert len(set(all_keys)) == len(all_keys)
    assert not set(keys["test"]) & set(keys["train"])
    assert not set(keys["validation"]) & set(keys["train"])


def test_variety(splits):
    queries = [_query(r) for s in H.SPLITS for r in splits[s]]
    assert len(set(queries)) == len(queries) == 2400
    # many different openings and wordings, not a handful of templates
    assert len({" ".join(q.lower().split()[:3]) for q in queries}) >= 400
    assert len({w for q in queries for w in re.findall(r"[a-z]+", q.lower())}) >= 800  # typos add words
    # the perturbations are all present in fair amounts
    assert 0.1 < sum(q == q.lower() for q in queries) / len(queries) < 0.4
    assert 0.01 < sum(q == q.upper() for q in queries) / len(queries) < 0.1
    multi = sum(bool(re.search(r"[.?!] \w", q.replace("Dr. ", "Dr "))) for q in queries)
    assert multi / len(queries) > 0.5  # several sentences: greetings, context, thanks
    assert 0.05 < sum(not re.search(r"[.?!]$", q) for q in queries) / len(queries) < 0.5  # no final punctuation
    # typos: slot and template words recur across 2400 queries, a misspelling almost never does
    counts = collections.Counter(w for q in queries for w in re.findall(r"[a-z]{4,}", q.lower()))
    with_typo = sum(any(counts[w] <= 2 for w in re.findall(r"[a-z]{4,}", q.lower())) for q in queries)
    assert 0.15 < with_typo / len(queries) < 0.6, with_typo


def test_record_structure_and_answers(splits):
    for s in H.SPLITS:
        for r in splits[s]:
            assert set(r) == {"messages", "label"}
            roles = [m["role"] for m in r["messages"]]
            assert roles == ["system", "user", "assistant"]
            assert r["messages"][0]["content"] == H.SYSTEM_PROMPT
            assert r["messages"][2]["content"] == H.answer_of(r["label"])
            assert H.parse_answer(r["messages"][2]["content"]) == r["label"]
            assert r["messages"][1]["content"].strip() == r["messages"][1]["content"] != ""
            assert r["messages"][:2] == H.prompt_messages(r["messages"][1]["content"])
    assert D.detect_format(splits["train"]) == "messages"
    for label in H.CATEGORIES:
        assert label in H.SYSTEM_PROMPT
    assert '{"category": "<category>"}' in H.SYSTEM_PROMPT


def test_answer_of_and_parse_answer():
    assert H.answer_of("billing") == '{"category": "billing"}'
    with pytest.raises(ValueError, match="unknown category 'dental'"):
        H.answer_of("dental")
    assert H.parse_answer('{"category": "symptoms"}') == "symptoms"
    assert H.parse_answer('  {"category":"appointment"}\n') == "appointment"
    for bad in ['{"category": "dental"}', '{"category": "billing", "x": 1}', '{"label": "billing"}', "billing",
                '{"category": "billing"} thanks', '["billing"]', '{"category": ["billing"]}', "", "{", None]:
        assert H.parse_answer(bad) is None, bad
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        H.load_split("dev")


def test_healthcare_records_train_exactly_the_answer():
    """On SmolLM2's tokenizer the trained tokens of a record are its JSON answer and <|im_end|>."""
    tok = smollm2_tokenizer()
    recs = H.load_split("test")[:8]
    examples, stats = D.prepare(recs, tok, max_length=256)
    assert (stats.kept, stats.truncated, stats.dropped_empty) == (8, 0, 0)
    for r, ex in zip(recs, examples):
        trained = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != D.IGNORE_INDEX]
        assert tok.decode(trained) == H.answer_of(r["label"]) + "<|im_end|>"
        assert len(ex["input_ids"]) < 160  # short: the default run trains on 2 CPU cores


def test_write_splits_roundtrip(tmp_path):
    H.write_splits(tmp_path)
    for name in H.SPLITS:
        assert (tmp_path / f"healthcare_{name}.jsonl").read_bytes() == H._data_file(name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"healthcare_{s}.jsonl" for s in H.SPLITS)


# ---------------------------------------------------------------------------------------------
# general
# ---------------------------------------------------------------------------------------------


def test_general_qa():
    qa = general.general_qa()
    assert len(qa) >= 40
    assert len({q["question"] for q in qa}) == len(qa)
    for q in qa:
        assert set(q) == {"question", "answers"}
        assert q["question"].endswith("?") and q["answers"] and all(isinstance(a, str) and a for a in q["answers"])
        # an answer that appears in the question would be matched by an echo of the question
        assert not any(general.answer_matches(q["question"], [a]) for a in q["answers"]), q
    qa[0]["answers"].append("mutated")
    assert "mutated" not in general.general_qa()[0]["answers"]  # callers get copies


@pytest.mark.parametrize("output,answers,ok", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("paris", ["Paris"], True),
    ("PARIS!", ["Paris"], True),
    ("Parisian food is great", ["Paris"], False),
    ("It is Lyon.", ["Paris"], False),
    ("2 + 2 = 4", ["4", "four"], True),
    ("The answer is four.", ["4", "four"], True),
    ("14", ["4", "four"], False),
    ("It is the blue whale.", ["blue whale"], True),
    ("A blue car and a whale", ["blue whale"], False),
    ("", ["Paris"], False),
    ("Paris", "Paris", True),
])
def test_answer_matches(output, answers, ok):
    assert general.answer_matches(output, answers) is ok


def test_general_text():
    texts = general.general_text()
    assert len(texts) >= 3
    assert all(len(t.split()) >= 40 for t in texts)


def test_general_mix_records():
    recs = general.general_mix_records(200, seed=0)
    assert len(recs) == 200
    assert recs == general.general_mix_records(200, seed=0)
    assert recs != general.general_mix_records(200, seed=1)
    assert general.general_mix_records(0) == []
    with pytest.raises(ValueError):
        general.general_mix_records(-1)
    qa_questions = {q["question"] for q in general.general_qa()}
    kinds = collections.Counter()
    for r in recs:
        assert D.detect_format([r]) == "messages"
        (u, a) = r["messages"]
        assert (u["role"], a["role"]) == ("user", "assistant") and a["content"]
        assert u["content"] not in qa_questions  # mixing must not leak the forgetting probe into training
        q = u["content"]
        # the computed answers are right
        if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", q):
            kinds["plus"] += 1
            assert a["content"] == f"{m[1]} plus {m[2]} is {int(m[1]) + int(m[2])}."
        elif m := re.fullmatch(r"What is (\d+) multiplied by (\d+)\?", q):
            kinds["times"] += 1
            assert a["content"].endswith(f" is {int(m[1]) * int(m[2])}.")
        elif q.startswith("Sort these words alphabetically: "):
            kinds["sort"] += 1
            words = q.removeprefix("Sort these words alphabetically: ").rstrip(".").split(", ")
            assert a["content"] == ", ".join(sorted(words))
        elif m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", q):
            kinds["larger"] += 1
            assert a["content"] == f"{max(int(m[1]), int(m[2]))} is larger."
        elif q.startswith("How many words"):
            kinds["count"] += 1
            n = len(q.split(": ", 1)[1].rstrip("?").split())
            assert a["content"] == f"There are {['zero', 'one', 'two', 'three', 'four', 'five'][n]} words."
        else:
            kinds["fact"] += 1
    assert len(kinds) == 6 and min(kinds.values()) >= 10, kinds
    json.dumps(recs)  # plain data, writable as JSONL
