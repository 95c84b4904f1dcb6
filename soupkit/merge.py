"""Run a recipe end to end: plan, merge into an adapter (``execute``) or a full model (``export``),
then write the lock file and model card, all into a temporary folder renamed to OUT at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from soupkit.card import model_card
from soupkit.execute import Inputs, RunOptions, check_inputs_apart, memory_problem, plan_recipe, resolve_device, write_adapter
from soupkit.export import export_model
from soupkit.io.output_guard import atomic_dir, check_replaceable, claim, resolve_output
from soupkit.io.resolve import hub_name, hub_pin, lock_reference
from soupkit.plan import Plan
from soupkit.recipe.lock import LOCK_NAME, file_hashes, write_lock
from soupkit.recipe.schema import Recipe

DEFAULT_OPTIONS = RunOptions()


@dataclass
class MergeReport:
    """What a merge did: its plan, where it wrote, energy kept per truncated module, seconds."""

    plan: Plan
    out: Path | None
    energy_kept: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def merge_recipe(
    recipe: Recipe, out: Path | None, options: RunOptions = DEFAULT_OPTIONS, recipe_file: Path | None = None
) -> MergeReport:
    """Run a recipe: plan from headers, then stream the merge into ``out`` atomically.

    With ``options.dry_run`` only the plan is built. Raises SoupkitError for any user error,
    before anything is written. ``out`` is checked by :mod:`soupkit.io.output_guard` (docs/safety.md):
    never an input or ``recipe_file`` (nor a folder holding one), replaced only if soupkit wrote it,
    one writer at a time.
    """
    start = time.perf_counter()
    target = resolve_output(out, "-o", "merge") if out is not None else None
    plan, inputs = plan_recipe(recipe)  # headers only
    problem = memory_problem(plan, options.device)
    if problem is not None:
        raise problem
    report = MergeReport(plan=plan, out=out)
    if target is not None:  # before any work; replaceable is checked again under the lock
        check_inputs_apart(target, inputs, recipe_file)
        check_replaceable(target, options.overwrite)
    if options.dry_run or target is None:
        return report
    resolve_device(options.device)
    with claim([target], options.overwrite, "soupkit merge"), atomic_dir(target, options.overwrite) as tmp:
        if recipe.output == "model":
            report.energy_kept = export_model(recipe, plan, inputs, tmp, target.path, options)
        else:
            report.energy_kept = write_adapter(recipe, plan, inputs, tmp, target.path, options)
        write_sidecars(recipe, plan, inputs, tmp, target.path, report)
    report.seconds = time.perf_counter() - start
    return report


def write_sidecars(recipe: Recipe, plan: Plan, inputs: Inputs, tmp: Path, out: Path, report: MergeReport) -> None:
    """Lock file and model card. Input paths are written relative to ``out`` so the lock reruns."""
    resolved = recipe.resolved()
    resolved["base_model"] = lock_reference(inputs.base.directory, out)  # hub inputs pinned to their commit
    for spec, adapter in zip(resolved["adapters"], inputs.adapters, strict=True):
        spec["path"] = lock_reference(adapter.directory, out)
    hashes = {"base_model": file_hashes(inputs.base.files(), inputs.base.directory, header_only=recipe.output == "adapter")}
    for adapter in inputs.adapters:
        hashes[adapter.name] = file_hashes(adapter.files(), adapter.directory)
    summary = {"rank": plan.rank, "modules": len(plan.modules)}
    if report.energy_kept:
        summary["energy_kept_min"] = min(report.energy_kept.values())
        summary["energy_kept"] = report.energy_kept
    hub_base = hub_name(recipe.base_model) if hub_pin(inputs.base.directory) else None
    (tmp / "README.md").write_text(model_card(resolved, plan.rank, list(plan.target_modules), recipe.output, hub_base))
    outputs = file_hashes(sorted(f for f in tmp.rglob("*") if f.is_file() and f.name != LOCK_NAME), tmp)
    write_lock(tmp / LOCK_NAME, resolved, hashes, summary, outputs)
