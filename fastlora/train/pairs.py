"""Preference data for reward models: load, check, tokenize, truncate, collate.

Files are read by ``data.load_records`` (JSONL, JSON, CSV or a ``datasets`` folder). Rows:

==================  ===============================================  =========================
format              columns                                          scored sequence
==================  ===============================================  =========================
``pairs``           ``prompt``, ``chosen``, ``rejected`` (strings)   prompt + response
``chat_pairs``      ``chosen``, ``rejected`` as message lists,       the chat template's
                    [``prompt`` as a message list]                   rendering of the whole chat
``unpaired``        ``prompt``, ``completion``, ``label`` (bool:     paired per prompt: every
                    desirable or not)                                desirable x undesirable
==================  ===============================================  =========================

An optional ``margin`` column (a number) is the gap the chosen score must win by.

A chat pair ``chosen`` may be the whole conversation (prompt turns included) or only the
answer turns with the conversation in ``prompt``. Plain-string pairs get no EOS appended:
the score is read at the response's last token, which with ``pad_token == eos`` (common)
is also where transformers' sequence classifiers read it.

Truncation keeps the END of each sequence (the response's last tokens, where the preference
shows); the start of the prompt goes first. The number of truncated sequences is reported.

Every bad row is named by file and line (JSONL), row (CSV) or record index: a missing field,
a response that is empty, a chosen equal to its rejected, a margin that is not a number, and
an unpaired file holding one class of outcome only.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

FORMATS = ("pairs", "chat_pairs", "unpaired")


@dataclasses.dataclass
class PairStats:
    pairs: int = 0
    sequences: int = 0
    truncated: int = 0
    tokens: int = 0
    longest: int = 0

    def __str__(self) -> str:
        return (f"{self.pairs} pairs ({self.sequences} sequences, {self.tokens} tokens, longest {self.longest}), "
                f"{self.truncated} sequences truncated (their start dropped)")


# ------------------------------------------------------------------ where a row lives
def _locator(path: Path) -> Callable[[int], str]:
    """record index -> "file, line N" (JSONL; blank lines skipped as the loader does),
    "file, row N (line M)" (CSV, header = line 1), "file, record N" otherwise."""
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        lines = []
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    lines.append(n)
        return lambda i: f"{path}, line {lines[i]}" if i < len(lines) else f"{path}, record {i}"
    if path.is_file() and suffix == ".csv":
        return lambda i: f"{path}, row {i + 1} (line {i + 2})"
    return lambda i: f"{path}, record {i}"


def load_pairs(paths: list[str]) -> list[dict]:
    """Records of every file, each with ``_where`` (its file and line) for error messages."""
    from .data import load_records

    out = []
    for p in paths:
        records = load_records(p)
        where = _locator(Path(p))
        for i, r in enumerate(records):
            r = dict(r)
            r["_where"] = where(i)
            out.append(r)
    return out


# ------------------------------------------------------------------ formats and checks
def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def detect_format(records: list[dict]) -> str:
    if not records:
        raise ValueError("no preference records (the dataset is empty)")
    first = records[0]
    where = first.get("_where", "record 0")
    cols = sorted(k for k in first if k != "_where")
    if "completion" in first and "label" in first and "chosen" not in first:
        return "unpaired"
    if "chosen" in first and "rejected" in first:
        return "chat_pairs" if _is_messages(first["chosen"]) else "pairs"
    raise ValueError(f"{where}: cannot tell the preference format from columns {cols}; expected 'prompt', "
                     "'chosen', 'rejected' (strings or message lists, optional 'margin'), or unpaired "
                     "'prompt', 'completion', 'label'")


def _text_of(v: Any) -> str:
    if isinstance(v, str):
        return v
    return "".join(str(m.get("content", "")) for m in v if m.get("role") == "assistant") if _is_messages(v) else ""


def check_pairs(records: list[dict], fmt: str) -> list[dict]:
    """Validate every row (named by file and line) and return normalized pairs
    ``{"prompt", "chosen", "rejected", "margin", "_where", ...other columns}``."""
    if fmt == "unpaired":
        return _pair_unpaired(records)
    out = []
    for r in records:
        where = r.get("_where", "record")
        for col in ("chosen", "rejected") + (("prompt",) if fmt == "pairs" else ()):
            if col not in r or r[col] is None:
                raise ValueError(f"{where}: missing field {col!r} (the row has {sorted(k for k in r if k != '_where')})")
        for col in ("chosen", "rejected"):
            v = r[col]
            if fmt == "pairs" and not isinstance(v, str):
                raise ValueError(f"{where}: {col!r} must be a string like the first row's, got {type(v).__name__}")
            if fmt == "chat_pairs" and not _is_messages(v):
                raise ValueError(f"{where}: {col!r} must be a list of {{'role', 'content'}} messages")
            if not _text_of(v).strip():
                raise ValueError(f"{where}: the {col} response is empty")
        if fmt == "pairs" and not isinstance(r["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {type(r['prompt']).__name__}")
        if fmt == "chat_pairs" and r.get("prompt") is not None and not _is_messages(r["prompt"]):
            raise ValueError(f"{where}: 'prompt' must be a list of {{'role', 'content'}} messages")
        if r["chosen"] == r["rejected"]:
            raise ValueError(f"{where}: chosen and rejected are the same response; a pair needs two different ones")
        out.append({**r, "margin": _margin(r, where)})
    return out


def _margin(r: dict, where: str) -> float:
    m = r.get("margin")
    if m is None or m == "":
        return 0.0
    try:
        value = float(m)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: margin {m!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: margin {m!r} is not finite")
    return value


def _label(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise ValueError(f"{where}: label {v!r} must be true or false (desirable or not)")


def _pair_unpaired(records: list[dict]) -> list[dict]:
    groups: dict[str, dict[bool, list[dict]]] = {}
    for r in records:
        where = r.get("_where", "record")
        for col in ("prompt", "completion", "label"):
            if col not in r or r[col] is None:
                raise ValueError(f"{where}: missing field {col!r} (the row has {sorted(k for k in r if k != '_where')})")
        if not isinstance(r["completion"], str) or not r["completion"].strip():
            raise ValueError(f"{where}: the completion is empty")
        good = _label(r["label"], where)
        groups.setdefault(str(r["prompt"]), {True: [], False: []})[good].append(r)
    classes = {k for g in groups.values() for k, v in g.items() if v}
    if len(classes) < 2:
        only = "desirable (label true)" if True in classes else "undesirable (label false)"
        first = records[0].get("_where", "the file").rsplit(",", 1)[0]
        raise ValueError(f"{first}: every row is {only}: a reward model needs both outcomes to rank "
                         "(one class of outcome only)")
    out = []
    for prompt, g in groups.items():
        for c in g[True]:
            for rj in g[False]:
                if c["completion"] == rj["completion"]:
                    raise ValueError(f"{c['_where']} and {rj['_where']}: the same completion is both desirable "
                                     "and undesirable")
                out.append({"prompt": prompt, "chosen": c["completion"], "rejected": rj["completion"],
                            "margin": 0.0, "_where": c["_where"]})
    if not out:
        raise ValueError(f"{records[0].get('_where', 'the file').rsplit(',', 1)[0]}: no prompt has both a desirable "
                         "and an undesirable completion, so no pair can be formed")
    return out


# ------------------------------------------------------------------ tokenization
def _render_chat(tokenizer, prompt, response) -> str:
    msgs = list(prompt or []) + list(response)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; cannot render chat pairs")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)


def encode_sequence(tokenizer, fmt: str, prompt, response) -> list[int]:
    """Token ids of prompt + response as the reward model scores them (untruncated)."""
    if fmt == "chat_pairs":
        return list(tokenizer(_render_chat(tokenizer, prompt, response), add_special_tokens=False)["input_ids"])
    # tokenized apart, as generate() sees a prompt and then appends the response's tokens
    return (list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            + list(tokenizer(response, add_special_tokens=False)["input_ids"]))


def encode_pairs(pairs: list[dict], tokenizer, fmt: str, *, max_length: int) -> tuple[list[dict], PairStats]:
    """Tokenize each pair: ``{"chosen_ids", "rejected_ids", "margin", ...}``, keeping the LAST
    ``max_length`` tokens of each sequence."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if fmt == "unpaired":
        fmt = "pairs"
    stats = PairStats(pairs=len(pairs))
    out = []
    for p in pairs:
        item = {"margin": p["margin"]}
        for side in ("chosen", "rejected"):
            ids = encode_sequence(tokenizer, fmt, p.get("prompt"), p[side])
            if len(ids) > max_length:
                stats.truncated += 1
                ids = ids[-max_length:]
            stats.sequences += 1
            stats.tokens += len(ids)
            stats.longest = max(stats.longest, len(ids))
            item[f"{side}_ids"] = ids
        c, r = item["chosen_ids"], item["rejected_ids"]
        if c == r:
            raise ValueError(f"{p.get('_where', 'a pair')}: chosen and rejected are identical after truncation to "
                             f"the last {max_length} tokens; raise max_length")
        for k in ("kind", "_where"):
            if k in p:
                item[k] = p[k]
        out.append(item)
    return out, stats


def _pad(seqs: list[list[int]], pad_token_id: int, *, left: bool = False):
    """(N, L) ids and 0/1 mask of ``seqs``, padded on the right (or the left)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        at = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, at] = torch.tensor(s, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


def _margins(items: list[dict]):
    import torch

    return torch.tensor([float(it["margin"]) for it in items], dtype=torch.float32)


def collate_pairs(items: list[dict], pad_token_id: int):
    """(2B, L) right-padded ``input_ids`` and ``attention_mask``: the B chosen sequences, then
    the B rejected ones; and the (B,) margins."""
    seqs = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    ids, mask = _pad(seqs, pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "margin": _margins(items)}
