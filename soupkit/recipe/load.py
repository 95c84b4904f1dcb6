"""Read a recipe file safely and turn every validation problem into a one-line RecipeError."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from soupkit.errors import RecipeError, did_you_mean
from soupkit.recipe.schema import AdapterSpec, MergeSpec, ModuleOverride, Recipe


def load_recipe(path: str | Path) -> Recipe:
    """Load and fully validate a recipe file (YAML is parsed with ``safe_load``: no code runs).

    Raises:
        RecipeError: the file is missing, not YAML, or not a valid recipe.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), "a recipe file", "no such file", "check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(where, "valid YAML", f"a syntax error ({err.problem})", "fix the YAML at that line") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(str(path), "valid YAML", f"unreadable content ({type(err).__name__})", "fix the file") from None
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


def _one_line(error: dict, label: str, prefix: tuple, params_model: type[BaseModel] | None) -> RecipeError:
    loc = prefix + tuple(error["loc"])
    where = f"{label}: {'.'.join(str(x) for x in loc) or '(top level)'}"
    kind, msg, value = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(loc, params_model)
        return RecipeError(where, f"one of {', '.join(valid)}", f"unknown key '{key}'{did_you_mean(key, valid)}", "rename or remove it")
    if kind == "missing":
        return RecipeError(where, "a value", "nothing", f"add '{loc[-1]}'")
    if kind == "value_error":
        return RecipeError(where, "a valid value", msg.removeprefix("Value error, "), "fix the recipe")
    expected = msg.removeprefix("Input should be ").removeprefix("Value should have ")
    return RecipeError(where, expected, repr(value), "fix the recipe (see `soupkit validate --help`)")


def _to_recipe_error(err: ValidationError, label: str, prefix: tuple, params_model: type[BaseModel] | None = None) -> RecipeError:
    """The first validation error as a RecipeError; the others ride along in ``.more``."""
    errors = [_one_line(e, label, prefix, params_model) for e in err.errors()]
    first = errors[0]
    first.more = errors[1:]  # type: ignore[attr-defined]
    return first
