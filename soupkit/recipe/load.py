"""Read a recipe file safely and turn every validation problem into a one-line RecipeError."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from soupkit.errors import RecipeError, did_you_mean
from soupkit.recipe.safe_yaml import read_recipe_yaml, shown
from soupkit.recipe.schema import AdapterSpec, MergeSpec, ModuleOverride, Recipe


def load_recipe(path: str | Path) -> Recipe:
    """Load and fully validate a recipe file (YAML is parsed with ``safe_load``: no code runs).

    Raises:
        RecipeError: the file is missing, not YAML, or not a valid recipe.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), "a recipe file", "no such file", "check the path")
    data = read_recipe_yaml(path)
    return validate_recipe(data, path.resolve().parent, label=str(path))


def validate_recipe(data: object, root: Path, label: str = "recipe") -> Recipe:
    """Validate parsed YAML: structure first, then the chosen method's own parameters."""
    from soupkit.methods import get_method

    if not isinstance(data, dict):
        raise RecipeError(label, "a mapping with base_model, adapters, merge", f"{type(data).__name__}", "see recipes/ for examples")
    data = {k: v for k, v in data.items() if k != "soupkit_lock"}  # a lock file is a recipe plus this
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _to_recipe_error(err, label, prefix=()) from None
    method = get_method(recipe.merge.method, where=f"{label}: merge.method")
    _check_space(recipe.merge, method.name, method.Params, label)
    try:
        recipe.merge._params = method.Params.model_validate(recipe.merge.model_extra or {})
    except ValidationError as err:
        raise _to_recipe_error(err, label, prefix=("merge",), params_model=method.Params) from None
    recipe._root = root
    return recipe


def _check_space(merge: MergeSpec, method: str, params_model: type[BaseModel], label: str) -> None:
    """``merge.space`` exists only for methods with a ``space`` parameter; say which ones otherwise."""
    extra = merge.model_extra or {}
    if "space" not in extra or "space" in params_model.model_fields:
        return
    from soupkit.methods import REGISTRY

    spaced = sorted(n for n, m in REGISTRY.items() if "space" in m.Params.model_fields)
    raise RecipeError(
        f"{label}: merge.space",
        f"no 'space' key for method '{method}' (it has one space of its own; full | core: {', '.join(spaced)})",
        repr(extra["space"]),
        "remove merge.space, or pick one of those methods",
    )


def _fields_at(loc: tuple, params_model: type[BaseModel] | None) -> list[str]:
    """Valid keys at the mapping that holds ``loc[-1]``, for did-you-mean suggestions."""
    parent = tuple(x for x in loc[:-1] if not isinstance(x, int))
    models: dict[tuple, type[BaseModel]] = {
        (): Recipe,
        ("adapters",): AdapterSpec,
        ("merge", "modules"): ModuleOverride,
    }
    if parent == ("merge",):
        params = [info.alias or name for name, info in params_model.model_fields.items()] if params_model else []
        return list(MergeSpec.model_fields) + params  # aliases: a recipe writes ``lambda``, not ``lambda_``
    model = models.get(parent)
    return list(model.model_fields) if model else []


# pydantic error type -> what the recipe needed there, in recipe words (no ``list[float]`` internals)
EXPECTED = {
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number (not .nan or .inf)",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "string_pattern_mismatch": "a name of letters, digits, '_', '.', '-' (not starting with a digit)",
}
LIMITS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
UNION_TAG = re.compile(r"^(float|int|str|bool|none|[a-z]+\[.*\]|function-.*)$")  # pydantic's names of union members


def recipe_path(loc: tuple) -> str:
    """``('adapters', 0, 'weight', 1)`` -> ``adapters[0].weight[1]`` (union member names dropped)."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text or "(top level)"


def _expected(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in EXPECTED:
        return EXPECTED[kind]
    if kind in LIMITS:
        limit = next(iter(ctx.values()), "?")
        return f"a number {LIMITS[kind]} {limit}"
    if kind == "too_short":
        return f"at least {ctx.get('min_length', 1)} item(s)"
    return error["msg"].removeprefix("Input should be ").removeprefix("Value should have ")


def _one_line(loc: tuple, error: dict, label: str, params_model: type[BaseModel] | None) -> RecipeError:
    where = f"{label}: {recipe_path(loc)}"
    kind, msg, value = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(loc, params_model)
        found = f"unknown key {shown(key, 60)}{did_you_mean(key, valid)}"
        return RecipeError(where, f"one of {', '.join(valid)}", found, "rename or remove it")
    if kind == "missing":
        return RecipeError(where, "a value", "nothing", f"add '{loc[-1]}'")
    if kind == "value_error":
        return RecipeError(where, "a valid value", msg.removeprefix("Value error, "), "fix the recipe")
    return RecipeError(where, _expected(error), shown(value), "fix the recipe (see `soupkit validate --help`)")


def _without_union_tags(errors: list[dict], prefix: tuple) -> list[tuple[tuple, dict]]:
    """(location, error) pairs with pydantic's union member names removed.

    A value of a union type (``weight``: a number or a list of numbers) fails once per member. Wrong-type
    errors of the member that does not apply are dropped (a list is not judged as a number); when every
    member fails on type, one error says what each member would have accepted.
    """
    groups: dict[tuple, list[tuple[tuple, dict]]] = {}
    for error in errors:
        loc = prefix + tuple(error["loc"])
        cut = next((i for i, part in enumerate(loc) if isinstance(part, str) and UNION_TAG.match(part)), None)
        if cut is None:
            groups.setdefault(loc, []).append((loc, error))
        else:
            clean = loc[:cut] + tuple(p for p in loc[cut + 1 :] if not (isinstance(p, str) and UNION_TAG.match(p)))
            groups.setdefault(loc[:cut], []).append((clean, {**error, "_union": True}))
    out: list[tuple[tuple, dict]] = []
    for key, members in groups.items():
        if not any("_union" in e for _, e in members):
            out += members
            continue
        specific = [(loc, e) for loc, e in members if not e["type"].endswith("_type")]
        if specific:
            out += specific
        else:
            either = " or ".join(dict.fromkeys(_expected(e) for _, e in members))
            out.append((key, {**members[0][1], "type": "union", "msg": either}))
    return out


def _to_recipe_error(err: ValidationError, label: str, prefix: tuple, params_model: type[BaseModel] | None = None) -> RecipeError:
    """The first validation error as a RecipeError; ``.more`` counts the others."""
    pairs = _without_union_tags(err.errors(), prefix)
    errors = [_one_line(loc, e, label, params_model) for loc, e in pairs]
    first = errors[0]
    first.more = errors[1:]  # type: ignore[attr-defined]
    return first
