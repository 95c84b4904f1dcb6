"""CPU vs GPU for every method in the registry (run with ``pytest -m gpu`` on a CUDA machine).

Every shipped recipe under recipes/ (one or more per method, so new methods and merge spaces come in
through the registry), and each one whose method has ``merge.space`` also in core space, is merged on
both devices: each module's B @ A agrees within float32
tolerance. Every dense method's per-adapter rule (DARE/DELLA drops, TIES trims, breadcrumbs bands),
given the same delta on both devices, keeps exactly the same entries.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from soupkit.execute import RunOptions
from soupkit.merge import merge_recipe
from soupkit.methods import REGISTRY, MergeContext
from soupkit.methods._dense import DenseMethod
from soupkit.recipe import Recipe

from conftest import ROOT, reference_deltas

RECIPES = sorted(
    p for p in (ROOT / "recipes").glob("*.yaml") if yaml.safe_load(p.read_text()).get("output", "adapter") == "adapter"
)
CUDA = torch.device("cuda")


def recipe_method(path: Path) -> str:
    return yaml.safe_load(path.read_text())["merge"]["method"]


def has_space(path: Path) -> bool:
    method = REGISTRY.get(recipe_method(path))
    return method is not None and "space" in method.Params.model_fields


# Each recipe as shipped, and each recipe of a method with ``merge.space`` also in core space.
CASES = [(p, None) for p in RECIPES] + [(p, "core") for p in RECIPES if has_space(p) and "core" not in p.stem]


def test_every_method_has_a_recipe() -> None:
    """So that the GPU comparison below covers the whole registry."""
    assert set(REGISTRY) <= {recipe_method(p) for p in RECIPES}


@pytest.mark.gpu
@pytest.mark.parametrize("path,space", CASES, ids=[p.stem + (f"-{s}" if s else "") for p, s in CASES])
def test_recipe_on_gpu_equals_cpu(path: Path, space: str | None, tmp_path: Path) -> None:
    data = {**yaml.safe_load(path.read_text()), "dtype": "float32"}
    if space is not None:
        # Core space produces at most sum r_i; a full-space rank budget above that is refused (plan.check_rank_budget).
        data["merge"] = {key: value for key, value in data["merge"].items() if key != "rank"} | {"space": space}
    recipe = Recipe.from_dict(data, path.parent)
    merge_recipe(recipe, tmp_path / "cpu", RunOptions(device="cpu", progress=False))
    merge_recipe(recipe, tmp_path / "gpu", RunOptions(device="cuda", progress=False))
    cpu, gpu = reference_deltas(tmp_path / "cpu"), reference_deltas(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for module, want in cpu.items():
        err = float((gpu[module] - want).norm()) / max(float(want.norm()), 1e-12)
        assert err <= 1e-4, (path.stem, module, err)


def dense_params(method: DenseMethod) -> dict:
    """Parameters under which the per-adapter rule really drops or trims entries."""
    fields = method.Params.model_fields
    params: dict = {"density": 0.4} if "density" in fields else {}
    if "epsilon" in fields:
        params["epsilon"] = 0.1
    if "gamma" in fields:
        params = {"density": 0.6, "gamma": 0.05}
    return params


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(n for n, m in REGISTRY.items() if isinstance(m, DenseMethod)))
def test_dense_rule_keeps_the_same_entries_on_gpu(name: str) -> None:
    method = REGISTRY[name]
    assert isinstance(method, DenseMethod)
    params = method.Params.model_validate(dense_params(method))
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(640, 448, generator=g)
    delta[:, ::9] = 0.125  # tied magnitudes
    for j in range(2):
        ctx_cpu = MergeContext("model.layers.1.mlp.gate_proj", None, 9, torch.device("cpu"), None, ("math", "code"))
        ctx_gpu = MergeContext("model.layers.1.mlp.gate_proj", None, 9, CUDA, None, ("math", "code"))
        cpu = method.sparsify(delta.clone(), j, params, ctx_cpu)
        gpu = method.sparsify(delta.cuda(), j, params, ctx_gpu).cpu()
        assert torch.equal(gpu != 0, cpu != 0), (name, j)
        assert torch.allclose(gpu, cpu, rtol=1e-6, atol=0), (name, j)
