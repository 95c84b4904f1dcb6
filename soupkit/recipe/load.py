"""Read a recipe file safely and validate it (``schema.validate_recipe``: one-line RecipeErrors)."""

from __future__ import annotations

from pathlib import Path

from soupkit.errors import RecipeError
from soupkit.recipe.safe_yaml import read_recipe_yaml
from soupkit.recipe.schema import Recipe, validate_recipe


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
