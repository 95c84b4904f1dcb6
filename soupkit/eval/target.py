"""What ``soupkit eval`` scores: a recipe (merged in memory), a PEFT adapter folder, or a full model folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from soupkit.errors import SoupkitError
from soupkit.eval.model import LowRankUpdate, ScoringModel, load_scoring_model
from soupkit.execute import TORCH_DTYPE, Inputs, iter_merged, load_sources, open_inputs
from soupkit.io.adapter import LoraAdapter
from soupkit.io.resolve import resolve_reference
from soupkit.methods import LoraFactors
from soupkit.plan import ModulePlan, Plan, build_plan, module_weight
from soupkit.recipe import Recipe, load_recipe


def refuse_unscorable(plan: Plan, where: str) -> None:
    """What the low-rank hooks cannot apply is refused, never dropped: expert parameters, saved modules, biases."""
    problem = None
    if any(m.kind == "param" for m in plan.modules if m.sources):
        problem = "LoRAs on targeted parameters (MoE experts, target_parameters)"
    elif plan.saved:
        problem = "modules_to_save tensors"
    elif plan.biased:
        problem = "lora_bias updates"
    if problem:
        raise SoupkitError(
            where,
            "adapters of Linear and Embedding LoRA modules (what eval applies in memory)",
            problem,
            "merge with `soupkit merge ... --output model` (output: model) and eval that model folder",
        )


class InMemoryMerger:
    """A recipe's inputs opened once, their factors kept on ``device``: any recipe over them merges in memory.

    Factors are read from the files once (first merge) and reused (``Inputs.factor_cache``), so a
    trial costs the method's maths only. The merged factors are float32, as ``execute.iter_merged``
    gives them to the writer.
    """

    def __init__(self, recipe: Recipe, device: torch.device) -> None:
        self.inputs: Inputs = open_inputs(recipe)
        self.inputs.factor_cache = {}
        self.device = device

    def plan(self, recipe: Recipe) -> Plan:
        plan = build_plan(recipe, self.inputs.adapters, self.inputs.base, recipe.dtype)
        refuse_unscorable(plan, "soupkit eval")
        return plan

    def merged(self, recipe: Recipe) -> Iterator[tuple[ModulePlan, LoraFactors]]:
        """Each adapted module's merged factors (float32, on the device)."""
        plan = self.plan(recipe)
        for module, factors, _ in iter_merged(recipe, plan, self.inputs, self.device):
            if module.sources:
                yield module, factors


def is_weighted_sum(recipe: Recipe, plan: Plan) -> bool:
    """The merge is exactly sum_i w_i B_i A_i in every module: cat, or linear with no rank cut (rank sum r_i)."""
    if recipe.merge.method == "cat":
        return True
    return recipe.merge.method == "linear" and all(m.rank == sum(s.rank for s in m.sources) for m in plan.modules if m.sources)


class RecipeScorer:
    """A recipe's base loaded once; any recipe over the same base and adapters is merged into it in memory.

    The merged factors are rounded to the recipe's ``dtype`` first, exactly as ``soupkit merge``
    writes them, so a recipe scores as the adapter it would write. A weighted sum (``cat``, or
    ``linear`` without a rank cut; with ``fused``) skips the merge: each module keeps its
    concatenated factors and a trial only sets the per-rank weights, sum_i w_i B_i A_i x computed as
    B_cat ((A_cat x) * w_rank): the written adapter's update in exact arithmetic, equal to it up to
    the rounding of its factors to the recipe's dtype.
    """

    def __init__(self, recipe: Recipe, device: torch.device, dtype: torch.dtype | None = None, fused: bool = False) -> None:
        self.merger = InMemoryMerger(recipe, device)
        self.scoring: ScoringModel = load_scoring_model(self.merger.inputs.base.directory, device, dtype)
        self.fused = fused
        self._cat: dict[str, LowRankUpdate] = {}  # module path -> concatenated factors (fused cat)
        self._plans: dict[str, Plan] = {}  # the recipe without its adapter weights -> its plan

    def merged_updates(self, recipe: Recipe) -> dict[str, LowRankUpdate]:
        """Every planned module's merged factors, as updates on this model (nothing is written)."""
        if self.fused and recipe.merge.method in ("cat", "linear"):  # the only weighted sums (is_weighted_sum)
            plan = self._weightless_plan(recipe)
            if is_weighted_sum(recipe, plan):
                return self._fused_cat(recipe, plan)
        stored = TORCH_DTYPE[recipe.dtype]
        return {m.path: self.scoring.update(f.A.to(stored), f.B.to(stored)) for m, f in self.merger.merged(recipe)}

    def _weightless_plan(self, recipe: Recipe) -> Plan:
        """The plan, built once for recipes that differ only in their adapters' weights (a sweep's trials):
        its sources' weights are the first such recipe's, so ``_fused_cat`` takes each from ``module_weight``."""
        spec = recipe.model_dump(mode="json")
        for adapter in spec["adapters"]:
            adapter.pop("weight", None)
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._plans:
            self._plans[key] = self.merger.plan(recipe)
        return self._plans[key]

    def _fused_cat(self, recipe: Recipe, plan: Plan) -> dict[str, LowRankUpdate]:
        stored = TORCH_DTYPE[recipe.dtype]
        layers = self.merger.inputs.base.num_layers
        scales: dict[tuple, torch.Tensor] = {}  # (ranks, weights) -> the per-rank weights on the device, made once
        updates = {}
        for module in plan.modules:
            if not module.sources:
                continue
            if module.path not in self._cat:
                factors = load_sources(self.merger.inputs, module, self.merger.device)
                A = torch.cat([f.A for f in factors]).to(stored)
                B = torch.cat([f.B for f in factors], dim=1).to(stored)
                self._cat[module.path] = self.scoring.update(A, B)
            cat = self._cat[module.path]
            key = tuple((s.rank, module_weight(recipe, s.adapter, module.path, layers)) for s in module.sources)
            if key not in scales:  # (R,): adapter i's weight on each of its r_i ranks
                scales[key] = torch.tensor([w for rank, w in key for _ in range(rank)]).to(cat.A.device, cat.A.dtype)
            updates[module.path] = LowRankUpdate(cat.A, cat.B, scales[key])
        return updates

    def apply(self, recipe: Recipe) -> None:
        """Swap ``recipe``'s merge in (the previous trial's updates are dropped)."""
        self.scoring.set_updates(self.merged_updates(recipe))


def adapter_base(adapter: Path, base: Path | None) -> Path:
    """The base of an adapter folder: ``--base``, else its config's base_model_name_or_path."""
    if base is not None:
        return resolve_reference(str(base), Path.cwd(), "--base", "base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    ref = config.get("base_model_name_or_path")
    if not isinstance(ref, str) or not ref:
        raise SoupkitError(str(adapter), "base_model_name_or_path in adapter_config.json", "none", "pass --base DIR")
    root = adapter if (adapter / ref).is_dir() else Path.cwd()
    return resolve_reference(ref, root, f"{adapter}/adapter_config.json base_model_name_or_path", "base")


def load_target(target: Path, device: torch.device, base: Path | None = None) -> tuple[ScoringModel, str]:
    """Load what TARGET names, ready to score; also say what it was ("recipe", "adapter", "model")."""
    if target.is_file():
        recipe = load_recipe(target)
        scorer = RecipeScorer(recipe, device)
        scorer.apply(recipe)
        return scorer.scoring, "recipe"
    if (target / "adapter_config.json").is_file():
        adapter = LoraAdapter("target", target)
        if adapter.saved or adapter.biases or adapter.param_wrappers or adapter.magnitudes:
            raise SoupkitError(
                str(target),
                "a LoRA adapter of Linear and Embedding modules (what eval applies in memory)",
                "modules_to_save, lora_bias, DoRA or targeted-parameter (MoE expert) tensors",
                "merge it into a full model (soupkit merge with output: model) and eval that folder",
            )
        scoring = load_scoring_model(adapter_base(target, base), device)
        updates = {}
        for path in adapter.modules:
            factors = adapter.load(path)  # float32, scale folded into B
            updates[path] = scoring.update(factors.A, factors.B)
        scoring.set_updates(updates)
        return scoring, "adapter"
    if (target / "config.json").is_file():
        return load_scoring_model(target, device), "model"
    found = "no such file or folder" if not target.exists() else "a folder with neither adapter_config.json nor config.json"
    raise SoupkitError(str(target), "a recipe file, a PEFT adapter folder or a model folder", found, "check the path")
