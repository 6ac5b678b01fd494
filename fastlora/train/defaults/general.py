"""General ability, to measure (and limit) catastrophic forgetting.

- ``general_qa()``: short-answer general-knowledge questions that SmolLM2-135M-Instruct answers
  correctly before any fine-tuning. They were selected, from about 140 candidates, as those whose
  greedy answer (the question as the only user turn, up to 12-16 new tokens, scored with
  ``answer_matches``) was right both for the GGUF model dequantized to float32 and for the
  same model loaded NF4 + double quant through bitsandbytes, as the default run loads it. So the
  untrained default model scores about 100% here, and retention = accuracy after / accuracy
  before measures what training took away. (On other models the set is simply a small
  general-knowledge quiz.)
- ``general_text()``: plain English paragraphs (written for this package) for perplexity.
- ``general_mix_records(n, seed)``: chat records with general instructions and correct answers,
  computed here, to mix into task training. They never repeat a ``general_qa()`` question, so
  mixing cannot inflate the retention measurement.
"""
from __future__ import annotations

import random
import re

# (question, accepted answers). Answers are matched as whole words, case-insensitively.
_QA: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of Austria?", ("Vienna",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Cuba?", ("Havana",)),
    ("What is the capital of England?", ("London",)),
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Hungary?", ("Budapest",)),
    ("What is the capital of India?", ("New Delhi",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Kenya?", ("Nairobi",)),
    ("What is the capital of Norway?", ("Oslo",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Scotland?", ("Edinburgh",)),
    ("What is the capital of South Korea?", ("Seoul",)),
    ("What is the capital of Sweden?", ("Stockholm",)),
    ("What is the capital of Thailand?", ("Bangkok",)),
    ("What is the capital of the Netherlands?", ("Amsterdam",)),
    ("What language is spoken in France?", ("French",)),
    ("What language is spoken in Germany?", ("German",)),
    ("What language is spoken in Italy?", ("Italian",)),
    ("What language is spoken in Japan?", ("Japanese",)),
    ("What language is spoken in Mexico?", ("Spanish",)),
    ("What language is spoken in Portugal?", ("Portuguese",)),
    ("What language is spoken in Russia?", ("Russian",)),
    ("What is the main language spoken in the United States?", ("English",)),
    ("What is 2 + 2?", ("4", "four",)),
    ("What is 6 + 6?", ("12", "twelve",)),
    ("How many sides does a triangle have?", ("3", "three",)),
    ("What is the opposite of big?", ("small", "little",)),
    ("What is the opposite of black?", ("white",)),
    ("What is the opposite of day?", ("night",)),
    ("What is the opposite of fast?", ("slow",)),
    ("What is the opposite of happy?", ("sad", "unhappy",)),
    ("What is the opposite of left?", ("right",)),
    ("What is the opposite of old?", ("new", "young",)),
    ("What is the opposite of open?", ("closed", "close", "shut",)),
    ("What is the opposite of true?", ("false",)),
    ("What is the opposite of up?", ("down",)),
    ("What is the opposite of wet?", ("dry",)),
    ("What is the plural of child?", ("children",)),
    ("What is the plural of mouse?", ("mice",)),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who discovered gravity?", ("Newton",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci", "Vinci",)),
    ("Who wrote Hamlet?", ("Shakespeare",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the currency of the United Kingdom?", ("pound",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("What gas do humans need to breathe?", ("oxygen",)),
    ("What instrument has 88 keys?", ("piano",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the chemical symbol for oxygen?", ("O",)),
    ("What is the chemical symbol for water?", ("H2O",)),
    ("What is the largest bone in the human body?", ("femur",)),
    ("What is the largest desert in the world?", ("Sahara", "Antarctic",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the longest river in Africa?", ("Nile",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("Which ocean lies between Europe and America?", ("Atlantic",)),
)


def general_qa() -> list[dict]:
    """Short-answer questions: ``[{"question": str, "answers": [accepted strings]}, ...]``."""
    return [{"question": q, "answers": list(a)} for q, a in _QA]


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def answer_matches(output: str, answers) -> bool:
    """True if some accepted answer occurs in ``output`` as whole words, ignoring case and
    punctuation ("The capital of France is Paris." matches "Paris"; "Parisian" does not)."""
    if isinstance(answers, str):
        answers = [answers]
    out = _words(output)
    return any(_words(a).strip() and _words(a) in out for a in answers)


_TEXT = (
    "The town library opens at nine in the morning. On most days a small line of readers waits by the door, "
    "some with books to return and others hoping to find a quiet table near the windows. The librarians know "
    "many of the visitors by name, and they often set aside new novels for the people who read the most.",
    "Rain fell for most of the afternoon, and the streets grew dark and shiny. People hurried from the bus stop "
    "with their umbrellas held low against the wind. By evening the clouds had moved east, and a thin orange "
    "light spread across the wet roofs before the sun went down.",
    "Cooking a simple soup takes little more than patience. Onions are softened slowly in oil, then carrots, "
    "celery and a few potatoes are added with enough water to cover them. After half an hour of gentle "
    "simmering, a pinch of salt and some fresh herbs turn the pot into a warm meal for the whole family.",
    "Bicycles have changed how many cities plan their streets. Separate lanes make riders feel safer, and "
    "shops along those lanes often see more customers who stop on the way home. Some towns now lend bicycles "
    "from stations near train platforms, so that a short ride can finish a longer trip.",
    "Children learn to read in many different ways. Some recognize whole words early, while others sound out "
    "each letter before the meaning becomes clear. Reading aloud together at bedtime helps in both cases, "
    "because it connects the printed page with a familiar voice and a story worth following.",
    "A healthy garden depends on good soil. Gardeners add compost in the autumn so that worms and tiny "
    "organisms can break it down over the winter. In spring the ground is dark and loose, and seeds planted "
    "in rows along the fence sprout quickly once the days grow longer.",
)


def general_text() -> list[str]:
    """A few paragraphs of general English text, for perplexity before and after training."""
    return list(_TEXT)


# --------------------------------------------------------------------------------------------
# General chat records to mix into training: answers computed, so they are correct
# --------------------------------------------------------------------------------------------

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_WORD_POOL = ("apple", "river", "garden", "window", "pencil", "orange", "mountain", "candle", "button",
              "planet", "basket", "forest", "rocket", "turtle", "violin", "blanket", "castle", "meadow")
_FACTS = (
    ("Why do we have seasons?",
     "Seasons happen because the Earth's axis is tilted, so each hemisphere receives more direct sunlight "
     "during part of the year and less during the rest."),
    ("Give me a tip for sleeping better.",
     "Try to go to bed and wake up at the same time every day, and keep screens out of the bedroom."),
    ("What is photosynthesis?",
     "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("Write a short greeting for a birthday card.",
     "Happy birthday! Wishing you a year full of joy, good health and wonderful surprises."),
    ("Explain what a noun is.",
     "A noun is a word that names a person, place, thing or idea, such as teacher, city, table or freedom."),
    ("How do I boil an egg?",
     "Place the egg in boiling water for about nine minutes, then cool it in cold water before peeling."),
    ("Why is exercise good for you?",
     "Regular exercise strengthens the heart and muscles, improves mood and helps with sleep."),
    ("Suggest a name for a pet cat.",
     "How about Luna? It is short, easy to call, and suits a calm, curious cat."),
)


def _mix_record(rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(11, 99), rng.randrange(11, 99)
        q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif kind == 1:
        a, b = rng.randrange(2, 13), rng.randrange(2, 13)
        q, ans = f"What is {a} multiplied by {b}?", f"{a} multiplied by {b} is {a * b}."
    elif kind == 2:
        words = rng.sample(_WORD_POOL, rng.randrange(3, 6))
        q = "Sort these words alphabetically: " + ", ".join(words) + "."
        ans = ", ".join(sorted(words))
    elif kind == 3:
        words = rng.sample(_WORD_POOL, rng.randrange(2, 5))
        q = f"How many words are in this list: {' '.join(words)}?"
        ans = f"There are {_NUMBER_WORDS[len(words)]} words."
    elif kind == 4:
        a, b = rng.sample(range(10, 1000), 2)
        q, ans = f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger."
    else:
        q, ans = rng.choice(_FACTS)
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}


def general_mix_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` general chat records (``{"messages": [user, assistant]}``) with correct answers,
    deterministic for a given seed, disjoint from ``general_qa()``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [_mix_record(rng) for _ in range(n)]
