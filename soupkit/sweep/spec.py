"""A sweep file: an ordinary recipe plus a ``search:`` block, validated as strictly as a recipe.

```yaml
search:
  data: {validation: val.jsonl, test: test.jsonl}
  metric: loss                 # or exact / contains / regex:... / python:mod:fn / lm-eval:...
  trials: 40
  sampler: tpe                 # tpe | cmaes | random | grid
  methods: [cat, ties, tsv]    # default: the recipe's method
  weights: [0.0, 1.5]          # every adapter; or {math: [0, 1], code: 0.5}
  params: {density: [0.1, 0.9]}
  space: [full, core]
```

A two-number list is a range (integers: an integer range); any other list is a set of choices; a
single value is fixed. Ranges are searched as they are, except by ``grid``, which takes
``grid_points`` evenly spaced values of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from soupkit.errors import RecipeError, did_you_mean
from soupkit.eval.metrics import parse_metric
from soupkit.methods.registry import REGISTRY, get_method
from soupkit.recipe.messages import to_recipe_error
from soupkit.recipe.safe_yaml import read_recipe_yaml
from soupkit.recipe.schema import Recipe, StrictModel, validate_recipe

Value = float | int | str | bool
Domain = list[Value] | Value  # a [lo, hi] range, a list of choices, or one fixed value


class SearchData(StrictModel):
    """Where trials are scored (validation) and where the best few are reported (test)."""

    validation: str = Field(description="JSON lines the trials are scored and chosen on.")
    test: str | None = Field(default=None, description="JSON lines the top_k trials are scored on once, after the search.")


class SearchSpec(StrictModel):
    """The ``search:`` block of a sweep file."""

    data: SearchData = Field(description="validation (and optional test) data, in soupkit eval's formats.")
    metric: str = Field(default="loss", description="A soupkit eval metric: loss, exact, contains, regex:, python:, lm-eval:.")
    trials: int = Field(default=20, ge=1, description="Trials in the study (a rerun with more continues it).")
    sampler: Literal["tpe", "cmaes", "random", "grid"] = Field(default="tpe", description="Optuna's sampler.")
    methods: list[str] | None = Field(default=None, min_length=1, description="Methods to try (default: the recipe's).")
    weights: list[float] | dict[str, list[float] | float] | None = Field(
        default=None, description="[lo, hi] for every adapter, or per adapter name (default: the recipe's weights)."
    )
    params: dict[str, Domain] = Field(default_factory=dict, description="Method parameters to search; each method takes its own.")
    space: list[Literal["full", "core"]] | None = Field(default=None, min_length=1, description="merge.space choices.")
    top_k: int = Field(default=5, ge=0, description="How many of the best trials are scored on test data.")
    seed: int = Field(default=0, description="The sampler's seed.")
    grid_points: int = Field(default=5, ge=2, description="grid: values per range.")
    max_new_tokens: int = Field(default=256, ge=1, description="Generation metrics: new tokens.")
    stop: list[str] = Field(default_factory=list, description="Generation metrics: stop strings.")
    batch_size: int = Field(default=8, ge=1, description="Examples per forward / generate call.")
    seq_len: int = Field(default=2048, ge=2, description="loss: tokens kept per example.")


class SearchBlock(StrictModel):
    """The sweep file's own key (its recipe keys are validated as a recipe)."""

    search: SearchSpec


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file: its recipe (as written and validated), its search block, where it lives."""

    path: Path
    raw_recipe: dict
    recipe: Recipe
    search: SearchSpec

    @property
    def root(self) -> Path:
        return self.path.resolve().parent

    def data_path(self, name: str) -> str:
        """A data path as written, resolved against the sweep file's folder when relative."""
        given = getattr(self.search.data, name)
        path = Path(given).expanduser()
        return str(path if path.is_absolute() else self.root / path)


def _check_domain(label: str, where: str, value: object) -> None:
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{label}: {where}", "a [lo, hi] range or a list of choices", "an empty list", "add values")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        if len(value) == 2 and numbers and value[0] > value[1]:
            raise RecipeError(f"{label}: {where}", "a range [lo, hi] with lo <= hi", str(value), "swap the two ends")


def check_search(search: SearchSpec, recipe: Recipe, label: str) -> None:
    """Names the search uses must exist: methods, adapters, and each parameter in some chosen method."""
    methods = search.methods or [recipe.merge.method]
    for i, name in enumerate(methods):
        get_method(name, where=f"{label}: search.methods.{i}")
    adapter_names = [a.name for a in recipe.adapters]
    if isinstance(search.weights, dict):
        for name, domain in search.weights.items():
            if name not in adapter_names:
                raise RecipeError(
                    f"{label}: search.weights.{name}",
                    f"an adapter name ({', '.join(adapter_names)})",
                    f"'{name}'{did_you_mean(name, adapter_names)}",
                    "use the names in adapters:",
                )
            _check_domain(label, f"search.weights.{name}", domain)
    elif isinstance(search.weights, list) and len(search.weights) != 2:
        raise RecipeError(f"{label}: search.weights", "a range [lo, hi]", str(search.weights), "give two numbers")
    elif isinstance(search.weights, list):
        _check_domain(label, "search.weights", search.weights)
    known = sorted({f for m in methods for f in REGISTRY[m].Params.model_fields})
    for name, domain in search.params.items():
        if name not in known:
            raise RecipeError(
                f"{label}: search.params.{name}",
                f"a parameter of {', '.join(methods)} ({', '.join(known) or 'none'})",
                f"'{name}'{did_you_mean(name, known)}",
                "remove it or add a method that takes it",
            )
        _check_domain(label, f"search.params.{name}", domain)
    if search.space and not any("space" in REGISTRY[m].Params.model_fields for m in methods):
        raise RecipeError(
            f"{label}: search.space", "a method that takes merge.space", f"only {', '.join(methods)}", "remove search.space"
        )
    parse_metric(search.metric, where=f"{label}: search.metric")


def load_sweep(path: Path) -> Sweep:
    """Read and validate a sweep file (recipe part and search block); one-line errors."""
    if not path.is_file():
        raise RecipeError(str(path), "a sweep file (a recipe with a search: block)", "no such file", "check the path")
    data = read_recipe_yaml(path)
    label = str(path)
    if not isinstance(data, dict) or "search" not in data:
        raise RecipeError(label, "a recipe with a search: block", "no search: block", "add search: (docs/sweep.md)")
    raw = {k: v for k, v in data.items() if k != "search"}
    recipe = validate_recipe(raw, path.resolve().parent, label=label)
    try:
        search = SearchBlock.model_validate({"search": data["search"]}).search
    except ValidationError as err:
        raise to_recipe_error(err, label, (), SearchBlock) from None
    check_search(search, recipe, label)
    return Sweep(path, raw, recipe, search)
