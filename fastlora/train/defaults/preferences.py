"""The embedded reward-model task: preference pairs for the healthcare routing assistant.

Built deterministically from the shipped healthcare splits (``healthcare.load_split``), so
the pairs of a split never share a query with another split. Each record gives one pair:

- ``chosen``: the correct answer, exactly ``{"category": "<label>"}``;
- ``rejected``, cycling over three kinds (the ``kind`` column):
  - ``wrong_label``: valid JSON with another category;
  - ``unparsable``: rambling prose, extra text around the JSON, or broken JSON;
  - ``unsafe``: medical advice (drugs, doses, "no need to see a doctor") instead of routing.

Rows are chat preference pairs: ``prompt`` (system + user turns) and ``chosen`` /
``rejected`` (one assistant turn each), the conversational format of ``fastlora rm``.
``python -m fastlora.train.defaults.preferences DIR`` writes the splits as JSONL to read.
"""
from __future__ import annotations

import json
import random

from . import healthcare

KINDS = ("wrong_label", "unparsable", "unsafe")

_RAMBLE = [
    "Thanks for reaching out! It sounds like this is about {label}. Let me know if you need anything else.",
    "Based on your message, I would say the category is probably {label}, but I am not completely sure.",
    "The category is {label}.",
    "Sure! Here is the answer: {json} Hope this helps!",
    "{{category: {label}}}",
    '{{"category": "{label}"',
    "category = {label}",
    "I think you should contact the clinic. They will know what to do with your request.",
    "Hmm, that's a good question. There are many possible reasons, and it depends on the details.",
    '```json\n{json}\n```',
    '{{"category": "{label}", "confidence": "high"}}',
    "{label}",
]

_DRUGS = ["ibuprofen", "acetaminophen", "aspirin", "amoxicillin", "prednisone", "codeine", "an antihistamine",
          "your partner's antibiotics", "a double dose of your blood pressure pills", "melatonin"]
_DOSES = ["200 mg", "400 mg", "800 mg", "1000 mg", "two tablets", "three pills", "a full bottle cap"]
_UNSAFE = [
    "You should take {dose} of {drug} every four hours; no need to see a doctor.",
    "Just take {drug} and rest. It is nothing serious, skip the appointment.",
    "That is definitely a minor infection. Start {drug} today, {dose} twice a day.",
    "Don't worry about it. Take {dose} of {drug} and stop any medication your doctor prescribed.",
    "You can treat this at home: {drug}, {dose} at night, and avoid the clinic.",
    "Sounds like anxiety. Take {drug} and ignore the chest pain.",
    "Skip the bill and the visit: buy {drug} online and take {dose} a day.",
]


def _rejected(rng: random.Random, label: str, kind: str) -> str:
    if kind == "wrong_label":
        return healthcare.answer_of(rng.choice([c for c in healthcare.CATEGORIES if c != label]))
    if kind == "unparsable":
        # the right label inside, mostly: what makes it wrong is the form, not the class
        shown = label if rng.random() < 0.7 else rng.choice(healthcare.CATEGORIES)
        return rng.choice(_RAMBLE).format(label=shown, json=healthcare.answer_of(shown))
    return rng.choice(_UNSAFE).format(drug=rng.choice(_DRUGS), dose=rng.choice(_DOSES))


def pairs(split: str, seed: int = 0) -> list[dict]:
    """The preference pairs of a healthcare split, in a fixed order, ``kind`` cycling."""
    rng = random.Random(f"preferences-{split}-{seed}")
    out = []
    for i, rec in enumerate(healthcare.load_split(split)):
        msgs = rec["messages"]
        label = rec["label"]
        kind = KINDS[i % len(KINDS)]
        out.append({
            "prompt": [m for m in msgs if m["role"] != "assistant"],
            "chosen": [{"role": "assistant", "content": healthcare.answer_of(label)}],
            "rejected": [{"role": "assistant", "content": _rejected(rng, label, kind)}],
            "kind": kind,
            "label": label,
        })
    return out


def write_splits(directory) -> None:
    from pathlib import Path

    from ..checkpoint import write_text_atomic

    for split in healthcare.SPLITS:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs(split))
        write_text_atomic(Path(directory) / f"preferences_{split}.jsonl", text)


if __name__ == "__main__":
    import sys

    write_splits(sys.argv[1] if len(sys.argv) > 1 else ".")
