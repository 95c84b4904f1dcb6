"""Recipe: schema, loading, lock file."""

from soupkit.recipe.load import load_recipe
from soupkit.recipe.schema import AdapterSpec, MergeSpec, ModuleOverride, Recipe, validate_recipe

__all__ = ["AdapterSpec", "MergeSpec", "ModuleOverride", "Recipe", "load_recipe", "validate_recipe"]
