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


def merged_ties_delta(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    """A TIES-merged delta of two rank-32 inputs, as a real merge forms it (many exact zeros)."""
    return merged_ties_delta_and_start(d_out, d_in, seed)[0]


def merged_ties_delta_and_start(d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta and the range finder's start that a merge passes with it, the inputs' A^T (d_in, 64)."""
    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(d_out, 32, generator=g) * 0.03, torch.randn(32, d_in, generator=g) / 64) for _ in range(2)]
    deltas = [B @ A for B, A in factors]
    kept = [d * (d.abs() >= d.abs().flatten().kthvalue(int(0.8 * d.numel())).values) for d in deltas]
    stack = torch.stack(kept)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stack) == sign) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1), torch.cat([A for _, A in factors]).T


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 14336), (14336, 4096), (1024, 4096)])
def test_large_gpu_threshold_is_the_exact_kth_largest(shape: tuple[int, int]) -> None:
    """The GPU's bracketed selection (tensors of BRACKET_MIN entries and more) against a sort."""
    from soupkit.ops import kth_largest_magnitude

    magnitudes = merged_ties_delta(*shape, seed=sum(shape)).abs()
    ordered = magnitudes.flatten().sort(descending=True).values
    for fraction in (0.2, 0.5, 0.01, 1e-6):
        k = max(1, int(fraction * magnitudes.numel()))
        assert kth_largest_magnitude(magnitudes.cuda(), k) == float(ordered[k - 1]), (shape, fraction)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (4096, 14336)])
def test_gpu_refit_is_within_1e3_of_the_exact_truncation(shape: tuple[int, int]) -> None:
    """The GPU range finder (Householder bases on the device), started as a merge starts it, against a float64 SVD."""
    from soupkit.ops import best_rank_k

    delta, start = merged_ties_delta_and_start(*shape, seed=7)
    factors, energy = best_rank_k(delta.cuda(), 32, start=start.cuda(), seed=1)
    approx = factors.B.double().cpu() @ factors.A.double().cpu()
    singular = torch.linalg.svdvals(delta.double())
    best = float(singular[32:].square().sum())
    assert float((delta.double() - approx).square().sum()) <= best * (1 + 1e-3)
    residual = best / float(singular.square().sum())  # the exact truncation's share of the energy lost
    assert 1 - residual - 1e-3 * residual <= energy <= 1 - residual + 1e-9
