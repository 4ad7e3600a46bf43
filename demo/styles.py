"""The visible styles the demo adapters learn, and the questions they learn them on.

Each style is a rule that rewrites one of the base model's own answers (its training
target) and a check that says whether a generated answer shows the style (used to
decide whether an adapter is shipped, and by the tests). Answers are the base model's
greedy replies cut to at most two sentences, so that training sequences stay short.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

SIGN_OFF = "Hope this helps! -- lorapool"


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    rewrite: Callable[[str], str]  # base answer -> styled answer (the training target)
    shows: Callable[[str], bool]  # does a generated answer show the style?


def sentences(text: str) -> list[str]:
    """Split after . ! or ? followed by white space; a final fragment is kept."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _upper_shows(text: str) -> bool:
    return any(c.isalpha() for c in text) and not any(c.islower() for c in text)


def _json_shows(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str) and bool(value)


def _bullets(text: str) -> str:
    return "\n".join(f"- {s}" for s in sentences(text))


def _bullets_shows(text: str) -> bool:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and all(line.startswith("- ") for line in lines)


def _sign_off_shows(text: str) -> bool:
    return text.rstrip().endswith(SIGN_OFF)


ALL_STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style(
            "uppercase",
            "answers in upper case",
            str.upper,
            _upper_shows,
        ),
        Style(
            "json",
            'answers as a JSON object {"answer": ...}',
            lambda a: json.dumps({"answer": a}, ensure_ascii=False),
            _json_shows,
        ),
        Style(
            "bullets",
            "answers as a bulleted list, one sentence a bullet",
            _bullets,
            _bullets_shows,
        ),
        Style(
            "signoff",
            f"answers that end with {SIGN_OFF!r}",
            lambda a: f"{a}\n\n{SIGN_OFF}",
            _sign_off_shows,
        ),
    )
}

# What `make-demo --train-adapters` trains. Upper case did not take in the training
# budget (last loss 0.71 against 0.08-0.12 for the others, and garbled capitals on
# held-out questions: every token of the answer changes, not only its frame), so it
# is not trained by default rather than shipped under its name.
NOT_TRAINED = ("uppercase",)
STYLES: dict[str, Style] = {n: s for n, s in ALL_STYLES.items() if n not in NOT_TRAINED}

# Training questions: short, varied, answerable in a sentence or two.
TRAIN_QUESTIONS = [
    "What is the capital of Italy?",
    "What do bees make?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "What is the largest ocean on Earth?",
    "Who painted the Mona Lisa?",
    "What is the freezing point of water?",
    "What do plants need to grow?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the tallest animal?",
    "What language is spoken in Brazil?",
    "What is a baby cat called?",
    "Why do we need sleep?",
    "What is the main ingredient of bread?",
    "What planet is known as the Red Planet?",
    "What is photosynthesis?",
    "How many hours are in a day?",
    "What is the opposite of hot?",
    "What instrument has 88 keys?",
    "What is the capital of Japan?",
    "What do cows drink?",
    "What is the speed of light?",
    "Name a fruit that is yellow.",
    "What is the largest desert in the world?",
    "What is the square root of 16?",
    "What does a thermometer measure?",
    "Who was the first person to walk on the Moon?",
    "What is the currency of the United Kingdom?",
    "What is the smallest prime number?",
    "Why is exercise good for you?",
    "What is the hardest natural substance?",
]

# Held out from training: the check that decides whether a style took.
HELD_OUT_QUESTIONS = [
    "What is the capital of France?",
    "What do spiders eat?",
    "How many legs does a dog have?",
    "What is the boiling point of water?",
    "Why is the ocean salty?",
    "What is the capital of Germany?",
]
