"""``merge.normalize: count | weights`` of the TIES family (ties, dare_ties, della; full and core space):
the disjoint merge divides the agreeing sum by the count of agreeing adapters (TIES paper, PEFT) or by the
sum of their weights (mergekit's ``normalize: true``), against TIES written plainly here in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from soupkit.cli import main
from soupkit.methods import REGISTRY, LoraFactors, MergeContext

from conftest import TINY, reference_deltas, tiny_recipe, write_recipe

NORMALIZED = ["ties", "dare_ties", "della"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


D_OUT, D_IN = 12, 10


def random_factors(seed: int, rank: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(rank, D_IN, generator=g), B=0.3 * torch.randn(D_OUT, rank, generator=g))


INPUTS = [random_factors(1, 2), random_factors(2, 3), random_factors(3, 2)]


def plain_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * x.numel())
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[x.abs().flatten().topk(k).indices] = True
    return x * mask.view(x.shape)


def plain_ties(deltas: list[torch.Tensor], weights: list[float], density: float, lam: float, normalize: str) -> torch.Tensor:
    """Trim, elect the sign of the weighted sum (0 -> +), sum the agreeing weighted entries, divide by their
    count (``count``) or by the sum of their weights (``weights``; 1 where none agrees)."""
    trimmed = [w * plain_trim(d, density) for d, w in zip(deltas, weights)]
    elected = torch.sign(sum(trimmed))
    elected[elected == 0] = 1
    agree = [(torch.sign(t) == elected).double() for t in trimmed]
    total = sum(t * a for t, a in zip(trimmed, agree))
    if normalize == "count":
        divisor = sum(agree).clamp(min=1)
    else:
        divisor = sum(w * a for w, a in zip(weights, agree))
        divisor[divisor == 0] = 1
    return lam * total / divisor


def module_merge(name: str, inputs: list[LoraFactors], weights: list[float], **params) -> torch.Tensor:
    method = REGISTRY[name]
    ctx = MergeContext("model.layers.0.mlp.up_proj", 64, 0, sources=("math", "code", "chat")[: len(inputs)])  # 64: no truncation
    f = method.merge(inputs, weights, method.Params.model_validate(params), ctx).factors
    return f.B.double() @ f.A.double()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("name", NORMALIZED)
def test_normalize_defaults_to_count_and_is_strict(name: str) -> None:
    Params = REGISTRY[name].Params
    assert Params.model_validate({}).normalize == "count"
    assert Params.model_validate({"normalize": "weights"}).normalize == "weights"
    with pytest.raises(ValueError):
        Params.model_validate({"normalize": "weight"})


@pytest.mark.parametrize("name", ["linear", "dare_linear", "magnitude_prune", "breadcrumbs", "knots", "tsv", "peft_ties"])
def test_normalize_is_refused_where_there_is_no_disjoint_mean(name: str) -> None:
    with pytest.raises(ValueError):
        REGISTRY[name].Params.model_validate({"normalize": "weights"})


@pytest.mark.parametrize("normalize", ["count", "weights"])
@pytest.mark.parametrize("n", [2, 3])
def test_ties_normalize_equals_plain_ties(normalize: str, n: int) -> None:
    inputs, weights = INPUTS[:n], [0.6, 0.4, 1.3][:n]
    deltas = [f.B.double() @ f.A.double() for f in inputs]
    want = plain_ties(deltas, weights, 0.5, 1.2, normalize)
    got = module_merge("ties", inputs, weights, density=0.5, normalize=normalize, **{"lambda": 1.2})
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("name,params", [("dare_ties", {"density": 1.0}), ("della", {"density": 1.0, "epsilon": 0.0})])
def test_dare_ties_and_della_without_drops_follow_normalize(name: str, params: dict) -> None:
    """At density 1 nothing is dropped: both are TIES' election and disjoint merge on the whole updates."""
    weights = [0.6, 0.4, 1.3]
    deltas = [f.B.double() @ f.A.double() for f in INPUTS]
    for normalize in ("count", "weights"):
        want = plain_ties(deltas, weights, 1.0, 1.0, normalize)
        assert rel(module_merge(name, INPUTS, weights, normalize=normalize, **params), want) < 1e-5


@pytest.mark.parametrize("name", NORMALIZED)
def test_core_space_follows_normalize(name: str) -> None:
    """Core space: the same disjoint merge on the core matrices M_i = U_ref^T (w_i B_i A_i) V_ref^T."""
    extra = {"ties": {"density": 0.6}, "dare_ties": {"density": 1.0}, "della": {"density": 1.0, "epsilon": 0.0}}[name]
    weights = [0.6, 0.4]
    Bs = [w * f.B.double() for f, w in zip(INPUTS[:2], weights)]
    As = [f.A.double() for f in INPUTS[:2]]
    U = torch.linalg.svd(torch.cat(Bs, dim=1), full_matrices=False).U
    V = torch.linalg.svd(torch.cat(As, dim=0), full_matrices=False).Vh
    cores = [U.T @ (f.B.double() @ f.A.double()) @ V.T for f in INPUTS[:2]]  # unweighted; plain_ties weights them
    for normalize in ("count", "weights"):
        want = U @ plain_ties(cores, weights, extra["density"], 1.0, normalize) @ V
        got = module_merge(name, INPUTS[:2], weights, space="core", normalize=normalize, **extra)
        assert rel(got, want) < 1e-5, normalize


def test_weights_normalization_on_the_readme_weights_is_about_twice_count(tmp_path: Path) -> None:
    """README's 0.6 / 0.4 at density 0.2: dividing by the agreeing weights (<= 1) instead of the count (>= 1)."""
    runs = {}
    for normalize in ("count", "weights"):
        recipe = tiny_recipe("ties", (0.6, 0.4), density=0.2, normalize=normalize, rank=64)
        out = tmp_path / normalize
        result = CliRunner().invoke(
            main, ["merge", str(write_recipe(tmp_path, recipe, f"{normalize}.yaml")), "-o", str(out), "--quiet"]
        )
        assert result.exit_code == 0, result.output
        runs[normalize] = reference_deltas(out)
    math, code = reference_deltas(TINY / "adapters" / "math"), reference_deltas(TINY / "adapters" / "code")
    for path in runs["count"]:
        deltas, weights = [math[path]] + ([code[path]] if path in code else []), [0.6, 0.4][: 1 + (path in code)]
        for normalize, got in runs.items():
            assert rel(got[path], plain_ties(deltas, weights, 0.2, 1.0, normalize)) < 1e-5, (normalize, path)
        ratio = float(runs["count"][path].norm() / runs["weights"][path].norm())
        assert 0.3 < ratio < 0.7, (path, ratio)


def test_negative_weight_with_weights_normalization_is_refused(tmp_path: Path) -> None:
    """Dividing by a sum of weights that may be negative (or zero) would flip or blow up entries: refused."""
    recipe = tiny_recipe("ties", (0.6, -0.4), normalize="weights")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(write_recipe(tmp_path, recipe)), "-o", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "merge.normalize" in result.output and "-0.4" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    recipe = tiny_recipe("ties", (0.6, 0.4), normalize="weights")
    recipe["merge"]["modules"] = [{"match": "*.mlp.*", "weights": {"code": [0.5, -1.0]}}]
    result = CliRunner().invoke(main, ["validate", str(write_recipe(tmp_path, recipe, "modules.yaml"))])
    assert result.exit_code == 2 and "merge.normalize" in result.output, result.output
    recipe["merge"]["normalize"] = "count"  # count: a negative weight negates that adapter, as before
    result = CliRunner().invoke(main, ["validate", str(write_recipe(tmp_path, recipe, "count.yaml"))])
    assert result.exit_code == 0, result.output
