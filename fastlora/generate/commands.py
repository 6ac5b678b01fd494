"""``fastlora generate`` and ``fastlora predict``: a base model with an adapter, answering prompts.

- ``generate``: the base model's answer and the adapter's answer side by side (the
  "before vs after" of a fine-tuning run), greedy by default.
- ``predict``: label-restricted prediction (``fastlora.generate(choices=...)``): the most
  probable allowed answer and its probability; below ``min_confidence`` the example is
  marked for human review.

With no arguments both run on the embedded healthcare task: the default model, the
adapter of the default ``fastlora sft`` run (``runs/sft/adapter``), a few test queries,
the task's system prompt, and (``predict``) its three labels. Prompts come from the
command line, a file (one per line, or JSONL with ``prompt``/``text``/``messages``) or
standard input, in that order of preference. Loading reuses ``fastlora.train.model``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

DEFAULT_ADAPTER = "runs/sft/adapter"


@dataclass
class GenerateConfig:
    prompts: list[str] = field(default_factory=list)
    file: str | None = None
    model: str | None = None  # default: the adapter's base model, else the embedded default
    adapter: str | None = None  # default: runs/sft/adapter (skipped with a note when absent)
    system: str | None = None  # default: the healthcare system prompt on the embedded task
    raw: bool = False  # no chat template: prompts are continued as they are
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    batch_size: int = 16
    compare: bool = True  # also answer without the adapter
    device: str = "auto"
    cache_dir: str | None = None
    # predict
    choices: list[str] | None = None
    min_confidence: float | None = None
    json: bool = False


def read_prompts(cfg: GenerateConfig, stdin=None) -> tuple[list, str]:
    """The prompts (text, or a list of chat messages) and where they came from."""
    if cfg.prompts:
        return list(cfg.prompts), "command line"
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
                if isinstance(rec.get("messages"), list):
                    # drop a trailing assistant answer: the model writes it
                    msgs = [m for m in rec["messages"] if isinstance(m, dict)]
                    while msgs and msgs[-1].get("role") == "assistant":
                        msgs.pop()
                    if not msgs:
                        raise ValueError(f"{path}:{n}: 'messages' has no user turn")
                    out.append(msgs)
                    continue
                text = rec.get("prompt", rec.get("text"))
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: needs a 'prompt', 'text' or 'messages' field")
                out.append(text)
            else:
                out.append(line)
        if not out:
            raise ValueError(f"prompt file {str(path)!r} has no prompt")
        return out, str(path)
    stdin = sys.stdin if stdin is None else stdin
    try:
        lines = [] if stdin is None or stdin.isatty() else [ln.rstrip("\n") for ln in stdin if ln.strip()]
    except (OSError, ValueError):  # a closed or unreadable stdin (e.g. under a test runner): none given
        lines = []
    if lines:
        return lines, "standard input"
    from ..train.defaults.healthcare import load_split

    records = load_split("test")[:5]
    return [[m for m in r["messages"] if m["role"] == "user"][0]["content"] for r in records], \
        "the healthcare test split (first 5)"


def _adapter_dir(cfg: GenerateConfig) -> Path | None:
    """The adapter to load: ``--adapter``, else the default run's when it exists. Any
    ``fastlora sft --peft`` method's: PEFT's directories and our own (bottleneck adapter,
    BitFit: ``fastlora_peft.json``)."""
    from ..train.peft_methods import adapter_config_file

    if cfg.adapter is not None:
        p = Path(cfg.adapter)
        if adapter_config_file(p) is None:
            raise FileNotFoundError(f"adapter {str(p)!r} is not a PEFT adapter directory (no adapter_config.json) "
                                    "nor a fastlora one (no fastlora_peft.json)")
        return p
    p = Path(DEFAULT_ADAPTER)
    return p if adapter_config_file(p) is not None else None


def _adapter_base(adapter: Path) -> str | None:
    from ..train.peft_methods import adapter_config_file

    return json.loads(adapter_config_file(adapter).read_text()).get("base_model_name_or_path")


def _trained_on(adapter: Path, model_path: Path) -> bool:
    """Whether ``adapter`` names ``model_path`` as its base (a base that is not a local
    dir cannot be compared: then it is taken at its word, and a misfit is reported when
    its weights do not load)."""
    base = _adapter_base(adapter)
    if not base or not Path(base).is_dir():
        return True
    return Path(base).resolve() == Path(model_path).resolve()


def model_source(cfg: GenerateConfig, adapter: Path | None) -> tuple[Path, bool]:
    """(the base model dir, whether it is the embedded default). Without ``--model`` the
    base is the adapter's own (``base_model_name_or_path``) when that dir exists, else the
    embedded model. The embedded task's system prompt and labels apply when the base IS
    the embedded model, also when it was found through the default run's adapter (which
    names the converted embedded model's dir)."""
    from ..train.model import resolve_model_path

    model_path = cfg.model
    if model_path is None and adapter is not None:
        base_name = _adapter_base(adapter)
        if base_name and Path(base_name).is_dir():
            model_path = base_name
    path = resolve_model_path(model_path, cfg.cache_dir)
    if cfg.model is not None:
        return path, False
    default = resolve_model_path(None, cfg.cache_dir)
    return path, model_path is None or Path(path).resolve() == Path(default).resolve()


def load_model(cfg: GenerateConfig, log=print):
    """(model, tokenizer, adapter dir or None, embedded task?) ready for fastlora.generate."""
    import fastlora
    from ..train.model import load_base, load_tokenizer, resolve_device, resolve_dtype

    adapter = _adapter_dir(cfg)
    path, embedded = model_source(cfg, adapter)
    skipped = None
    if adapter is not None and cfg.adapter is None and not _trained_on(adapter, path):
        # the default run's adapter belongs to the model it was trained on, not to --model
        skipped, adapter = adapter, None
    device = resolve_device(cfg.device)
    dtype = resolve_dtype("auto", device)
    tok = load_tokenizer(path)
    log(f"model: {path}")
    model = load_base(path, load_in_4bit=True, dtype=dtype, device=device)
    if adapter is not None:
        from ..train.peft_methods import load_trainable

        try:
            model = load_trainable(model, adapter)
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), "")
            raise ValueError(f"adapter {str(adapter)!r} does not fit the model {str(path)!r}: it was trained on "
                             f"{_adapter_base(adapter) or 'another model'} ({first})") from None
        log(f"adapter: {adapter}")
    elif skipped is not None:
        log(f"adapter: none ({skipped} was trained on {_adapter_base(skipped) or 'another model'}, not on "
            f"{path}; pass --adapter DIR to use one)")
    else:
        log(f"adapter: none (no {DEFAULT_ADAPTER}: run `fastlora sft` first, or pass --adapter DIR)")
    fastlora.patch(model)
    return model, tok, adapter, embedded


def render(tok, prompts: Sequence, cfg: GenerateConfig, embedded: bool) -> list[str]:
    system = cfg.system
    if system is None and embedded:
        from ..train.defaults.healthcare import SYSTEM_PROMPT

        system = SYSTEM_PROMPT
    out = []
    for p in prompts:
        if cfg.raw:
            if not isinstance(p, str):
                raise ValueError("--raw needs text prompts, not chat messages")
            out.append(p)
            continue
        msgs = list(p) if not isinstance(p, str) else [{"role": "user", "content": p}]
        if system and msgs[0].get("role") != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def _show(p) -> str:
    text = p if isinstance(p, str) else next((m["content"] for m in reversed(p) if m.get("role") == "user"), "")
    return text if len(text) <= 100 else text[:97] + "..."


def run_generate(cfg: GenerateConfig, out=None) -> list[dict]:
    """Answer the prompts with the adapter (and without it, with ``compare``); prints them."""
    import fastlora

    out = out or sys.stdout
    log = (lambda m: print(m, file=sys.stderr))
    prompts, source = read_prompts(cfg)
    model, tok, adapter, embedded = load_model(cfg, log)
    rendered = render(tok, prompts, cfg, embedded)
    log(f"{len(prompts)} prompt(s) from {source}")
    kw = dict(tokenizer=tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
              top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size, add_special_tokens=cfg.raw)
    tuned = fastlora.generate(model, rendered, **kw).texts
    base = None
    if adapter is not None and cfg.compare:
        from ..train.peft_methods import adapter_disabled

        with adapter_disabled(model):
            base = fastlora.generate(model, rendered, **kw).texts
    rows = []
    for i, p in enumerate(prompts):
        row = {"prompt": p, "answer": tuned[i]}
        if base is not None:
            row["base_answer"] = base[i]
        rows.append(row)
        if cfg.json:
            print(json.dumps(row, ensure_ascii=False), file=out)
        else:
            print(f"[{i + 1}] {_show(p)}", file=out)
            if base is not None:
                print(f"    base model : {base[i]!r}", file=out)
                print(f"    + adapter  : {tuned[i]!r}", file=out)
            else:
                print(f"    answer     : {tuned[i]!r}", file=out)
    return rows


def run_predict(cfg: GenerateConfig, out=None) -> list[dict]:
    """Label-restricted prediction: prints each prompt's label, its probability, and
    whether it goes to human review (probability below ``min_confidence``)."""
    import fastlora
    from .choices import DEFAULT_MIN_CONFIDENCE

    out = out or sys.stdout
    log = (lambda m: print(m, file=sys.stderr))
    threshold = DEFAULT_MIN_CONFIDENCE if cfg.min_confidence is None else cfg.min_confidence
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--min-confidence must be a probability in [0, 1], got {threshold}")
    prompts, source = read_prompts(cfg)
    model, tok, adapter, embedded = load_model(cfg, log)
    if cfg.choices:
        choices, labels = list(cfg.choices), list(cfg.choices)
    elif embedded:
        from ..train.defaults.healthcare import CATEGORIES, answer_of

        choices, labels = [answer_of(c) for c in CATEGORIES], list(CATEGORIES)
    else:
        raise ValueError("--choices is required with --model (the allowed answers, as the model writes them)")
    rendered = render(tok, prompts, cfg, embedded)
    log(f"{len(prompts)} prompt(s) from {source}; choices {labels}; review below {threshold:.2f}")
    res = fastlora.generate(model, rendered, tokenizer=tok, choices=choices, batch_size=cfg.batch_size,
                            add_special_tokens=cfg.raw)
    rows = []
    for i, p in enumerate(prompts):
        c = choices.index(res.predictions[i])
        prob = float(res.choice_probs[i, c])
        row = {"prompt": p, "label": labels[c], "probability": round(prob, 4), "review": prob < threshold,
               "probabilities": {lab: round(float(res.choice_probs[i, j]), 4) for j, lab in enumerate(labels)}}
        rows.append(row)
        if cfg.json:
            print(json.dumps(row, ensure_ascii=False), file=out)
        else:
            flag = "  -> human review" if row["review"] else ""
            print(f"{labels[c]:<14} p={prob:.3f}{flag}   {_show(p)}", file=out)
    n_review = sum(r["review"] for r in rows)
    log(f"{n_review} of {len(rows)} marked for human review (probability < {threshold:.2f})")
    return rows

