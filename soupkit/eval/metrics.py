"""Metrics: what a score means, which way is better, and the per-example scorers of generations.

``loss`` (default): mean negative log-likelihood per scored token (lower is better).
``exact`` / ``contains`` / ``regex:PATTERN``: greedy generation compared with the reference (1 or 0).
``python:module:function``: ``function(prompt, generation, reference) -> float`` (higher is better).
``lm-eval:TASK[,TASK]``: lm-evaluation-harness tasks (the optional ``[eval]`` extra).
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from soupkit.errors import SoupkitError

Scorer = Callable[[str, str, "str | None"], float]  # (prompt, generation, reference) -> score
METRIC_FORMS = "loss, exact, contains, regex:PATTERN, python:module:function or lm-eval:TASK[,TASK]"


@dataclass(frozen=True)
class Metric:
    """A parsed ``--metric``: its kind, which direction is better, and the scorer for generations."""

    spec: str
    kind: Literal["loss", "generate", "lm-eval"]
    direction: Literal["minimize", "maximize"]
    scorer: Scorer | None = None
    tasks: tuple[str, ...] = ()


def _normal(text: str) -> str:
    return " ".join(text.split())


def exact(prompt: str, generation: str, reference: str | None) -> float:
    """1 if the generation equals the reference up to surrounding and repeated whitespace."""
    return float(_normal(generation) == _normal(_needs_reference(reference, "exact")))


def contains(prompt: str, generation: str, reference: str | None) -> float:
    """1 if the reference (whitespace-normalised) occurs in the generation."""
    return float(_normal(_needs_reference(reference, "contains")) in _normal(generation))


def _needs_reference(reference: str | None, metric: str) -> str:
    if reference is None:
        raise SoupkitError(
            f"--metric {metric}", "a reference answer in every record", "a record without one", "add 'reference' fields"
        )
    return reference


def regex_scorer(pattern: str) -> Scorer:
    """With a reference: 1 if the first match (its group 1 if any) equals it; without: 1 if it matches."""
    compiled = re.compile(pattern)

    def score(prompt: str, generation: str, reference: str | None) -> float:
        match = compiled.search(generation)
        if match is None:
            return 0.0
        if reference is None:
            return 1.0
        found = match.group(1) if compiled.groups else match.group(0)
        return float(_normal(found or "") == _normal(reference))

    return score


def python_scorer(target: str, where: str) -> Scorer:
    """Import ``module:function`` (the current directory first on sys.path, as ``python -m`` does)."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise SoupkitError(where, "python:module:function", f"'python:{target}'", "name the module and the function")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- any error while importing the user's module is theirs to fix
        raise SoupkitError(
            where, f"an importable module '{module_name}'", f"{type(err).__name__}: {err}", "check the module name and sys.path"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SoupkitError(where, f"a function '{function_name}' in {module_name}", "none", "check the function name")
    return function


def parse_metric(spec: str, where: str = "--metric") -> Metric:
    """Parse a metric name; an unknown one is a one-line error listing the forms."""
    if spec == "loss":
        return Metric(spec, "loss", "minimize")
    if spec in ("exact", "contains"):
        return Metric(spec, "generate", "maximize", exact if spec == "exact" else contains)
    kind, _, rest = spec.partition(":")
    if kind == "regex" and rest:
        try:
            return Metric(spec, "generate", "maximize", regex_scorer(rest))
        except re.error as err:
            raise SoupkitError(where, "a valid regular expression", f"'{rest}' ({err})", "fix the pattern") from None
    if kind == "python" and rest:
        return Metric(spec, "generate", "maximize", python_scorer(rest, where))
    if kind == "lm-eval" and rest:
        tasks = tuple(t.strip() for t in rest.split(",") if t.strip())
        return Metric(spec, "lm-eval", "maximize", tasks=tasks)
    raise SoupkitError(where, f"one of {METRIC_FORMS}", f"'{spec}'", "pick one of these")


def checked_score(value: object, where: str) -> float:
    """A scorer's return value as a finite float (a user scorer returning junk is a one-line error)."""
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SoupkitError(where, "a number from the scorer", repr(value)[:40], "return a float") from None
    if not math.isfinite(score):
        raise SoupkitError(where, "a finite score", repr(score), "return a finite float")
    return score
