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
import json
import os
import random
from dataclasses import dataclass
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

    def __str__(self) -> str:
        return (
            f"{self.kept}/{self.total} examples kept, {self.truncated} truncated, "
            f"{self.dropped_empty} dropped with no trained token left; "
            f"{self.tokens} tokens, {self.trained_tokens} trained"
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_records(path: str | os.PathLike, *, split: str = "train") -> list[dict]:
    """Read a dataset file into a list of dicts.

    Accepts ``.jsonl`` (one object per line; blank lines skipped), ``.json`` (a list of objects,
    or an object whose ``"data"`` is that list), ``.csv`` (header row = columns), or a directory
    saved by ``datasets`` (``save_to_disk``; for a ``DatasetDict`` the ``split`` is taken).
    Raises FileNotFoundError for a missing path and ValueError, naming the file (and the line
    of a malformed JSONL line), for anything unreadable or empty.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {str(p)!r}")
    if p.is_dir():
        records = _load_saved_dataset(p, split)
    else:
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            records = _load_jsonl(p)
        elif suffix == ".json":
            records = _load_json(p)
        elif suffix == ".csv":
            records = _load_csv(p)
        else:
            raise ValueError(
                f"{p}: unsupported dataset file type {suffix or '(no extension)'!r}; "
                "expected .jsonl, .json, .csv or a directory saved by datasets.save_to_disk"
            )
    if not records:
        raise ValueError(f"{p}: the dataset is empty (no records)")
    return records


# Files are read as utf-8-sig: editors and spreadsheets often start them with a byte-order mark,
# which would otherwise become part of the first column name or a JSON syntax error.


def _load_jsonl(p: Path) -> list[dict]:
    records = []
    with open(p, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}, line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{p}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(obj)
    return records


def _load_json(p: Path) -> list[dict]:
    with open(p, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}, line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise ValueError(
            f"{p}: expected a JSON list of objects or an object with a 'data' list, got {type(obj).__name__}"
        )
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise ValueError(f"{p}: record {i} is a {type(r).__name__}, expected a JSON object")
    return obj


def _load_csv(p: Path) -> list[dict]:
    with open(p, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        records = []
        for r in reader:
            # csv.DictReader stores cells beyond the header under the key None
            if None in r:
                raise ValueError(f"{p}, line {reader.line_num}: more cells than header columns {reader.fieldnames}")
            records.append(dict(r))
    return records


def _load_saved_dataset(p: Path, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise ValueError(f"{p}: directory is not a dataset saved by datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{p}: split {split!r} not found; the dataset has splits {sorted(ds)}")
        ds = ds[split]
    return [dict(r) for r in ds]


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


def detect_format(records: list[dict], fmt: str = "auto") -> str:
    """The format of ``records`` from their columns (the first record's keys), or check ``fmt``.

    Raises ValueError naming the columns found and the formats accepted with their columns.
    """
    if not records:
        raise ValueError("no records to detect the format of (the dataset is empty)")
    if not isinstance(records[0], dict):
        raise ValueError(f"records must be dicts (one per example), got {type(records[0]).__name__}")
    columns = sorted(records[0])
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; accepted: 'auto' or {_accepted()}")
        missing = [c for c in _COLUMNS[fmt][0] if c not in records[0]]
        if missing:
            raise ValueError(
                f"format {fmt!r} needs columns {list(_COLUMNS[fmt][0])} but the records have {columns} "
                f"(missing {missing}); accepted formats: {_accepted()}"
            )
        return fmt
    for name, (req, _) in _COLUMNS.items():
        if all(c in records[0] for c in req):
            return name
    raise ValueError(f"cannot detect the data format from columns {columns}; accepted formats: {_accepted()}")


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


def prepare(records: list[dict], tokenizer, *, fmt: str = "auto", max_length: int = 512) -> tuple[list[dict], PrepStats]:
    """Encode every record; drop those with nothing left to train. Returns (examples, stats).

    Raises ValueError naming the record index when a record is malformed, and when no example
    is left after filtering (with the counts of what was dropped).
    """
    fmt = detect_format(records, fmt)
    stats = PrepStats(total=len(records))
    examples = []
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a context token and a target), got {max_length}")
    for i, r in enumerate(records):
        try:
            full = _encode_full(r, tokenizer, fmt)
        except ValueError as e:
            raise ValueError(f"record {i}: {e}") from None
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
