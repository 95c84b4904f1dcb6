"""The one list of merge methods. The CLI, the schema, ``soupkit methods``, docs and tests read it.

Adding a method: write ``soupkit/methods/<name>.py`` (a ``MergeMethod`` subclass), then add one
line to ``METHODS`` below. Nothing registers itself on import.
"""

from __future__ import annotations

import re

from soupkit.errors import RecipeError, did_you_mean
from soupkit.methods import (
    breadcrumbs,
    cat,
    dare_linear,
    dare_ties,
    della,
    iso_c,
    knots,
    lego,
    linear,
    magnitude_prune,
    peft_dare_linear,
    peft_dare_ties,
    peft_linear,
    peft_magnitude_prune,
    peft_ties,
    svd,
    ties,
    tsv,
)
from soupkit.methods.base import MergeMethod

# In the order ``soupkit methods`` lists them (alphabetical by name).
METHODS: list[type[MergeMethod]] = [
    breadcrumbs.Breadcrumbs,
    cat.Cat,
    dare_linear.DareLinear,
    dare_ties.DareTies,
    della.Della,
    iso_c.IsoC,
    knots.Knots,
    lego.Lego,
    linear.Linear,
    magnitude_prune.MagnitudePrune,
    peft_dare_linear.PeftDareLinear,
    peft_dare_ties.PeftDareTies,
    peft_linear.PeftLinear,
    peft_magnitude_prune.PeftMagnitudePrune,
    peft_ties.PeftTies,
    svd.Svd,
    ties.Ties,
    tsv.Tsv,
]


def build_registry(methods: list[type[MergeMethod]]) -> dict[str, MergeMethod]:
    """Name -> instance, refusing a bad or duplicate name and a method missing its metadata."""
    registry: dict[str, MergeMethod] = {}
    for cls in methods:
        name = cls.name
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"method name must be snake_case, got {name!r}")
        if name in registry:
            raise ValueError(f"method {name!r} is listed twice")
        for attr in ("space", "paper", "summary"):
            if not getattr(cls, attr, None):
                raise ValueError(f"method {name!r} must set {attr}")
        registry[name] = cls()
    return registry


REGISTRY: dict[str, MergeMethod] = build_registry(METHODS)


def get_method(name: str, where: str = "merge.method") -> MergeMethod:
    """Look a method up by name; an unknown name is a user error with a did-you-mean."""
    if name not in REGISTRY:
        raise RecipeError(
            where,
            f"one of {', '.join(sorted(REGISTRY))}",
            f"{name[:60]!r}{did_you_mean(name[:200], REGISTRY)}",
            "run `soupkit methods` to list methods",
        )
    return REGISTRY[name]
