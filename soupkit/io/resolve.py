"""Turn a recipe's reference (local path or hub id) into a local directory."""

from __future__ import annotations

import re
from pathlib import Path

from soupkit.errors import RecipeError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve_reference(ref: str, root: Path, where: str) -> Path:
    """Resolve ``ref`` against the recipe's directory ``root``.

    Args:
        ref: a local path (absolute, or relative to the recipe file) or a hub id ``org/name[@rev]``.
        root: the directory of the recipe file.
        where: the recipe field, for messages.
    """
    local = Path(ref).expanduser()
    local = local if local.is_absolute() else root / local
    if local.is_dir():
        return local.resolve()
    if HUB_ID.match(ref) and not ref.startswith((".", "/")):
        raise RecipeError(where, "a local directory", f"hub id '{ref}' (not fetched)", "download it first and give its local path")
    raise RecipeError(where, "an existing directory", f"'{ref}' (resolved to {local})", "fix the path; relative paths start at the recipe file")
