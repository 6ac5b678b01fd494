"""Training data for SFT: load records, detect their format, tokenize with loss masks, pack.

- ``load_records(path)`` reads ``.jsonl`` / ``.json`` / ``.csv`` files or a directory written by
  ``datasets``' ``save_to_disk`` into a list of dicts. Errors name the file (and the line of a
  malformed JSON line).
- ``detect_format(records)`` picks one of ``FORMATS`` from the columns:

  =====================  ========================================  ============================
  format                 columns                                   trained tokens
  =====================  ========================================  ============================
  ``messages``           ``messages`` (list of role/content)       assistant turns + end of turn
  ``alpaca``             ``instruction``, ``output``, [``input``]  ``output`` + EOS
  ``prompt_completion``  ``prompt``, ``completion`` (strings, or    ``completion`` + EOS (or its
                         lists of turns: conversational)           assistant turns)
  ``text``               ``text``                                  every token + EOS
  =====================  ========================================  ============================

- ``encode`` / ``prepare`` return ``{"input_ids", "labels"}`` with ``-100`` on every untrained
  token. Labels are *unshifted* (Hugging Face causal LMs shift them inside the model), so
  ``labels[0]`` is never a target and an example is kept only if some ``labels[1:]`` is trained.
- ``pack`` packs examples padding-free into rows with per-document ``position_ids``; ``collate``
  pads a batch (and, for packed rows, leaves out ``attention_mask``, so that transformers derives
  a block-diagonal mask from ``position_ids``: call the model with ``use_cache=False``).
- ``batch_order`` gives the shuffled batches of an epoch from (seed, epoch) alone, for resume.

Alpaca and plain prompt/completion prompts are tokenized on their own, as ``generate`` will
receive them, and the answer's tokens are appended: no joint tokenization re-merges tokens
across the boundary. Chats are tokenized whole, as the tokenizer's template renders them; with
templates whose turns are delimited by special tokens (SmolLM2, Llama 3, Qwen, ...) the prompt
part is then token for token the generation prompt.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100

FORMATS = ("alpaca", "prompt_completion", "messages", "text")

# columns required (and optional) by each format, in detection priority order
_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}

# The Stanford Alpaca prompt (the format most Alpaca-style datasets were trained with).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{input_clause}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
_ALPACA_INPUT_CLAUSE = ", paired with an input that provides further context"


def render_alpaca(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one record; the response follows it directly."""
    if input:
        return ALPACA_TEMPLATE.format(
            input_clause=_ALPACA_INPUT_CLAUSE, instruction=instruction, input_block=f"### Input:\n{input}\n\n"
        )
    return ALPACA_TEMPLATE.format(input_clause="", instruction=instruction, input_block="")


@dataclass
class PrepStats:
    """What ``prepare`` did to the records; printed in the training log."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    trained_tokens: int = 0
    tokens: int = 0
    empty_responses: int = 0  # records whose answer is empty: they train the end-of-sequence token only
    empty_examples: list = field(default_factory=list)  # where the first few of them are

    def __str__(self) -> str:
        return (
            f"{self.kept}/{self.total} examples kept, {self.truncated} truncated, "
            f"{self.dropped_empty} dropped with no trained token left"
            + (f", {self.empty_responses} with an empty response" if self.empty_responses else "")
            + f"; {self.tokens} tokens, {self.trained_tokens} trained"
        )

    def warnings(self) -> list[str]:
        """Lines worth a warning in the log."""
        if not self.empty_responses:
            return []
        where = "; e.g. " + ", ".join(self.empty_examples) if self.empty_examples else ""
        return [f"{self.empty_responses} of {self.total} records have an empty response: they train only the "
                f"end-of-sequence token{where}"]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_records(path: str | os.PathLike, *, split: str = "train", origins: list[str] | None = None) -> list[dict]:
    """Read a dataset file into a list of dicts.

    Accepts ``.jsonl`` (one object per line; blank lines skipped), ``.json`` (a list of objects,
    or an object whose ``"data"`` is that list), ``.csv`` (header row = columns), or a directory
    saved by ``datasets`` (``save_to_disk``; for a ``DatasetDict`` the ``split`` is taken).
    Raises FileNotFoundError for a missing path and ValueError, naming the file and the line (the
    byte of invalid UTF-8, the CSV row, the ``datasets`` index), for anything unreadable, for
    duplicate JSON keys, and for an empty file.

    ``origins``: when given, one ``"file, line N"`` (``"file, row N (line L)"``, ``"dir, index N"``)
    is appended per record, for error messages that point at the record's source.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {str(p)!r}")
    where: list[str] = []
    if p.is_dir():
        records = _load_saved_dataset(p, split, where)
    else:
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            records = _load_jsonl(p, where)
        elif suffix == ".json":
            records = _load_json(p, where)
        elif suffix == ".csv":
            records = _load_csv(p, where)
        else:
            raise ValueError(
                f"{p}: unsupported dataset file type {suffix or '(no extension)'!r}; "
                "expected .jsonl, .json, .csv or a directory saved by datasets.save_to_disk"
            )
    if not records:
        raise ValueError(f"{p}: the dataset is empty (no records)")
    if origins is not None:
        origins.extend(where)
    return records


# Files are read as utf-8-sig: editors and spreadsheets often start them with a byte-order mark,
# which would otherwise become part of the first column name or a JSON syntax error.


def _decode(p: Path, data: bytes, *, first_line: int = 1, offset: int = 0) -> str:
    """UTF-8 text of ``data`` (a line, or the whole file); invalid bytes are reported by file, line and byte."""
    try:
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        bad = data[e.start:e.end].hex(" ")
        raise ValueError(f"{p}, line {line}, byte {col} (file offset {offset + e.start}): not valid UTF-8 "
                         f"(0x{bad}); save the file as UTF-8") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _parse_json(p: Path, text: str, line: int | None, start: int = 0) -> tuple[Any, int]:
    """One JSON value of ``text`` from ``start``: (value, end). Errors name the file and the line."""
    try:
        return _DECODER.raw_decode(text, start)
    except _DuplicateKey as e:
        at = line if line is not None else text.count("\n", 0, start) + 1
        raise ValueError(f"{p}, line {at}: duplicate key {e.key!r} in a JSON object (the record is ambiguous: "
                         "keep one)") from None
    except json.JSONDecodeError as e:
        at = line if line is not None else e.lineno
        raise ValueError(f"{p}, line {at}: malformed JSON ({e.msg} at column {e.colno})") from None


def _load_jsonl(p: Path, where: list[str]) -> list[dict]:
    records = []
    offset = 0
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(p, raw, first_line=lineno, offset=offset)
            offset += len(raw)
            if not line.strip():
                continue
            obj, end = _parse_json(p, line, lineno, len(line) - len(line.lstrip()))
            if line[end:].strip():
                raise ValueError(f"{p}, line {lineno}: malformed JSON (extra data after the object at column "
                                 f"{end + 1}; one object per line)")
            if not isinstance(obj, dict):
                raise ValueError(f"{p}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(obj)
            where.append(f"{p}, line {lineno}")
    return records


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _load_json(p: Path, where: list[str]) -> list[dict]:
    text = _decode(p, p.read_bytes())
    # Walk the top level by hand so that each record's line is known: a list of objects, or an
    # object whose "data" is that list.
    i = _skip_ws(text, 0)
    items_at = None
    if text.startswith("[", i):
        items_at = i
    elif text.startswith("{", i):
        obj, end = _parse_json(p, text, None, i)  # checks the whole object (duplicate keys included)
        if isinstance(obj.get("data"), list):
            j = _skip_ws(text, i + 1)
            while j < end and text[j] != "}":
                key, j = _DECODER.raw_decode(text, j)
                j = _skip_ws(text, _skip_ws(text, j) + 1)  # past ':'
                if key == "data":
                    items_at = j
                    break
                _, j = _DECODER.raw_decode(text, j)
                j = _skip_ws(text, j)
                j = _skip_ws(text, j + 1) if text[j] == "," else j
        if items_at is None:
            raise ValueError(f"{p}: expected a JSON list of objects or an object with a 'data' list, got an object "
                             f"with keys {sorted(obj)[:10]}")
    else:
        obj, _ = _parse_json(p, text, None, i)
        raise ValueError(f"{p}: expected a JSON list of objects or an object with a 'data' list, got "
                         f"{type(obj).__name__}")
    records = []
    j = _skip_ws(text, items_at + 1)
    while True:
        if j >= len(text):
            raise ValueError(f"{p}, line {text.count(chr(10)) + 1}: malformed JSON (the list is not closed)")
        if text[j] == "]":
            end = j + 1
            break
        line = text.count("\n", 0, j) + 1
        obj, j = _parse_json(p, text, None, j)
        if not isinstance(obj, dict):
            raise ValueError(f"{p}, line {line}: record {len(records)} is a {type(obj).__name__}, expected a JSON "
                             "object")
        records.append(obj)
        where.append(f"{p}, line {line}")
        j = _skip_ws(text, j)
        if j < len(text) and text[j] == ",":
            j = _skip_ws(text, j + 1)
        elif j < len(text) and text[j] != "]":
            raise ValueError(f"{p}, line {text.count(chr(10), 0, j) + 1}: malformed JSON (expected ',' or ']')")
    if items_at == i:  # a top-level list: nothing may follow it
        rest = _skip_ws(text, end)
        if rest < len(text):
            line = text.count("\n", 0, rest) + 1
            raise ValueError(f"{p}, line {line}: malformed JSON (extra data after the list)")
    return records


def _load_csv(p: Path, where: list[str]) -> list[dict]:
    text = _decode(p, p.read_bytes())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None:
            return []
        dupes = sorted({c for c in reader.fieldnames if reader.fieldnames.count(c) > 1})
        if dupes:
            raise ValueError(f"{p}, line 1: duplicate column(s) {dupes} in the header")
        records = []
        start = reader.line_num + 1
        for row, r in enumerate(reader, start=1):
            # csv.DictReader stores cells beyond the header under the key None
            if None in r:
                raise ValueError(f"{p}, row {row} (line {start}): more cells than header columns {reader.fieldnames}")
            records.append(dict(r))
            where.append(f"{p}, row {row} (line {start})")
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{p}, line {reader.line_num}: malformed CSV ({e})") from None
    return records


def _load_saved_dataset(p: Path, split: str, where: list[str]) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise ValueError(f"{p}: directory is not a dataset saved by datasets.save_to_disk ({e})") from None
    label = p
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{p}: split {split!r} not found; the dataset has splits {sorted(ds)}")
        ds = ds[split]
        label = f"{p} (split {split!r})"
    records = [dict(r) for r in ds]
    where.extend(f"{label}, index {i}" for i in range(len(records)))
    return records


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------


def _accepted() -> str:
    parts = []
    for fmt, (req, opt) in _COLUMNS.items():
        cols = ", ".join(repr(c) for c in req)
        if opt:
            cols += ", optional " + ", ".join(repr(c) for c in opt)
        parts.append(f"{fmt} ({cols})")
    return "; ".join(parts)


def _matches(record: Any, fmt: str) -> bool:
    return isinstance(record, dict) and all(c in record for c in _COLUMNS[fmt][0])


def detect_format(records: list[dict], fmt: str = "auto", *, origins: list[str] | None = None) -> str:
    """The format of ``records`` from their columns, or check ``fmt``.

    ``auto`` takes the format of the first record; if that record matches none, the format most
    records match (so that one bad first line is reported as such by :func:`check_records`).
    Raises ValueError naming the columns found (and, with ``origins``, the record's file and
    line) and the formats accepted with their columns.
    """
    if not records:
        raise ValueError("no records to detect the format of (the dataset is empty)")
    if not isinstance(records[0], dict):
        raise ValueError(f"records must be dicts (one per example), got {type(records[0]).__name__}")
    columns = sorted(records[0])
    at = f"{origins[0]}: " if origins else ""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; accepted: 'auto' or {_accepted()}")
        missing = [c for c in _COLUMNS[fmt][0] if c not in records[0]]
        if missing and not origins:
            raise ValueError(
                f"format {fmt!r} needs columns {list(_COLUMNS[fmt][0])} but the records have {columns} "
                f"(missing {missing}); accepted formats: {_accepted()}"
            )
        return fmt  # with origins, check_records names every record that does not fit
    for name in _COLUMNS:
        if _matches(records[0], name):
            return name
    sample = records[:1000]
    counts = {name: sum(_matches(r, name) for r in sample) for name in _COLUMNS}
    best = max(counts, key=lambda n: counts[n])
    if counts[best] * 2 > len(sample):
        return best
    raise ValueError(f"{at}cannot detect the data format from columns {columns}; accepted formats: {_accepted()}")


def record_problem(record: Any, fmt: str) -> str | None:
    """What makes ``record`` unusable as ``fmt`` data (missing column, wrong type), or None. No tokenizer needed."""
    if not isinstance(record, dict):
        return f"expected a record (JSON object), got {type(record).__name__}"
    missing = [c for c in _COLUMNS[fmt][0] if c not in record]
    if missing:
        return (f"{fmt} record is missing column(s) {missing}; it has {sorted(record)} "
                f"(format {fmt!r} needs {list(_COLUMNS[fmt][0])})")
    try:
        if fmt == "text":
            _require_str(record, "text", fmt)
        elif fmt == "alpaca":
            _require_str(record, "instruction", fmt)
            _require_str(record, "input", fmt, optional=True)
            _require_str(record, "output", fmt)
        elif fmt == "prompt_completion":
            prompt, completion = record["prompt"], record["completion"]
            if isinstance(prompt, list) or isinstance(completion, list):
                _check_messages(prompt)
                _check_messages(completion)
            else:
                _require_str(record, "prompt", fmt)
                _require_str(record, "completion", fmt)
        else:
            _check_messages(record["messages"])
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def check_records(records: list[dict], fmt: str, origins: list[str] | None = None) -> None:
    """Check every record against ``fmt`` before anything else happens (splitting, tokenizing):
    the first bad one is named by file and line (``origins``) or by index."""
    for i, r in enumerate(records):
        problem = record_problem(r, fmt)
        if problem is not None:
            at = origins[i] if origins and i < len(origins) else f"record {i}"
            if i == 0 and "missing column" in problem:  # likely the wrong --data-format, not one bad record
                problem += f"; accepted formats: {_accepted()}"
            raise ValueError(f"{at}: {problem}")


def response_is_empty(record: dict, fmt: str) -> bool:
    """True when the part of ``record`` that is trained (the answer) is empty or blank."""
    if fmt == "text":
        return not str(record.get("text", "")).strip()
    if fmt == "alpaca":
        return not str(record.get("output", "")).strip()
    if fmt == "prompt_completion":
        c = record.get("completion")
        if isinstance(c, list):
            return not any(isinstance(m, dict) and str(m.get("content", "")).strip() for m in c)
        return not str(c or "").strip()
    turns = [m for m in record.get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant"]
    return not any(str(m.get("content", "")).strip() for m in turns)


# --------------------------------------------------------------------------------------------
# Tokenization with loss masks
# --------------------------------------------------------------------------------------------


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; set one so the model learns to stop")
    return int(eos)


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _require_str(record: dict, key: str, fmt: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{fmt} record: column {key!r} must be a string, got {type(value).__name__}")
    return value


def _prompt_answer(prompt_ids: list[int], answer_ids: list[int]) -> dict:
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)}


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages record: 'messages' must be a non-empty list of turns, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages record: turn {i} must be {{'role': str, 'content': str}}, got {m!r:.80}")
    return messages


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode_messages(messages: list[dict], tokenizer) -> dict:
    """Render the whole chat once with the tokenizer's template, tokenize it once, and train the
    tokens of each assistant turn: from its content to its end-of-turn token.

    Turn boundaries come from rendering prefixes of the chat as text: assistant turn i ends where
    ``render(messages[:i+1])`` ends, and its content is the last occurrence of the content in
    that prefix, after ``render(messages[:i])`` (or, for templates that rewrite the content, e.g.
    by trimming it, right after the generation prompt). Whatever the template puts after the
    end-of-turn (EOS) token, such as a newline, is not trained: the model stops at EOS, so it
    never generates it.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; cannot render 'messages' data")
    if not getattr(tokenizer, "is_fast", False):
        # token boundaries are found from character offsets, which only fast tokenizers give
        raise TypeError(f"'messages' data needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    eos = _eos_id(tokenizer)
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []  # (start_char, end_char) of each assistant turn in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prev = _render(tokenizer, messages[:i], generation_prompt=False) if i else ""
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (full.startswith(through) and through.startswith(prev)):
            # e.g. templates that rewrite earlier turns once a later one exists
            raise ValueError(
                f"messages record: the chat template does not render assistant turn {i} as a prefix of the "
                "whole chat, so its tokens cannot be located; use prompt_completion data instead"
            )
        start = through.rfind(m["content"]) if m["content"] else -1
        if start < len(prev):
            gen = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
            if not (i and through.startswith(gen)):
                raise ValueError(
                    f"messages record: cannot locate the content of assistant turn {i} in the rendered chat "
                    "template; use prompt_completion data instead"
                )
            start = len(gen)
        spans.append((start, len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        turn = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > max(a, start)]
        eos_at = [t for t in turn if ids[t] == eos]
        if eos_at:
            turn = [t for t in turn if t <= eos_at[-1]]
        for t in turn:
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels}


def _encode_full(record: dict, tokenizer, fmt: str) -> dict:
    """``encode`` without truncation."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; accepted: {FORMATS}")
    if not isinstance(record, dict):
        raise ValueError(f"expected a record dict, got {type(record).__name__}")
    missing = [c for c in _COLUMNS[fmt][0] if c not in record]
    if missing:
        raise ValueError(f"{fmt} record is missing columns {missing}; it has {sorted(record)}")
    eos = _eos_id(tokenizer)
    if fmt == "text":
        ids = _ids(tokenizer, _require_str(record, "text", fmt), special=True) + [eos]
        return {"input_ids": ids, "labels": list(ids)}
    if fmt == "alpaca":
        prompt = render_alpaca(
            _require_str(record, "instruction", fmt), _require_str(record, "input", fmt, optional=True)
        )
        answer = _require_str(record, "output", fmt)
        return _prompt_answer(_ids(tokenizer, prompt, special=True), _ids(tokenizer, answer, special=False) + [eos])
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            # conversational prompt/completion: the completion turns are the assistant's
            return _encode_messages(_check_messages(prompt) + _check_messages(completion), tokenizer)
        prompt = _require_str(record, "prompt", fmt)
        completion = _require_str(record, "completion", fmt)
        return _prompt_answer(_ids(tokenizer, prompt, special=True), _ids(tokenizer, completion, special=False) + [eos])
    return _encode_messages(_check_messages(record["messages"]), tokenizer)


def _has_target(labels: list[int]) -> bool:
    return any(x != IGNORE_INDEX for x in labels[1:])


def encode(record: dict, tokenizer, fmt: str, *, max_length: int) -> dict | None:
    """Tokenize one record and mask what is not trained.

    Returns ``{"input_ids": list[int], "labels": list[int]}`` (same length, ``-100`` on prompt,
    system and user tokens), truncated on the right to ``max_length`` tokens, or ``None`` when
    no trained target is left (only ``labels[1:]`` are ever targets, after the model's shift).
    The EOS / end-of-turn token after each answer is trained so that the model learns to stop.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a context token and a target), got {max_length}")
    out = _encode_full(record, tokenizer, fmt)
    out = {"input_ids": out["input_ids"][:max_length], "labels": out["labels"][:max_length]}
    return out if _has_target(out["labels"]) else None


def prepare(records: list[dict], tokenizer, *, fmt: str = "auto", max_length: int = 512,
            origins: list[str] | None = None) -> tuple[list[dict], PrepStats]:
    """Encode every record; drop those with nothing left to train. Returns (examples, stats).

    Raises ValueError naming the record (its file and line when ``origins`` is given, else its
    index) when a record is malformed, when no example is left after filtering (with the counts
    of what was dropped), and when every response is empty (nothing to learn but the
    end-of-sequence token). Empty responses among others are counted in ``stats``.
    """
    fmt = detect_format(records, fmt)
    stats = PrepStats(total=len(records))
    examples = []
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a context token and a target), got {max_length}")

    def at(i: int) -> str:
        return origins[i] if origins and i < len(origins) else f"record {i}"

    for i, r in enumerate(records):
        try:
            full = _encode_full(r, tokenizer, fmt)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{at(i)}: {e}") from None
        if response_is_empty(r, fmt):
            stats.empty_responses += 1
            if len(stats.empty_examples) < 3:
                stats.empty_examples.append(at(i))
        ex = {"input_ids": full["input_ids"][:max_length], "labels": full["labels"][:max_length]}
        if not _has_target(ex["labels"]):
            stats.dropped_empty += 1
            continue
        stats.truncated += len(full["input_ids"]) > max_length
        stats.tokens += len(ex["input_ids"])
        stats.trained_tokens += sum(x != IGNORE_INDEX for x in ex["labels"][1:])
        examples.append(ex)
    stats.kept = len(examples)
    if not examples:
        raise ValueError(
            f"the dataset is empty after filtering: all {stats.total} records were dropped because no "
            f"trained token was left within max_length={max_length}; raise max_length or check the answer columns"
        )
    if stats.empty_responses == stats.total:
        raise ValueError(
            f"no trainable tokens: all {stats.total} records have an empty response (e.g. {at(0)}), so training "
            "would only teach the model to stop at once; fill the answer column "
            + {"alpaca": "'output'", "prompt_completion": "'completion'", "messages": "(the assistant turns)",
               "text": "'text'"}[fmt]
        )
    return examples, stats


# --------------------------------------------------------------------------------------------
# Packing, batching, collation
# --------------------------------------------------------------------------------------------


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Pack examples into rows of at most ``max_length`` tokens, best-fit decreasing.

    Each row has ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0 for each
    document), plus ``seq_lengths``. The label of each document's first token is set to -100:
    the model shifts labels, so that label would be the target of the previous document's last
    token, a pair that never occurs in unpacked training. Deterministic for a given input order.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than the packing max_length={max_length}")
        if n == 0:
            raise ValueError(f"example {i} is empty")
    # longest first; ties by original index so the result is deterministic
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row), sorted: the best fit is a bisection away
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))  # the fullest row that still has room
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
        else:
            space, row = free.pop(at)
            bins[row].append(i)
            bisect.insort(free, (space - n, row))
    rows = []
    for members in bins:
        ids, labels, pos, lens = [], [], [], []
        for i in members:
            ex = examples[i]
            n = len(ex["input_ids"])
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX] + list(ex["labels"][1:])
            pos += range(n)
            lens.append(n)
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "seq_lengths": lens})
    return rows


def batch_order(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Indices of ``n`` examples split into batches of ``batch_size`` (the last may be smaller),
    shuffled by a generator seeded from (seed, epoch) only, so a resumed run sees the same order."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    idx = list(range(n))
    if shuffle:
        # random.Random(int) and shuffle are stable across Python versions and platforms
        random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return [idx[i : i + batch_size] for i in range(0, n, batch_size)]


def collate(examples: list[dict], pad_token_id: int):
    """Right-pad a batch into tensors.

    Unpacked examples give ``input_ids`` (padded with ``pad_token_id``), ``labels`` (padded with
    -100) and ``attention_mask`` (B, T). Packed rows (with ``position_ids``) give ``input_ids``,
    ``labels`` and ``position_ids`` and NO ``attention_mask``: transformers then builds a
    block-diagonal causal mask from where ``position_ids`` restart, so documents never attend to
    each other. Padding continues as a separate pseudo-document (positions 0, 1, ...).

    The model must then be called with ``use_cache=False``: transformers only looks for packed
    sequences when no cache is passed, and with the config default ``use_cache=True`` it creates
    one and silently lets documents attend across boundaries.
    """
    import torch

    if not examples:
        raise ValueError("cannot collate an empty batch")
    packed = "position_ids" in examples[0]
    if any(("position_ids" in ex) != packed for ex in examples):
        raise ValueError("cannot collate packed and unpacked examples in the same batch")
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    if packed:
        pos = torch.zeros((len(examples), width), dtype=torch.long)
    else:
        mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"example {b}: {n} input_ids but {len(ex['labels'])} labels")
        ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        if packed:
            pos[b, :n] = torch.tensor(ex["position_ids"], dtype=torch.long)
            pos[b, n:] = torch.arange(width - n)
        else:
            mask[b, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
