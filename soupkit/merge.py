"""Run a recipe end to end: plan, merge into an adapter (``execute``) or a full model (``export``),
then write the lock file and model card, all into a temporary folder renamed to OUT at the end."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from soupkit.card import model_card
from soupkit.errors import SoupkitError, warn_user
from soupkit.execute import (
    Inputs,
    RunOptions,
    base_reference,
    check_inputs_apart,
    memory_problem,
    plan_recipe,
    resolve_device,
    write_adapter,
)
from soupkit.io.adapter_config import VLLM_MODULES_TO_SAVE
from soupkit.io.output_guard import atomic_dir, check_replaceable, claim, resolve_output
from soupkit.io.resolve import TOKENIZER_VOCAB_FILES, has_tokenizer, lock_reference
from soupkit.plan import Plan
from soupkit.recipe.lock import LOCK_NAME, file_hashes, write_lock
from soupkit.recipe.schema import Recipe

DEFAULT_OPTIONS = RunOptions()
DTYPE_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # recipe dtype -> safetensors tag


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
    plan = serving_plan(recipe, plan, options)
    problem = memory_problem(plan, options.device)
    if problem is not None:
        raise problem
    if recipe.output == "model":
        warn_about_model_output(recipe, inputs)
    report = MergeReport(plan=plan, out=out)
    if target is not None:  # before any work; replaceable is checked again under the lock
        check_inputs_apart(target, inputs, recipe_file)
        check_replaceable(target, options.overwrite)
    if options.dry_run or target is None:
        return report
    resolve_device(options.device)
    with claim([target], options.overwrite, "soupkit merge"), atomic_dir(target, options.overwrite) as tmp:
        if recipe.output == "model":
            from soupkit.export import export_model  # here: an adapter merge need not load (nor compile) it

            report.energy_kept = export_model(recipe, plan, inputs, tmp, target.path, options)
        else:
            report.energy_kept = write_adapter(recipe, plan, inputs, tmp, target.path, options)
        write_sidecars(recipe, plan, inputs, tmp, target.path, report)
    report.seconds = time.perf_counter() - start
    return report


def serving_plan(recipe: Recipe, plan: Plan, options: RunOptions) -> Plan:
    """Apply ``--serving vllm`` / ``--drop-modules-to-save`` to an adapter output that keeps modules_to_save."""
    if recipe.output == "model":  # a full model folds them in: every loader takes it
        return plan
    if plan.biased and options.serving == "vllm":
        raise SoupkitError(
            "--serving vllm",
            "an adapter vLLM can load",
            f"lora_bias on {len(plan.biased)} modules (vLLM loads no lora_B.bias; its LoRA bias support is deprecated)",
            "write a full model (--output-type model)",
        )
    if plan.target_parameters and options.serving == "vllm":
        raise SoupkitError(
            "--serving vllm",
            "an adapter vLLM can load",
            f"target_parameters {', '.join(plan.target_parameters)} (stock vLLM misreads PEFT's fused-expert LoRA layout, vLLM #52198)",
            "write a full model (--output-type model)",
        )
    if not plan.saved:
        return plan
    names = ", ".join(s.name for s in plan.saved)
    if options.drop_modules_to_save:
        print(f"note: dropped modules_to_save ({names}): the output adapter keeps only the LoRA updates", file=sys.stderr)
        return replace(plan, saved=(), modules_to_save=())
    if options.serving == "vllm":
        raise SoupkitError(
            "--serving vllm",
            "an adapter vLLM can load",
            f"modules_to_save {names} (vLLM only supports modules_to_save being None)",
            "add --drop-modules-to-save to leave them out, or write a full model (--output-type model)",
        )
    print(f"warning: the adapter keeps modules_to_save ({names}); PEFT loads it, but {VLLM_MODULES_TO_SAVE}", file=sys.stderr)
    return plan


def warn_about_model_output(recipe: Recipe, inputs: Inputs) -> None:
    """A full model without a tokenizer, or a recipe ``dtype`` that a full model does not use: say so, go on."""
    base = inputs.base.directory
    if not has_tokenizer(base):
        warn_user(
            f"base_model {base} has no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES[:2])}, ...), so the model is "
            "written without one; copy the base's tokenizer files into the output before loading it"
        )
    float_tags = {info.dtype for info in inputs.base.index.infos.values() if info.dtype in ("F32", "F16", "BF16")}
    if "dtype" in recipe.model_fields_set and not recipe.from_lock_file and float_tags != {DTYPE_TAGS[recipe.dtype]}:
        warn_user(
            f"dtype: {recipe.dtype} applies to adapter outputs only; a full model keeps the base's own dtype "
            f"({', '.join(sorted(float_tags))}); remove dtype, or convert the exported model"
        )


def write_sidecars(recipe: Recipe, plan: Plan, inputs: Inputs, tmp: Path, out: Path, report: MergeReport) -> None:
    """Lock file and model card. Input paths are written relative to ``out`` so the lock reruns."""
    resolved = recipe.resolved()
    resolved["base_model"] = lock_reference(inputs.base.directory, out)  # hub inputs pinned to their commit
    for spec, adapter in zip(resolved["adapters"], inputs.adapters, strict=True):
        spec["path"] = lock_reference(adapter.directory, out)
    dora = any(a.magnitudes for a in inputs.adapters)  # DoRA task vectors read the base weights
    reads_base = recipe.output == "model" or bool(plan.saved) or dora  # modules_to_save merges read base values
    hashes = {"base_model": file_hashes(inputs.base.files(), inputs.base.directory, header_only=not reads_base)}
    for adapter in inputs.adapters:
        hashes[adapter.name] = file_hashes(adapter.files(), adapter.directory)
    summary = {"rank": plan.rank, "modules": len(plan.modules)}
    if report.energy_kept:
        summary["energy_kept_min"] = min(report.energy_kept.values())
        summary["energy_kept"] = report.energy_kept
    base, _ = base_reference(recipe, inputs)
    hub_base = None if Path(base).is_absolute() else base
    card = model_card(
        resolved, plan.rank, list(plan.target_modules), recipe.output, hub_base, report.energy_kept, str(inputs.base.directory)
    )
    if plan.saved and recipe.output == "adapter":
        names = ", ".join(f"`{s.name}`" for s in plan.saved)
        card += f"\n## modules_to_save\n\nThis adapter keeps full merged copies of {names}. PEFT loads them; {VLLM_MODULES_TO_SAVE}.\n"
    (tmp / "README.md").write_text(card)
    outputs = file_hashes(sorted(f for f in tmp.rglob("*") if f.is_file() and f.name != LOCK_NAME), tmp)
    write_lock(tmp / LOCK_NAME, resolved, hashes, summary, outputs)
