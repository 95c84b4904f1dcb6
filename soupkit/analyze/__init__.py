"""``soupkit analyze``: how a recipe's adapters interfere, from their factors, before merging.

Layer: after execute (it opens inputs and walks the plan as the merge does), before cli.
"""

from __future__ import annotations

from pathlib import Path

from soupkit.analyze.report import format_table, write_heatmaps, write_json
from soupkit.analyze.run import analyze_recipe
from soupkit.recipe.schema import Recipe

__all__ = ["analyze_recipe", "analyze_to", "format_table"]


def analyze_to(
    recipe: Recipe,
    out: Path,
    dense: bool = False,
    base_norms: bool = True,
    overwrite: bool = False,
    recipe_file: Path | None = None,
) -> dict:
    """Analyse ``recipe`` and write ``out``/analysis.json, ``out``/table.md and one PNG per statistic.

    ``out`` is checked by :mod:`soupkit.io.output_guard` (docs/safety.md): never an input or
    ``recipe_file`` (nor a folder holding one), replaced only with ``overwrite`` and only if soupkit
    analyze wrote it, one writer at a time, created atomically. Nothing else is written or changed.
    """
    from soupkit.execute import check_inputs_apart, open_inputs
    from soupkit.io.output_guard import atomic_dir, check_replaceable, claim, resolve_output
    from soupkit.io.output_markers import ANALYSIS_MARKER

    target = resolve_output(out, "-o", "analysis")
    check_inputs_apart(target, open_inputs(recipe), recipe_file)  # headers only
    check_replaceable(target, overwrite)  # before any reading: a taken path fails at once
    with claim([target], overwrite, "soupkit analyze"):
        result = analyze_recipe(recipe, dense=dense, base_norms=base_norms)
        with atomic_dir(target, overwrite) as tmp:
            write_json({"written_by": ANALYSIS_MARKER, **result}, tmp / "analysis.json")  # first key: the ownership marker
            (tmp / "table.md").write_text(format_table(result) + "\n")
            write_heatmaps(result, tmp)
    return result
