"""Read a recipe file safely and validate it (``schema.validate_recipe``: one-line RecipeErrors)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from soupkit.errors import RecipeError
from soupkit.recipe.safe_yaml import read_recipe_stream, read_recipe_yaml
from soupkit.recipe.schema import Recipe, validate_recipe

STDIN_NAMES = ("-", "/dev/stdin")


def reads_stdin(path: str | Path) -> bool:
    """``-`` and ``/dev/stdin`` name the recipe piped in (``cat recipe.yaml | soupkit merge - -o out``)."""
    return str(path) in STDIN_NAMES


def load_recipe(path: str | Path) -> Recipe:
    """Load and fully validate a recipe file (YAML is parsed with ``safe_load``: no code runs).

    ``-`` or ``/dev/stdin`` reads the recipe from stdin, and another pipe (``<(...)``) is read the
    same way; relative paths in such a recipe resolve against the current folder.

    Raises:
        RecipeError: the file is missing, not YAML, or not a valid recipe.
    """
    if reads_stdin(path):
        data = read_recipe_stream(sys.stdin.buffer, "<stdin>")
        return validate_recipe(data, Path.cwd(), label="<stdin>")
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))[:20]
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise RecipeError(str(path), "a recipe file", f"a directory{hint}", "point at the recipe .yaml inside it")
    if path.exists() and not path.is_file() and stat.S_ISFIFO(path.stat().st_mode):  # a pipe: <(generate-recipe)
        with path.open("rb") as stream:
            return validate_recipe(read_recipe_stream(stream, str(path)), Path.cwd(), label=str(path))
    if not path.is_file():
        raise RecipeError(str(path), "a recipe file", "no such file", "check the path")
    data = read_recipe_yaml(path)
    return validate_recipe(data, path.resolve().parent, label=str(path))
