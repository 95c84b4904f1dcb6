"""Parse a recipe's YAML with limits: no code, no duplicate keys, bounded size and expansion.

``yaml.safe_load`` already runs no code. What it allows and a recipe must not:
- duplicate keys (``weight: 1`` then ``weight: 2`` silently keeps the last);
- alias bombs: ``a: &a [x, x, ...]``, ``b: &b [*a, *a, ...]`` ... is a few hundred bytes that
  expands to billions of values once anything walks it (validation, error messages);
- huge files. A fitted recipe for an 80-layer model with 50 adapters is under 1 MB.

Numbers follow YAML 1.2 (core schema), not PyYAML's YAML 1.1: ``1e6`` and ``2e-1`` are numbers, ``017``
is seventeen, and ``1_000`` or ``1:20`` are strings. An integer of more than Python's 4300 digits is refused.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import BinaryIO

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from soupkit.errors import RecipeError

MAX_RECIPE_BYTES = 4 * 1024 * 1024
MAX_EXPANDED_NODES = 1_000_000  # values after aliases are expanded; a large fitted recipe has ~100k
MERGE_TAG = "tag:yaml.org,2002:merge"


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a bad value may be megabytes long)."""
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# libyaml's parser where PyYAML has it (a 4 MB file parses in well under a second; the Python one takes seconds)
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
YAML12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
YAML12_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class SafeParser(_BASE_LOADER):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader with YAML 1.2 number resolution (``1e6`` is a float, as users write it)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (INT_TAG, FLOAT_TAG)]
        for first, resolvers in _BASE_LOADER.yaml_implicit_resolvers.items()
    }
    yaml_constructors = dict(_BASE_LOADER.yaml_constructors)


def _construct_int(loader: yaml.BaseLoader, node: ScalarNode) -> int:
    text = str(node.value)
    base = 16 if text.startswith("0x") else 8 if text.startswith("0o") else 10
    try:
        return int(text[2:] if base != 10 else text, base)
    except ValueError:
        if base == 10 and YAML12_INT.match(text):  # Python refuses int() of more than 4300 digits
            raise RecipeError(
                f"{loader.name}:{node.start_mark.line + 1}",
                # vermin dates the getter 3.11, but it came with the digit limit itself (3.10.7): never reached without it
                f"a number of at most {sys.get_int_max_str_digits() or 4300} digits",  # novermin
                f"an integer of {len(text)} characters",
                "shorten it",
            ) from None
        raise yaml.constructor.ConstructorError(None, None, f"not an integer: {shown(text)}", node.start_mark) from None


def _construct_float(loader: yaml.BaseLoader, node: ScalarNode) -> float:
    text = str(node.value).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"not a number: {shown(text)}", node.start_mark) from None


for _first in "-+0123456789.":
    SafeParser.yaml_implicit_resolvers.setdefault(_first, [])
    SafeParser.yaml_implicit_resolvers[_first] = [
        (INT_TAG, YAML12_INT),
        (FLOAT_TAG, YAML12_FLOAT),
        *SafeParser.yaml_implicit_resolvers[_first],
    ]
SafeParser.add_constructor(INT_TAG, _construct_int)
SafeParser.add_constructor(FLOAT_TAG, _construct_float)
SAFE_PARSER = SafeParser


def check_duplicate_keys(node: MappingNode, source: str) -> None:
    """Refuse a key written twice in one mapping (YAML merge keys ``<<`` may still override)."""
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:  # the mapping as written, before ``<<`` merges are flattened in
        if not isinstance(key, ScalarNode) or key.tag == MERGE_TAG:
            continue
        ident = (key.tag, key.value)
        if ident in seen:
            raise RecipeError(
                f"{source}:{key.start_mark.line + 1}",
                "each key once per mapping",
                f"a second {shown(key.value, 60)}",
                "remove one of them",
            )
        seen.add(ident)


def expanded_size(root: Node, cap: int, source: str = "recipe") -> int:
    """Number of nodes once every alias is expanded, capped at ``cap + 1``; duplicate keys are refused on the way.

    Aliases share node objects, so sizes are memoised per node: linear in the file, not in the
    expansion. A recursive document (an alias inside its own anchor) counts as ``cap + 1``.
    """
    size: dict[int, int] = {}
    on_path = {id(root)}
    if isinstance(root, MappingNode):
        check_duplicate_keys(root, source)
    stack: list[tuple[Node, list[Node], int]] = [(root, _children(root), 0)]
    while stack:
        node, kids, i = stack[-1]
        if i < len(kids):
            stack[-1] = (node, kids, i + 1)
            kid = kids[i]
            if id(kid) in size:
                continue
            if id(kid) in on_path:
                return cap + 1
            if isinstance(kid, MappingNode):
                check_duplicate_keys(kid, source)
            on_path.add(id(kid))
            stack.append((kid, _children(kid), 0))
        else:
            stack.pop()
            on_path.discard(id(node))
            size[id(node)] = min(cap + 1, 1 + sum(size[id(k)] for k in kids))
    return size[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_recipe_yaml(path: Path) -> object:
    """The parsed YAML of a recipe file; every problem is a one-line RecipeError."""
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise _too_large(str(path), f"{size / 2**20:.1f} MB")
    return parse_recipe_yaml(path.read_bytes(), str(path))


def read_recipe_stream(stream: BinaryIO, source: str) -> object:
    """The parsed YAML of a recipe read from stdin or a pipe (at most MAX_RECIPE_BYTES + 1 bytes are read)."""
    data = stream.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise _too_large(source, "more")
    return parse_recipe_yaml(data, source)


def _too_large(source: str, found: str) -> RecipeError:
    limit = f"a recipe of at most {MAX_RECIPE_BYTES // 2**20} MB"
    return RecipeError(source, limit, found, "is this the recipe file? shorten it")


def parse_recipe_yaml(data: bytes, source: str) -> object:
    """Parse a recipe's bytes (UTF-8 YAML) with the limits above; ``source`` names it in messages."""
    path = source
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise RecipeError(source, "a UTF-8 text file", "binary content", "point at the recipe .yaml") from None
    loader = SAFE_PARSER(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node, MAX_EXPANDED_NODES, str(path)) > MAX_EXPANDED_NODES:
            raise RecipeError(
                str(path),
                f"at most {MAX_EXPANDED_NODES:,} values once aliases are expanded",
                "more (an alias bomb?)",
                "write the recipe without nested aliases",
            )
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(where, "valid YAML", f"a syntax error ({err.problem})", "fix the YAML at that line") from None
    except yaml.YAMLError as err:
        raise RecipeError(str(path), "valid YAML", f"unreadable content ({type(err).__name__})", "fix the file") from None
    except RecursionError:
        raise RecipeError(
            str(path), "YAML nested at most a few hundred levels deep", "deeper nesting", "flatten the recipe"
        ) from None
    finally:
        loader.dispose()
