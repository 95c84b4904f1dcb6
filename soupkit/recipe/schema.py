"""The recipe schema (pydantic v2, strict: unknown keys are errors).

The recipe's ``merge:`` is validated by the chosen method's own ``Params`` model, taken from the
method registry (``validate_recipe``). Field descriptions here are the single documentation of each
field: ``soupkit validate --help`` prints them, and a test checks that docs/recipe.md's field table
lists every one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from soupkit.errors import RecipeError, did_you_mean
from soupkit.methods.base import MergeMethod, MethodParams
from soupkit.methods.registry import REGISTRY, get_method
from soupkit.recipe.messages import recipe_rule, to_recipe_error

Weight = float | list[float]


class StrictModel(BaseModel):
    # YAML's .nan / .inf are never a valid number; strict: YAML types are exact, so `weight: yes` is not 1.0
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class AdapterSpec(StrictModel):
    """One input adapter."""

    name: str = Field(
        description="Short unique name, used in per-module weights and messages.", pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$"
    )
    path: str = Field(description="PEFT adapter directory (relative to the recipe file) or a hub id org/name[@revision].")
    weight: Weight = Field(
        default=1.0,
        description="Mixing weight; a list is a gradient interpolated linearly across layers (first value at layer 0, "
        "last at the last layer; modules outside the layer stack take the first value).",
    )

    @field_validator("weight")
    @classmethod
    def _non_empty(cls, value: Weight) -> Weight:
        if isinstance(value, list) and not value:
            raise recipe_rule("a number or a list of at least one number", "an empty list []", "give the weight a value")
        return value


class ModuleOverride(StrictModel):
    """Per-module weights: applies to modules whose path matches the glob; the last match wins."""

    match: str = Field(description="Glob on the module path, e.g. '*.mlp.*' or 'model.layers.3.self_attn.q_proj'.")
    weights: dict[str, Weight] = Field(description="Adapter name -> weight (or gradient) for matching modules.")


class MergeSpec(BaseModel):
    """How to merge. Keys other than these are the method's own parameters (see `soupkit methods`)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    method: str = Field(description="A method name from `soupkit methods`.")
    rank: int | None = Field(default=None, ge=1, description="Output rank budget for methods that re-factorise.")
    modules: list[ModuleOverride] = Field(default_factory=list, description="Per-module weight overrides.")
    min_energy: float = Field(
        default=0.99,
        ge=0.0,
        le=1.0,
        description="DoRA inputs, adapter output: the least fraction of each merged update's Frobenius energy the "
        "rank-k adapter must keep (the error names the rank that would).",
    )
    _params: MethodParams | None = PrivateAttr(default=None)

    @property
    def params(self) -> MethodParams:
        """The method's validated parameters (set by ``load_recipe`` / ``Recipe.from_dict``)."""
        if self._params is None:
            raise RuntimeError("merge parameters were not validated; build recipes with Recipe.from_dict")
        return self._params


class Recipe(StrictModel):
    """A merge recipe: base model, adapters, method, output."""

    base_model: str = Field(description="Base model directory (relative to the recipe file) or hub id org/name[@revision].")
    adapters: list[AdapterSpec] = Field(min_length=1, description="The adapters to merge, in order.")
    merge: MergeSpec = Field(description="Method and its parameters.")
    output: Literal["adapter", "model"] = Field(default="adapter", description="Write a PEFT adapter or a full model.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="bfloat16", description="Dtype of the written adapter tensors; the maths runs in float32."
    )
    seed: int = Field(default=0, description="Seed of every random choice (DARE drops, k-means init).")
    _root: Path = PrivateAttr(default_factory=Path.cwd)
    _locked_versions: dict | None = PrivateAttr(default=None)  # a lock file's versions section, else None
    _source: dict = PrivateAttr(default_factory=dict)  # the parsed YAML as written (fit-alpha edits a copy)

    @model_validator(mode="after")
    def _check_names(self) -> Recipe:
        names = [a.name for a in self.adapters]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise recipe_rule(
                    "a name no other adapter has",
                    f"duplicate adapter name '{name}' (also adapters[{names.index(name)}])",
                    "give each adapter a unique name",
                    at=f"adapters[{i}].name",
                )
        for i, override in enumerate(self.merge.modules):
            for key in override.weights:
                if key not in names:
                    raise recipe_rule(
                        f"an adapter name, one of {', '.join(names)}"[:200],
                        f"'{key[:60]}'{did_you_mean(key, names)}",
                        "use the adapter's name from adapters[]",
                        at=f"merge.modules[{i}].weights.{key[:60]}",
                    )
        return self

    @property
    def root(self) -> Path:
        """Directory that relative paths in the recipe resolve against (the recipe file's)."""
        return self._root

    @classmethod
    def from_dict(cls, data: object, root: Path | None = None) -> Recipe:
        """Validate a parsed recipe, method parameters included; errors are ``RecipeError``."""
        return validate_recipe(data, root or Path.cwd())

    @property
    def from_lock_file(self) -> bool:
        """Whether this recipe is a lock file (every default written out, so no field was chosen by hand)."""
        return self._locked_versions is not None

    def source_data(self) -> dict:
        """A copy of the recipe's parsed YAML as written (no defaults filled in, no lock section)."""
        return copy.deepcopy(self._source)

    def generator_change(self) -> str | None:
        """Why a rerun of this lock file cannot repeat its random draws bit for bit, or None.

        The lock records the generator of its DARE/DELLA/KnOTS masks (``versions.rng``); another
        generator draws other masks, so such a method gives another output from the same recipe."""
        from soupkit.rng import RNG_NAME

        if self._locked_versions is None:
            return None
        locked = self._locked_versions.get("rng")
        if locked == RNG_NAME:
            return None
        was = f"generator '{locked}'" if locked else "an older soupkit (no generator recorded)"
        return (
            f"this lock file was written with {was}; this soupkit draws with '{RNG_NAME}', so methods with random "
            "masks (dare_*, della, knots with dare_density) will not reproduce the locked output bit for bit"
        )

    def resolved(self) -> dict:
        """The recipe with every default filled in, method parameters included (for the lock file)."""
        data = self.model_dump(mode="json", exclude={"merge"})
        merge = {"method": self.merge.method, "rank": self.merge.rank, **self.merge.params.model_dump(mode="json")}
        merge["modules"] = [m.model_dump(mode="json") for m in self.merge.modules]
        if "min_energy" in self.merge.model_fields_set:
            merge["min_energy"] = self.merge.min_energy
        return {**data, "merge": merge}


def validate_recipe(data: object, root: Path, label: str = "recipe") -> Recipe:
    """Validate parsed YAML: structure first, then the chosen method's own parameters."""
    if not isinstance(data, dict):
        raise RecipeError(
            label, "a mapping with base_model, adapters, merge", f"{type(data).__name__}", "see recipes/ for examples"
        )
    lock = data.get("soupkit_lock")
    data = {k: v for k, v in data.items() if k != "soupkit_lock"}  # a lock file is a recipe plus this
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise to_recipe_error(err, label, (), Recipe) from None
    method = get_method(recipe.merge.method, where=f"{label}: merge.method")
    _check_space(recipe.merge, method.name, method.Params, label)
    try:
        recipe.merge._params = method.Params.model_validate(recipe.merge.model_extra or {})
    except ValidationError as err:
        raise to_recipe_error(err, label, ("merge",), Recipe, method.Params) from None
    _check_weights(recipe, method, label)
    recipe._root = root
    recipe._source = copy.deepcopy(data)
    if isinstance(lock, dict):
        versions = lock.get("versions")
        recipe._locked_versions = versions if isinstance(versions, dict) else {}
    return recipe


def _check_weights(recipe: Recipe, method: MergeMethod, label: str) -> None:
    """Every weight the recipe writes (a gradient's points, per-module overrides) must suit the method's
    parameters: module weights interpolate between these values, so they stay within their range."""
    written: list[float] = []
    for weight in [a.weight for a in recipe.adapters] + [w for m in recipe.merge.modules for w in m.weights.values()]:
        written.extend(weight if isinstance(weight, list) else [weight])
    reason = method.check_weights(recipe.merge.params, written)
    if reason:
        raise RecipeError(
            f"{label}: merge.normalize",
            "every weight >= 0 (normalize: weights divides by the sum of the agreeing adapters' weights)",
            reason,
            "make the weights >= 0, or use normalize: count",
        )


def _check_space(merge: MergeSpec, method: str, params_model: type[BaseModel], label: str) -> None:
    """``merge.space`` exists only for methods with a ``space`` parameter; say which ones otherwise."""
    extra = merge.model_extra or {}
    if "space" not in extra or "space" in params_model.model_fields:
        return
    spaced = sorted(n for n, m in REGISTRY.items() if "space" in m.Params.model_fields)
    raise RecipeError(
        f"{label}: merge.space",
        f"no 'space' key for method '{method}' (it has one space of its own; full | core: {', '.join(spaced)})",
        repr(extra["space"]),
        "remove merge.space, or pick one of those methods",
    )
