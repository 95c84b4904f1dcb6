"""Pydantic validation errors rewritten as one-line RecipeErrors, in recipe words.

Independent of the schema: the valid keys for did-you-mean are read from the model tree it is given.
"""

from __future__ import annotations

import re
from typing import get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from soupkit.errors import RecipeError, did_you_mean
from soupkit.recipe.safe_yaml import shown


def model_at(root: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``path`` (field names) below ``root``, if any."""
    model: type[BaseModel] | None = root
    for key in path:
        field = model.model_fields.get(key) if model else None
        model = _model_in(field.annotation) if field else None
    return model


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The model inside an annotation such as ``list[AdapterSpec]`` or ``MergeSpec | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _fields_at(loc: tuple, root: type[BaseModel], params_model: type[BaseModel] | None) -> list[str]:
    """Valid keys at the mapping that holds ``loc[-1]``, for did-you-mean suggestions.

    A model that allows extra keys (``merge``) takes them from ``params_model``, by their recipe
    spelling (the alias: ``lambda``, not ``lambda_``).
    """
    model = model_at(root, tuple(x for x in loc[:-1] if not isinstance(x, int)))
    if model is None:
        return []
    fields = list(model.model_fields)
    if model.model_config.get("extra") == "allow" and params_model is not None:
        fields += [info.alias or name for name, info in params_model.model_fields.items()]
    return fields


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


RULE = "recipe_rule"  # a schema validator's own error: says what it expected and found (``recipe_rule``)


def recipe_rule(expected: str, found: str, fix: str, at: str | None = None) -> PydanticCustomError:
    """An error for a schema validator to raise, read back as one ``where: expected X, found Y; fix`` line.

    ``at`` names the field when the validator sits above it (a model validator judging ``adapters[1].name``).
    """
    return PydanticCustomError(RULE, "{found}", {"expected": expected, "found": found, "fix": fix, "at": at or ""})


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


def _one_line(loc: tuple, error: dict, label: str, root: type[BaseModel], params_model: type[BaseModel] | None) -> RecipeError:
    where = f"{label}: {recipe_path(loc)}"
    kind, msg, value = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(loc, root, params_model)
        found = f"unknown key {shown(key, 60)}{did_you_mean(key, valid)}"
        return RecipeError(where, f"one of {', '.join(valid)}", found, "rename or remove it")
    if kind == "missing":
        return RecipeError(where, "a value", "nothing", f"add '{loc[-1]}'")
    if kind == RULE:
        ctx = error["ctx"]
        return RecipeError(f"{label}: {ctx['at'] or recipe_path(loc)}", ctx["expected"], ctx["found"], ctx["fix"])
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
        # A member that failed inside the value (weight[1]) is the form the user wrote; a member that
        # failed on the whole value's type (a list is not a number) is not.
        specific = [(loc, e) for loc, e in members if len(loc) > len(key) or not e["type"].endswith("_type")]
        if specific:
            out += specific
        else:
            either = " or ".join(dict.fromkeys(_expected(e) for _, e in members))
            out.append((key, {**members[0][1], "type": "union", "msg": either}))
    return out


def to_recipe_error(
    err: ValidationError, label: str, prefix: tuple, root: type[BaseModel], params_model: type[BaseModel] | None = None
) -> RecipeError:
    """The first validation error as a RecipeError; ``.more`` counts the others.

    Args:
        err: what pydantic raised.
        label: the recipe file (or "recipe"), the start of every message.
        prefix: where the validated mapping sits in the recipe (``("merge",)`` for method parameters).
        root: the recipe's top model, whose fields name the valid keys for did-you-mean.
        params_model: the method's parameter model, for keys under ``merge``.
    """
    pairs = _without_union_tags(err.errors(), prefix)
    errors = [_one_line(loc, e, label, root, params_model) for loc, e in pairs]
    first = errors[0]
    first.more = errors[1:]  # type: ignore[attr-defined]
    return first
