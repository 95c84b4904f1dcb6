"""The one list of merge methods. The CLI, the schema, ``soupkit methods``, docs and tests read it."""

from __future__ import annotations

import re

from soupkit.errors import RecipeError, did_you_mean
from soupkit.methods.base import MergeMethod

REGISTRY: dict[str, MergeMethod] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: instantiate ``cls`` and add it to ``REGISTRY`` under ``cls.name``."""
    name = cls.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"method name must be snake_case, got {name!r}")
    if name in REGISTRY:
        raise ValueError(f"method {name!r} is registered twice")
    for attr in ("space", "paper", "summary"):
        if not getattr(cls, attr, None):
            raise ValueError(f"method {name!r} must set {attr}")
    REGISTRY[name] = cls()
    return cls


def get_method(name: str, where: str = "merge.method") -> MergeMethod:
    """Look a method up by name; an unknown name is a user error with a did-you-mean."""
    if name not in REGISTRY:
        raise RecipeError(
            where,
            f"one of {', '.join(sorted(REGISTRY))}",
            f"'{name}'{did_you_mean(name, REGISTRY)}",
            "run `soupkit methods` to list methods",
        )
    return REGISTRY[name]
