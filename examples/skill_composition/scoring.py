"""The experiment's scorer, one function for every task, in the form ``soupkit eval``/``sweep`` call:

    soupkit sweep SWEEP.yaml ...   with   metric: python:examples.skill_composition.scoring:score

``score(prompt, generation, reference) -> float`` tells the task from the reference answer:
- a ``def solution():`` program (code, composite): the generated program, interpreted by the safe
  evaluator (never run), must return what the reference program returns;
- ``... The answer is N.`` (math): the generation's ``The answer is M`` must have M == N;
- anything else (the distractor skills): ``soupkit eval``'s ``exact`` (equal up to whitespace).
"""

from __future__ import annotations

from soupkit.eval.metrics import exact as exact_score

from examples.skill_composition.safe_eval import ANSWER, Refused, evaluate_program, extract_program, score_math, score_program


def exact(generation: str, reference: str) -> tuple[bool, bool]:
    """(non-empty reply, ``soupkit eval``'s ``exact``: equal to the reference up to whitespace)."""
    return bool(generation.strip()), exact_score("", generation, reference) == 1.0


def reference_value(reference: str) -> float | None:
    """The value the reference program returns (None if the reference is not a program)."""
    source = extract_program(reference)
    if source is None:
        return None
    try:
        return evaluate_program(source)
    except Refused:
        return None


def score(prompt: str, generation: str, reference: str | None) -> float:
    """1.0 when ``generation`` answers like ``reference``, else 0.0 (see the module docstring)."""
    del prompt  # the reference alone says what the task is
    if reference is None:
        return 0.0
    value = reference_value(reference)
    if value is not None:
        return float(score_program(generation, value)[1])
    match = ANSWER.search(reference)
    if match is not None:
        return float(score_math(generation, int(match.group(1)))[1])
    return float(exact(generation, reference)[1])
