"""Reward functions for RL trainers: ``module:function`` loading, safe scoring, the
embedded task's rule reward.

A reward function takes the prompts and the responses (decoded text, the stop token
removed) and returns one float per response::

    def my_reward(prompts: list[str], responses: list[str], **columns) -> list[float]

``columns`` are the prompt records' other fields (e.g. ``label``), passed by name when
the function accepts them (or ``**kwargs``), as TRL does for its reward functions.

Scoring never loses a run to one bad sample: a function that raises, returns the wrong
number of values or a non-finite value is reported with the offending prompt and
response, then the sample is skipped (``on_error="skip"``) or the run stops
(``on_error="stop"``) with that report.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
from pathlib import Path
from typing import Callable, Sequence

RewardFn = Callable[..., Sequence[float]]
ON_ERROR = ("skip", "stop")


class RewardError(ValueError):
    """A reward function failed on a sample (the message names the prompt and response)."""


def load_reward_fn(spec: str) -> RewardFn:
    """``"package.module:function"`` (or ``"path/to/file.py:function"``) -> the callable."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward function {spec!r} must be 'module:function' (e.g. 'my_rewards:score')")
    mod_name, fn_name = spec.split(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise FileNotFoundError(f"reward function file {mod_name!r} does not exist")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except FileNotFoundError:
        raise
    except Exception as e:  # ImportError, or the module's own code failing at import
        raise ValueError(f"reward function {spec!r}: module {mod_name!r} does not import: "
                         f"{type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"reward function {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {fn_name!r} is a {type(fn).__name__}, not a function")
    return fn


def _accepted(fn: RewardFn, columns: dict) -> dict:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return columns
    return {k: v for k, v in columns.items() if k in params}


def _short(text: str, n: int = 200) -> str:
    text = repr(text)
    return text if len(text) <= n else text[: n - 3] + "..."


def call_reward_fn(fn: RewardFn, prompts: Sequence[str], responses: Sequence[str], columns: dict | None = None,
                   *, on_error: str = "skip", log: Callable[[str], None] = print) -> tuple[list[float], list[bool]]:
    """Score every (prompt, response); returns (scores, ok). A failed sample gets score
    0.0 and ok False (``on_error="skip"``), or raises :class:`RewardError` ("stop").

    The batch is scored in one call; when that call raises, each sample is scored alone
    to find the offending one(s)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR)}")
    columns = columns or {}
    n = len(prompts)
    name = getattr(fn, "__qualname__", repr(fn))

    def fail(i: int, why: str) -> None:
        msg = (f"reward function {name} {why} on sample {i}: prompt {_short(prompts[i])}, "
               f"response {_short(responses[i])}")
        if on_error == "stop":
            raise RewardError(msg)
        log(msg + " (sample skipped)")

    def one_call(idx: list[int]):
        kw = {k: [v[i] for i in idx] for k, v in _accepted(fn, columns).items()}
        out = fn([prompts[i] for i in idx], [responses[i] for i in idx], **kw)
        out = list(out)
        if len(out) != len(idx):
            raise RewardError(f"reward function {name} returned {len(out)} values for {len(idx)} responses")
        return out

    try:
        raw = one_call(list(range(n)))
    except RewardError:
        raise
    except Exception:
        raw = []
        for i in range(n):
            try:
                raw.append(one_call([i])[0])
            except RewardError:
                raise
            except Exception as e:
                fail(i, f"raised {type(e).__name__}: {e}")
                raw.append(None)
    scores, ok = [], []
    for i, v in enumerate(raw):
        if v is None:
            scores.append(0.0)
            ok.append(False)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            fail(i, f"returned {v!r}, not a number")
            scores.append(0.0)
            ok.append(False)
            continue
        if not math.isfinite(f):
            fail(i, f"returned {f}")
            scores.append(0.0)
            ok.append(False)
            continue
        scores.append(f)
        ok.append(True)
    return scores, ok


# ------------------------------------------------------------------- the embedded task
RULE_RIGHT, RULE_WRONG, RULE_UNPARSABLE = 1.0, -1.0, -2.0


def healthcare_rule_reward(prompts: Sequence[str], responses: Sequence[str], label: Sequence[str]) -> list[float]:
    """+1 for exactly ``{"category": <the right label>}``, −1 for a ``{"category": …}``
    JSON object with another label, −2 for anything else (what the product cannot parse)."""
    from .defaults.healthcare import parse_answer

    out = []
    for resp, lab in zip(responses, label):
        got = parse_answer(resp)
        if got is not None:
            out.append(RULE_RIGHT if got == lab else RULE_WRONG)
            continue
        try:
            obj = json.loads(resp.strip())
        except (json.JSONDecodeError, AttributeError):
            obj = None
        wrong_label = isinstance(obj, dict) and set(obj) == {"category"} and isinstance(obj["category"], str)
        out.append(RULE_WRONG if wrong_label else RULE_UNPARSABLE)
    return out

