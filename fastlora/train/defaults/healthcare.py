"""The embedded default task: route a patient's message to a clinic desk.

The model reads a patient query and answers exactly ``{"category": "<label>"}``. The data is
generated here, deterministically, from templates x slot values, with politeness, context
sentences, casing changes and typos, and shipped as JSONL in ``defaults/data/``
(``python -m fastlora.train.defaults.healthcare`` rewrites those files; a test checks that
``generate()`` reproduces them byte for byte).

Each category has its own vocabulary of intents (a symptom, a visit to book, a charge), so the task is learnable by a small model in a few dozen steps, while
shared context sentences ("I'm a patient of Dr. Patel") and shared objects ("my check-up" can
be booked or billed) make it depend on the intent, not on a single keyword.
"""
from __future__ import annotations

import json
import random
import re
from importlib import resources

# Three desks. A fourth ("prescription": refills, pharmacy, dosing) was tried: SmolLM2-135M
# (float32) + LoRA r=16 answered only 32 of 40 test queries right after 30 steps of batch 8, too
# slow a start for the 95% target of the default run on 2 CPU cores.
CATEGORIES = ("symptoms", "appointment", "billing")

# Short on purpose: it is in every training example, and the default run trains on 2 CPU cores.
SYSTEM_PROMPT = (
    "Classify the patient message as symptoms, appointment or billing. "
    'Reply with only JSON: {"category": "<category>"}'
)
# the same task statement, for prompt/completion or Alpaca-style use
INSTRUCTION = SYSTEM_PROMPT

SPLITS = ("train", "validation", "test")
_FRACTIONS = (0.8, 0.1, 0.1)


def answer_of(label: str) -> str:
    """The exact answer text the model must produce for ``label``."""
    if label not in CATEGORIES:
        raise ValueError(f"unknown category {label!r}; expected one of {CATEGORIES}")
    return json.dumps({"category": label})


def parse_answer(text: str) -> str | None:
    """The category in a model output that is exactly one JSON object ``{"category": <label>}``
    (surrounding whitespace allowed), else None. Anything else (extra text, other keys, an
    unknown label) is wrong: the product parses this output."""
    try:
        obj = json.loads(text.strip())
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(obj, dict) or set(obj) != {"category"}:
        return None
    label = obj["category"]
    return label if isinstance(label, str) and label in CATEGORIES else None


# --------------------------------------------------------------------------------------------
# Slot values
# --------------------------------------------------------------------------------------------

_DOCTORS = ["Patel", "Nguyen", "Smith", "Garcia", "Okafor", "Kim", "Rossi", "Cohen", "Murphy", "Schmidt", "Lopez", "Chen"]
_FIRST = ["Maria", "John", "Aisha", "Wei", "Carlos", "Emma", "Liam", "Fatima", "Olga", "David", "Priya", "Tom", "Grace", "Yusuf"]
_LAST = ["Johnson", "Brown", "Silva", "Wang", "Ahmed", "Miller", "Novak", "Davis", "Kowalski", "Singh", "Baker", "Moreau"]
_WHO = [("I", "I have", "my"), ("my son", "my son has", "his"), ("my daughter", "my daughter has", "her"),
        ("my husband", "my husband has", "his"), ("my wife", "my wife has", "her"), ("my mom", "my mom has", "her"),
        ("my dad", "my dad has", "his"), ("my little boy", "my little boy has", "his"), ("my grandmother", "my grandmother has", "her")]

_SYMPTOMS = [
    "a headache", "a bad headache", "a migraine", "a fever", "a high fever", "a sore throat", "a cough",
    "a dry cough", "chest pain", "a tight chest", "back pain", "lower back pain", "stomach pain",
    "stomach cramps", "nausea", "diarrhea", "a rash", "an itchy rash on the arm", "dizziness",
    "shortness of breath", "a runny nose", "ear pain", "an earache", "joint pain", "a swollen knee",
    "swollen ankles", "blurry vision", "red itchy eyes", "a toothache", "numbness in the fingers",
    "heart palpitations", "chills", "a stiff neck", "vomiting", "trouble sleeping", "constant fatigue",
    "a burning feeling when peeing", "wheezing", "a nosebleed that keeps coming back", "a sprained ankle",
    "heartburn", "a lump under the arm", "hives", "sinus pressure", "a pounding heartbeat",
]
_DURATIONS = [
    "since yesterday", "for three days", "for a week", "since last night", "for two weeks", "on and off for a month",
    "since this morning", "for a few hours", "since Monday", "for about ten days", "ever since the weekend",
]
_TRIGGERS = ["eating", "exercising", "waking up", "climbing stairs", "a long flight", "working in the garden",
             "a cold shower", "drinking coffee", "lifting boxes", "a day at the beach"]
_SEVERITY = ["It is getting worse.", "It is mild but annoying.", "It is really bad today.", "It comes and goes.",
             "Painkillers did not help.", "It is worse at night.", "I also feel weak.", "Now it hurts to move."]

_VISITS = [
    "an appointment", "a check-up", "my annual check-up", "a physical", "a follow-up visit", "a consultation",
    "a vaccination appointment", "a flu shot", "a visit with Dr. {doc}", "a telehealth call", "a well-child visit",
    "a prenatal visit", "an eye exam", "a skin check", "a blood draw", "a new patient visit", "a video visit",
]
_TIMES = [
    "tomorrow", "tomorrow morning", "next Tuesday", "this Friday", "on Friday afternoon", "next week",
    "on the 14th", "on March 3rd", "early next month", "this Thursday at 10", "Monday at 3 pm",
    "sometime after 5 pm", "this weekend", "the first week of June", "as soon as possible", "on Wednesday",
]
_BOOK = ["book", "schedule", "make", "set up", "get"]
_CHANGE = ["reschedule", "move", "change the time of", "push back", "bring forward"]
_CANCEL = ["cancel", "call off"]

_SERVICES = [
    "my last visit", "my check-up on the 3rd", "the blood work", "an X-ray", "the lab tests", "my physical",
    "the urgent care visit", "the MRI", "my daughter's vaccination", "the telehealth call", "the allergy test",
    "the ultrasound", "my son's check-up", "the ambulance ride", "the stitches",
]
_AMOUNTS = ["$45", "$120", "$250", "$89.50", "$1,200", "$30", "$615", "$75", "$2,340", "$18", "$400", "$160"]
_BILL_THINGS = ["my bill", "my statement", "this invoice", "the bill I got in the mail", "my balance",
                "the charge on my card", "my account balance", "the latest statement"]
_INSURERS = ["Aetna", "Blue Cross", "Cigna", "my insurance", "Medicare", "Medicaid", "my employer's plan", "United"]

def _fill(rng: random.Random, values: list[str]) -> str:
    return rng.choice(values).replace("{doc}", rng.choice(_DOCTORS))


def _my(thing: str) -> str:
    """'my' + the thing without its own article ("an eye exam" -> "my eye exam")."""
    for article in ("my ", "an ", "a "):
        if thing.startswith(article):
            thing = thing[len(article):]
            break
    return "my " + thing


# --------------------------------------------------------------------------------------------
# Templates: each is a function of the rng so slots can depend on each other
# --------------------------------------------------------------------------------------------


def _symptoms(rng: random.Random) -> str:
    who, has, _ = rng.choice(_WHO)
    s, s2 = rng.sample(_SYMPTOMS, 2)
    d = rng.choice(_DURATIONS)
    t = rng.choice(_TRIGGERS)
    if who == "I":
        forms = [
            f"I've had {s} {d}, should I be worried?",
            f"I have {s} {d}. What should I do?",
            f"I keep getting {s} after {t}.",
            f"Woke up with {s} and {s2}. Is that serious?",
            f"What could be causing {s}? I've had it {d}.",
            f"I'm experiencing {s} and {s2} {d}.",
            f"Is it normal to have {s} after {t}?",
            f"I feel awful, {s} {d}. {rng.choice(_SEVERITY)}",
            f"Should I go to urgent care for {s}?",
            f"I think I have the flu: {s} and {s2}.",
            f"I've been dealing with {s} {d} and it won't go away.",
            f"{_my(s).removeprefix('my ')} {d}, what do i do",
        ]
    else:
        forms = [
            f"{has.capitalize()} {s} {d}. What should we do?",
            f"{has.capitalize()} {s} and {s2}, is that serious?",
            f"I'm worried because {has} {s} {d}.",
            f"{who.capitalize()} got {s} after {t}. Should we be concerned?",
            f"What could cause {s} in {who}?",
            f"{has.capitalize()} {s}. {rng.choice(_SEVERITY)}",
            f"Should I bring {who} to urgent care for {s}?",
        ]
    return rng.choice(forms)


def _appointment(rng: random.Random) -> str:
    v = _fill(rng, _VISITS)
    t, t2 = rng.sample(_TIMES, 2)
    doc = rng.choice(_DOCTORS)
    forms = [
        f"Can I {rng.choice(_BOOK)} {v} {t}?",
        f"I'd like to {rng.choice(_BOOK)} {v} {t}.",
        f"I need to {rng.choice(_CANCEL)} my appointment {t}.",
        f"Please {rng.choice(_CANCEL)} {_my(v)} {t}.",
        f"Is Dr. {doc} available {t}?",
        f"Do you have any openings {t} for {v}?",
        f"Can I {rng.choice(_CHANGE)} my appointment from {t} to {t2}?",
        f"I need to {rng.choice(_CHANGE)} {_my(v)}, {t} doesn't work for me anymore.",
        f"need appt {t}",
        f"What is the earliest slot for {v}?",
        f"I want to see Dr. {doc} {t}, is there room in the schedule?",
        f"Could you confirm my appointment {t}?",
        f"How do I {rng.choice(_BOOK)} {v} online?",
        f"I'm running late for my appointment {t}, can I still come in?",
        f"Can my son and I get back-to-back appointments {t}?",
        f"I'm a new patient and want to {rng.choice(_BOOK)} {v}.",
    ]
    return rng.choice(forms)


def _billing(rng: random.Random) -> str:
    svc = rng.choice(_SERVICES)
    a = rng.choice(_AMOUNTS)
    b = rng.choice(_BILL_THINGS)
    ins = rng.choice(_INSURERS)
    num = rng.randrange(10000, 99999)
    forms = [
        f"Why was I charged {a} for {svc}?",
        f"I was billed twice for {svc}.",
        f"How can I pay {b} online?",
        f"Can I set up a payment plan for {a}?",
        f"{ins} should have covered {svc}, but I got a bill for {a}.",
        f"I have a question about invoice #{num}.",
        f"I think there is a mistake on {b}, it says I owe {a}.",
        f"Do you accept {ins} for {svc}? I got charged {a}.",
        f"I already paid {a} but {b} still shows a balance.",
        f"Can I get a refund of {a}? I overpaid for {svc}.",
        f"What is my copay for {svc}?",
        f"Who do I talk to about {b}?",
        f"Can you send an itemized bill for {svc}?",
        f"My card was charged {a} and I don't know what it is for.",
        f"Is there a discount if I pay {b} in full?",
        f"question about {b}",
    ]
    return rng.choice(forms)


_TEMPLATES = {"symptoms": _symptoms, "appointment": _appointment, "billing": _billing}

_OPENERS = ["", "", "", "Hi, ", "Hello, ", "Hi there! ", "Good morning. ", "Sorry to bother you, but ",
            "Quick question: ", "Hey, ", "Hello doctor, ", "Excuse me, ", "Hi team, "]
_CLOSERS = ["", "", "", " Thanks!", " Thank you.", " Please help.", " Thanks in advance.", " Any advice?",
            " Please let me know.", " Appreciate it.", " Thx"]


def _context(rng: random.Random) -> str:
    # category-neutral sentences, so that they carry no label signal
    return rng.choice([
        f"My name is {rng.choice(_FIRST)} {rng.choice(_LAST)}.",
        f"I'm a patient of Dr. {rng.choice(_DOCTORS)}.",
        "I've been coming to your clinic for years.",
        f"My date of birth is {rng.randrange(1, 13)}/{rng.randrange(1, 29)}/{rng.randrange(1940, 2010)}.",
        "I tried calling but nobody answered.",
        "I'm writing on behalf of my family.",
        "I just moved here last month.",
        "This is my first time using the portal.",
    ])


def _typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    kind = rng.randrange(4)
    if kind == 0:  # swap two letters
        w = w[: j - 1] + w[j] + w[j - 1] + w[j + 1 :]
    elif kind == 1:  # drop a letter
        w = w[:j] + w[j + 1 :]
    elif kind == 2:  # double a letter
        w = w[:j] + w[j] + w[j:]
    else:  # hit a neighbouring key
        w = w[:j] + rng.choice("qwertyuiopasdfghjklzxcvbnm") + w[j + 1 :]
    words[i] = w
    return " ".join(words)


def _query(rng: random.Random, label: str) -> str:
    q = _TEMPLATES[label](rng)
    if rng.random() < 0.3:
        q = f"{_context(rng)} {q}" if rng.random() < 0.5 else f"{q} {_context(rng)}"
    opener = rng.choice(_OPENERS)
    if opener:
        continues = opener.endswith((", ", ": ", "but ")) and not q.startswith(("I ", "I'", "Dr."))
        q = opener + (q[0].lower() + q[1:] if continues else q)
    q += rng.choice(_CLOSERS)
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
        q = _typo(rng, q)
    r = rng.random()
    if r < 0.15:
        q = q.lower()
    elif r < 0.18:
        q = q.upper()
    if rng.random() < 0.15:
        q = q.rstrip(".?!")  # people often skip the final punctuation
    return q


def _key(query: str) -> str:
    # two queries that differ only in case, spacing or punctuation count as the same query
    return re.sub(r"[^a-z0-9]+", " ", query.lower()).strip()


def prompt_messages(query: str) -> list[dict]:
    """The chat to send to the model to classify ``query`` (system prompt + the query)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": query}]


def record_of(query: str, label: str) -> dict:
    """A chat record for ``query`` answered with ``label``."""
    return {"messages": prompt_messages(query) + [{"role": "assistant", "content": answer_of(label)}], "label": label}


def generate(seed: int = 0, n: int = 2400) -> dict[str, list[dict]]:
    """Deterministic, class-balanced train/validation/test splits (80/10/10) of ``n`` records.

    Queries are unique up to case, spacing and punctuation across all splits, so no test query
    appears in train.
    """
    if n < 10 * len(CATEGORIES):
        raise ValueError(f"n must be at least {10 * len(CATEGORIES)}, got {n}")
    rng = random.Random(seed)
    per_class = n // len(CATEGORIES)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label in CATEGORIES:
        queries = []
        attempts = 0
        while len(queries) < per_class:
            attempts += 1
            if attempts > 200 * per_class:
                raise RuntimeError(f"cannot generate {per_class} distinct {label!r} queries; lower n")
            q = _query(rng, label)
            k = _key(q)
            if k not in seen:
                seen.add(k)
                queries.append(q)
        n_val = round(per_class * _FRACTIONS[1])
        n_test = round(per_class * _FRACTIONS[2])
        n_train = per_class - n_val - n_test
        splits["train"] += [record_of(q, label) for q in queries[:n_train]]
        splits["validation"] += [record_of(q, label) for q in queries[n_train : n_train + n_val]]
        splits["test"] += [record_of(q, label) for q in queries[n_train + n_val :]]
    for s in SPLITS:
        rng.shuffle(splits[s])
    return splits


def dumps(records: list[dict]) -> str:
    """The JSONL text of a split, exactly as shipped."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _data_file(name: str):
    return resources.files("fastlora.train.defaults").joinpath("data", f"healthcare_{name}.jsonl")


def load_split(name: str) -> list[dict]:
    """The shipped split ``name`` (train, validation or test) as records."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    text = _data_file(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


def write_splits(directory) -> None:
    """Write ``generate()``'s splits as the shipped JSONL files into ``directory``."""
    import os
    import tempfile
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, records in generate().items():
        target = directory / f"healthcare_{name}.jsonl"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(dumps(records))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)


if __name__ == "__main__":
    from pathlib import Path

    write_splits(Path(__file__).resolve().parent / "data")
