"""peft_* methods against PEFT's own ``add_weighted_adapter`` on the same inputs (peft 0.21)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soupkit.errors import SoupkitError
from soupkit.execute import RunOptions
from soupkit.io.adapter import LoraAdapter
from soupkit.merge import merge_recipe
from soupkit.methods import REGISTRY, LoraFactors, MergeContext
from soupkit.recipe import Recipe
from soupkit.testing import make_lora

from conftest import TINY, tiny_recipe

QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two rank-4 adapters with different alphas and targets (so one module has one source)."""
    root = tmp_path_factory.mktemp("peft_pair")
    return {
        "one": make_lora(TINY / "base", root / "one", seed=11, r=4, lora_alpha=8),
        "two": make_lora(
            TINY / "base", root / "two", seed=12, r=4, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    }


def peft_model(pair: dict[str, Path], names: tuple[str, ...] = ("one", "two")):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, pair[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(pair[name], adapter_name=name)
    return model


def soupkit_run(tmp_path: Path, pair: dict[str, Path], method: str, weights: list[float], names=("one", "two"), **params) -> dict:
    recipe = tiny_recipe(method, (1.0, 1.0), **params)
    recipe["adapters"] = [{"name": n, "path": str(pair[n]), "weight": w} for n, w in zip(names, weights)]
    out = tmp_path / method
    merge_recipe(Recipe.from_dict(recipe, tmp_path), out, QUIET)
    return load_file(out / "adapter_model.safetensors")


def assert_matches_peft(model, merged_name: str, ours: dict) -> None:
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and merged_name in module.lora_A:
            key = f"{name}.lora_A.weight"  # PEFT's module names already carry base_model.model.
            for part in ("lora_A", "lora_B"):
                peft_tensor = getattr(module, part)[merged_name].weight.detach()
                torch.testing.assert_close(ours[key.replace("lora_A", part)], peft_tensor, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == len(ours) // 2 > 0


@pytest.mark.parametrize(
    "method,params",
    [
        ("linear", {}),
        ("ties", {"density": 0.4}),
        ("ties", {"density": 0.6, "majority_sign": "frequency"}),
        ("magnitude_prune", {"density": 0.3}),
        ("dare_linear", {"density": 1.0}),  # density 1: PEFT draws nothing, so the comparison is exact
    ],
)
def test_factorwise_equals_peft_add_weighted_adapter(tmp_path: Path, pair: dict[str, Path], method: str, params: dict) -> None:
    weights = [0.7, -0.4]
    ours = soupkit_run(tmp_path, pair, f"peft_{method}", weights, **params)
    model = peft_model(pair)
    peft_params = {"density": params.get("density")} if "density" in params else {}
    if "majority_sign" in params:
        peft_params["majority_sign_method"] = params["majority_sign"]
    model.add_weighted_adapter(["one", "two"], weights, "merged", combination_type=method, **peft_params)
    assert_matches_peft(model, "merged", ours)


def test_single_adapter_is_linear_as_in_peft(tmp_path: Path, pair: dict[str, Path]) -> None:
    ours = soupkit_run(tmp_path, pair, "peft_ties", [0.5], names=("one",), density=0.3)
    model = peft_model(pair, ("one",))
    model.add_weighted_adapter(["one"], [0.5], "merged", combination_type="ties", density=0.3)  # PEFT switches to linear
    assert_matches_peft(model, "merged", ours)


@dataclass(frozen=True)
class FixedSeedContext(MergeContext):
    """A context whose generator starts where PEFT's global RNG does after ``torch.manual_seed(fixed)``."""

    fixed: int = 0

    def generator(self, salt: str = "") -> torch.Generator:
        return torch.Generator().manual_seed(self.fixed)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_masks_equal_peft_with_the_same_seed(pair: dict[str, Path], method: str) -> None:
    """PEFT draws from the global RNG; seeded identically, soupkit's draws (same calls, same order) match."""
    model = peft_model(pair)
    adapters = {name: LoraAdapter(name, pair[name]) for name in ("one", "two")}
    weights, density = [0.9, 0.6], 0.5
    p = REGISTRY[f"peft_{method}"].Params.model_validate({"density": density})
    checked = 0
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and "one" in module.lora_A and "two" in module.lora_A):
            continue
        path = name.removeprefix("base_model.model.")
        torch.manual_seed(1000 + checked)
        want_A, want_B = model.base_model._generalized_task_arithmetic_weighted_adapter(
            method, ["one", "two"], weights, module, density, "total"
        )
        factors = []
        for adapter in adapters.values():
            f = adapter.load(path)
            factors.append(LoraFactors(A=f.A, B=f.B, scale=adapter.modules[path].scale))
        ctx = FixedSeedContext(path, None, 0, sources=("one", "two"), fixed=1000 + checked)
        got = REGISTRY[f"peft_{method}"].merge(factors, weights, p, ctx).factors
        torch.testing.assert_close(got.A, want_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.B, want_B, rtol=1e-5, atol=1e-6)
        assert float((want_A == 0).float().mean()) > 0.2  # the draws really dropped entries
        checked += 1
    assert checked >= 4


def test_unequal_ranks_are_refused(tmp_path: Path) -> None:
    recipe = Recipe.from_dict(tiny_recipe("peft_ties", density=0.5), tmp_path)  # math r4, code r8
    with pytest.raises(SoupkitError, match="one rank everywhere"):
        merge_recipe(recipe, tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists()
