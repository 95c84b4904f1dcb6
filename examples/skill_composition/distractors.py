"""Six distractor skills for the pool question (issue 23): seeded generators in the experiment's chat style.

None of them is math or code: each is a short text transformation with one exact answer, in the same
form as the skills (a plain request, a one-line reply), so a LoRA for it has the same recipe and size as
the math and code LoRAs. Chosen to be learnable by SmolLM2-135M with a BPE tokenizer (whole words and
small numbers, never single characters inside a word):

    upper:   Rewrite in capital letters: red apple tree           -> RED APPLE TREE
    sort:    Sort these numbers from smallest to largest: 42, 7, 19 -> 7, 19, 42
    count:   How many items are in this list: cat, dog, fish?     -> There are 3 items.
    units:   Convert 7 kilometers to meters.                      -> 7 kilometers is 7000 meters.
    weekday: What day of the week is 3 days after Monday?         -> Thursday
    reverse: Reverse the order of these words: red blue green     -> green blue red

A reply is right when it equals the reference up to whitespace (``soupkit eval``'s ``exact``, ``scoring.exact``).
"""

from __future__ import annotations

import random

from examples.skill_composition.data import Example

WORDS = [
    "red", "blue", "green", "apple", "tree", "river", "stone", "cloud", "house", "bird", "paper", "light",
    "table", "music", "garden", "window", "summer", "winter", "yellow", "silver", "ocean", "forest", "little", "happy",
]  # fmt: skip
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
         ("liters", "milliliters", 1000), ("centimeters", "millimeters", 10)]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def upper(rng: random.Random) -> tuple[str, str]:
    words = " ".join(_words(rng, 2, 4))
    return f"Rewrite in capital letters: {words}", words.upper()


def sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    shown = ", ".join(map(str, numbers))
    return f"Sort these numbers from smallest to largest: {shown}", ", ".join(map(str, sorted(numbers)))


def count(rng: random.Random) -> tuple[str, str]:
    items = _words(rng, 2, 9)
    return f"How many items are in this list: {', '.join(items)}?", f"There are {len(items)} items."


def units(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 99)
    return f"Convert {n} {big} to {small}.", f"{n} {big} is {n * factor} {small}."


def weekday(rng: random.Random) -> tuple[str, str]:
    start, n = rng.randrange(7), rng.randint(1, 6)
    return f"What day of the week is {n} days after {DAYS[start]}?", DAYS[(start + n) % 7]


def reverse(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


GENERATORS = {"upper": upper, "sort": sort, "count": count, "units": units, "weekday": weekday, "reverse": reverse}
NAMES = tuple(GENERATORS)


def make_split(kind: str, n: int, seed: int, style: str = "chat") -> list[Example]:
    """``n`` examples of distractor ``kind``; the toy style adds the ``\\nAnswer:`` header its base expects."""
    rng = random.Random(f"distractor|{kind}|{seed}")
    out = []
    for _ in range(n):
        prompt, answer = GENERATORS[kind](rng)
        if style == "toy":
            out.append(Example(f"Task: {prompt}\nAnswer:", " " + answer, 0, kind))
        else:
            out.append(Example(prompt, answer, 0, kind))
    return out
