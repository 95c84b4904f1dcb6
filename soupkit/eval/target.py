"""What ``soupkit eval`` scores: a recipe (merged in memory), a PEFT adapter folder, or a full model folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from soupkit.errors import SoupkitError
from soupkit.eval.model import LowRankUpdate, ScoringModel, load_scoring_model
from soupkit.execute import TORCH_DTYPE, Inputs, iter_merged, open_inputs
from soupkit.io.adapter import LoraAdapter
from soupkit.io.resolve import resolve_reference
from soupkit.plan import build_plan
from soupkit.recipe import Recipe, load_recipe


class RecipeScorer:
    """A recipe's base loaded once; any recipe over the same base and adapters is merged into it in memory.

    The merged factors are rounded to the recipe's ``dtype`` first, exactly as ``soupkit merge``
    writes them, so a recipe scores as the adapter it would write.
    """

    def __init__(self, recipe: Recipe, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.inputs: Inputs = open_inputs(recipe)
        self.scoring: ScoringModel = load_scoring_model(self.inputs.base.directory, device, dtype)

    def merged_updates(self, recipe: Recipe) -> dict[str, LowRankUpdate]:
        """Every planned module's merged factors, as updates on this model (nothing is written)."""
        plan = build_plan(recipe, self.inputs.adapters, self.inputs.base, recipe.dtype)
        stored = TORCH_DTYPE[recipe.dtype]
        updates = {}
        for module, factors, _ in iter_merged(recipe, plan, self.inputs, self.scoring.device):
            if module.sources:
                updates[module.path] = self.scoring.update(factors.A.to(stored), factors.B.to(stored))
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
