"""``soupkit analyze``: how a recipe's adapters interfere, from their factors, before merging.

Layer: after execute (it opens inputs and walks the plan as the merge does), before cli.
"""

from __future__ import annotations

from pathlib import Path

from soupkit.analyze.report import format_table, write_heatmaps, write_json
from soupkit.analyze.run import analyze_recipe
from soupkit.recipe.schema import Recipe

__all__ = ["analyze_recipe", "analyze_to", "format_table"]


def analyze_to(recipe: Recipe, out: Path, dense: bool = False, base_norms: bool = True, overwrite: bool = False) -> dict:
    """Analyse ``recipe`` and write ``out``/analysis.json, ``out``/table.md and one PNG per statistic.

    ``out`` is created atomically (an existing path is refused unless ``overwrite``); nothing else
    is written or changed.
    """
    from soupkit.io.writer import atomic_output_dir, check_output_free

    check_output_free(out, overwrite)  # before any reading: a taken path fails at once
    result = analyze_recipe(recipe, dense=dense, base_norms=base_norms)
    with atomic_output_dir(out, overwrite) as tmp:
        write_json(result, tmp / "analysis.json")
        (tmp / "table.md").write_text(format_table(result) + "\n")
        write_heatmaps(result, tmp)
    return result
