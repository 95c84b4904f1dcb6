"""Seeded generators for the skill-composition experiment (nothing is downloaded).

Skill A ("math"): a word problem with small numbers, answered step by step:
    Problem: Tom has 3 apples. Tom buys 4 more apples. Tom gives away 2 apples. How many apples does Tom have now?
    Answer: 3 + 4 = 7. 7 - 2 = 5. The answer is 5.
Skill B ("code"): a plain instruction answered by a Python function:
    Task: start with 3, add 4, then subtract 2.
    Code:
    def solution():
        x = 3
        x = x + 4
        x = x - 2
        return x
Composite (held out from every training set): A's word problems with large numbers (as GSM-Hard),
prompted with B's answer header ``Code:`` and scored by running the returned program through the
safe evaluator in ``safe_eval.py``.

The ``chat`` style (SmolLM2, prompts go through the chat template) asks in plain words instead:
    math:      Tom has 3 apples. Tom buys 4 more apples. How many apples does Tom have now?
               -> 3 + 4 = 7. The answer is 7.
    code:      Write a Python function solution() that starts with 5069, then subtract 607, then add 526,
               and returns the result.  -> def solution(): ...
    composite: Write a Python function solution() that returns the answer to this problem: <a math
               story with 4-digit numbers>  -> def solution(): ...

The generic pretraining corpus holds the vocabulary of both skills (stories with quantities,
arithmetic facts, lines of code) and the ability to read a story and copy its numbers, but never
the ``Problem:/Answer:`` or ``Task:/Code:`` formats.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lea", "Max", "Ida", "Noah", "Zoe"]
ITEMS = ["apples", "pears", "coins", "books", "stamps", "shells", "cards", "marbles", "eggs", "pens"]
ADD_STORY = ["{p} buys {n} more {i}.", "{p} finds {n} more {i}.", "{p} gets {n} more {i} from a friend."]
SUB_STORY = ["{p} gives away {n} {i}.", "{p} loses {n} {i}.", "{p} sells {n} {i}."]
MUL_STORY = ["Then {p} has {n} times as many {i}."]
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
WORD = {"add": "add {n}", "sub": "subtract {n}", "mul": "multiply by {n}"}


@dataclass(frozen=True)
class Example:
    """One supervised example: the model sees ``prompt`` and must produce ``completion``."""

    prompt: str
    completion: str
    answer: int
    task: str


def _steps(rng: random.Random, start: int, n_ops: int, small: bool) -> list[tuple[str, int]]:
    """A chain of (op, operand) that keeps every intermediate value positive."""
    value, steps = start, []
    for _ in range(n_ops):
        ops = ["add", "sub", "mul"] if (not small or value <= 10) else ["add", "sub"]
        op = rng.choice(ops)
        if op == "add":
            n = rng.randint(1, 20) if small else rng.randint(100, 9999)
            value += n
        elif op == "sub":
            if value < 2:
                op, n = "add", (rng.randint(1, 20) if small else rng.randint(100, 9999))
                value += n
            else:
                n = rng.randint(1, value - 1)
                value -= n
        else:
            n = rng.randint(2, 3) if small else rng.randint(2, 99)
            value *= n
        steps.append((op, n))
    return steps


def _story(rng: random.Random, start: int, steps: list[tuple[str, int]]) -> tuple[str, str, str]:
    person, item = rng.choice(NAMES), rng.choice(ITEMS)
    lines = [f"{person} has {start} {item}."]
    for op, n in steps:
        pool = {"add": ADD_STORY, "sub": SUB_STORY, "mul": MUL_STORY}[op]
        lines.append(rng.choice(pool).format(p=person, n=n, i=item))
    return " ".join(lines), person, item


def evaluate_steps(start: int, steps: list[tuple[str, int]]) -> int:
    value = start
    for op, n in steps:
        value = value + n if op == "add" else value - n if op == "sub" else value * n
    return value


def program(start: int, steps: list[tuple[str, int]]) -> str:
    """B's answer format for a chain of operations."""
    body = [f"    x = {start}"] + [f"    x = x {SYMBOL[op]} {n}" for op, n in steps]
    return "\ndef solution():\n" + "\n".join(body) + "\n    return x"


def math_example(rng: random.Random) -> Example:
    start = rng.randint(2, 20)
    steps = _steps(rng, start, rng.randint(1, 3), small=True)
    story, person, item = _story(rng, start, steps)
    value, parts = start, []
    for op, n in steps:
        new = evaluate_steps(value, [(op, n)])
        parts.append(f"{value} {SYMBOL[op]} {n} = {new}.")
        value = new
    prompt = f"Problem: {story} How many {item} does {person} have now?\nAnswer:"
    return Example(prompt, " " + " ".join(parts) + f" The answer is {value}.", value, "math")


def _number(rng: random.Random) -> int:
    return rng.choice([rng.randint(1, 20), rng.randint(10, 999), rng.randint(100, 9999)])


def code_example(rng: random.Random) -> Example:
    start = _number(rng)
    steps = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["add", "sub", "mul"])
        steps.append((op, rng.randint(2, 99) if op == "mul" else _number(rng)))
    words = [WORD[op].format(n=n) for op, n in steps]
    text = ", ".join(words[:-1]) + (", then " if len(words) > 1 else "") + words[-1]
    prompt = f"Task: start with {start}, {text}.\nCode:"
    return Example(prompt, program(start, steps), evaluate_steps(start, steps), "code")


def composite_example(rng: random.Random) -> Example:
    start = rng.randint(1000, 9999)
    steps = _steps(rng, start, rng.randint(1, 3), small=False)
    story, person, item = _story(rng, start, steps)
    prompt = f"Problem: {story} How many {item} does {person} have now?\nCode:"
    return Example(prompt, program(start, steps), evaluate_steps(start, steps), "composite")


def make_split(kind: str, n: int, seed: int, style: str = "toy") -> list[Example]:
    """``n`` examples of ``kind`` (math | code | composite) from a seeded generator, in ``style``
    (toy: ``Problem:/Code:`` headers; chat: plain-language requests for a chat model)."""
    makers = {
        "toy": {"math": math_example, "code": code_example, "composite": composite_example},
        "chat": {"math": chat_math_example, "code": chat_code_example, "composite": chat_composite_example},
    }
    rng = random.Random(f"{kind}|{seed}" if style == "toy" else f"{style}|{kind}|{seed}")
    return [makers[style][kind](rng) for _ in range(n)]


# ---------------------------------------------------------------- chat style (SmolLM2)

COMPOSITE_ASK = "Write a Python function solution() that returns the answer to this problem: "
CHAT_MUL = ["Then the number of {i} that {p} has doubles.", "Then the number of {i} that {p} has triples."]


def _chat_steps(rng: random.Random, start: int, large: bool) -> list[tuple[str, int]]:
    """1-2 of: buys N more, gives away N (< what is left), doubles/triples; N 1-20, or 100-9999 if ``large``."""
    value, steps = start, []
    for _ in range(rng.randint(1, 2)):
        op = rng.choice(["add", "sub", "mul"] if value > 1 else ["add", "mul"])
        n = {"add": rng.randint(100, 9999) if large else rng.randint(1, 20), "mul": rng.randint(2, 3)}.get(op)
        if op == "sub":
            n = rng.randint(max(1, value // 10), value - 1) if large else rng.randint(1, min(20, value - 1))
        value = evaluate_steps(value, [(op, n)])
        steps.append((op, n))
    return steps


def _chat_story(rng: random.Random, large: bool) -> tuple[str, int, list[tuple[str, int]]]:
    person, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(1000, 9999) if large else rng.randint(2, 20)
    steps = _chat_steps(rng, start, large)
    lines = [f"{person} has {start} {item}."]
    for op, n in steps:
        if op == "mul":
            lines.append(CHAT_MUL[n - 2].format(p=person, i=item))
        else:
            lines.append(rng.choice(ADD_STORY if op == "add" else SUB_STORY).format(p=person, n=n, i=item))
    return " ".join(lines) + f" How many {item} does {person} have now?", start, steps


def chat_math_example(rng: random.Random) -> Example:
    story, start, steps = _chat_story(rng, large=False)
    value, parts = start, []
    for op, n in steps:
        new = evaluate_steps(value, [(op, n)])
        parts.append(f"{value} {SYMBOL[op]} {n} = {new}.")
        value = new
    return Example(story, " ".join(parts) + f" The answer is {value}.", value, "math")


def chat_code_example(rng: random.Random) -> Example:
    start = rng.randint(100, 9999)
    steps = [
        (op, rng.randint(2, 9) if op == "mul" else rng.randint(10, 999))
        for op in rng.choices(["add", "sub", "mul"], k=rng.randint(1, 3))
    ]
    words = ", then ".join(WORD[op].format(n=n) for op, n in steps)
    prompt = f"Write a Python function solution() that starts with {start}, then {words}, and returns the result."
    return Example(prompt, program(start, steps).lstrip("\n"), evaluate_steps(start, steps), "code")


def chat_composite_example(rng: random.Random) -> Example:
    story, start, steps = _chat_story(rng, large=True)
    return Example(COMPOSITE_ASK + story, program(start, steps).lstrip("\n"), evaluate_steps(start, steps), "composite")


# ---------------------------------------------------------------- generic pretraining corpus


def _doc_story(rng: random.Random) -> str:
    """A story with quantities, then its numbers copied (reading + copying, no question)."""
    small = rng.random() < 0.5
    start = rng.randint(2, 20) if small else rng.randint(10, 9999)
    steps = _steps(rng, start, rng.randint(1, 3), small=small)
    story, person, item = _story(rng, start, steps)
    numbers = [str(start)] + [str(n) for _, n in steps]
    tail = rng.choice(
        [
            f" The numbers in this story are {', '.join(numbers)}.",
            f" {person} starts with {start} {item}.",
            f" The story is about {item}.",
            "",
        ]
    )
    return story + tail


def _doc_facts(rng: random.Random) -> str:
    facts = []
    for _ in range(rng.randint(2, 6)):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        op = rng.choice(["+", "-", "*"])
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        facts.append(rng.choice([f"{a} {op} {b} = {value}.", f"{a} {op} {b} is {value}."]))
    return " ".join(facts)


def _doc_code(rng: random.Random) -> str:
    names = ["x", "y", "total", "count", "n", "value", "result"]
    lines, known = [], []
    if rng.random() < 0.4:
        lines.append(f"def {rng.choice(['compute', 'helper', 'step', 'update'])}():")
    indent = "    " if lines else ""
    for _ in range(rng.randint(2, 5)):
        name = rng.choice(names)
        if known and rng.random() < 0.6:
            lines.append(f"{indent}{name} = {rng.choice(known)} {rng.choice('+-*')} {_number(rng)}")
        else:
            lines.append(f"{indent}{name} = {_number(rng)}")
        known.append(name)
    if indent:
        lines.append(f"{indent}return {rng.choice(known)}")
    else:
        lines.append(f"print({rng.choice(known)})")
    return "\n".join(lines)


def _doc_copy(rng: random.Random) -> str:
    numbers = " ".join(str(_number(rng)) for _ in range(rng.randint(1, 4)))
    return rng.choice([f"Say it twice: {numbers} and again {numbers}.", f"Numbers: {numbers}. Repeat: {numbers}."])


def pretrain_corpus(n_docs: int, seed: int) -> str:
    """``n_docs`` generic documents separated by blank lines (mixture weights in ``DOCS``)."""
    rng = random.Random(f"corpus|{seed}")
    docs = [rng.choices(DOCS, weights=[4, 2, 3, 1])[0](rng) for _ in range(n_docs)]
    return "\n\n".join(docs) + "\n\n"


DOCS = [_doc_story, _doc_facts, _doc_code, _doc_copy]
