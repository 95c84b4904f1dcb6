"""The contract every registered method keeps, checked on values at module level for the whole REGISTRY.

Dense references here are plain ``B @ A`` products; each method's own maths is checked in
tests/test_methods_*.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soupkit.methods import REGISTRY, LoraFactors, MergeContext

D_OUT, D_IN, RANK = 24, 20, 4
NAMES = ("math", "code")


def factors(seed: int, rank: int = RANK, scale: float = 2.0) -> LoraFactors:
    """Random factors with a PEFT scale folded into B (and kept in ``scale``, as the executor does)."""
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(rank, D_IN, generator=g), B=scale * torch.randn(D_OUT, rank, generator=g) * 0.1, scale=scale)


def merged(name: str, inputs: list[LoraFactors], weights: list[float], names=NAMES, **params) -> torch.Tensor:
    method = REGISTRY[name]
    p = method.Params.model_validate({**method.identity_params, **params})
    ctx = MergeContext("model.layers.0.mlp.up_proj", None, 0, sources=tuple(names[: len(inputs)]))
    result = method.merge(inputs, weights, p, ctx)
    f = result.factors
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    assert f.rank <= method.output_rank([x.rank for x in inputs], p, None), "rank above output_rank"
    if result.energy_kept is not None:
        assert 0.0 <= result.energy_kept <= 1.0 + 1e-9
    return (f.B @ f.A).double()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / max(float(want.norm()), 1e-12))


def flat_spectrum_factors(seed: int, rank: int = RANK, value: float = 0.3) -> LoraFactors:
    """An update whose nonzero singular values all equal ``value``: B = value * Q_1, A = Q_2^T (orthonormal Q)."""
    g = torch.Generator().manual_seed(seed)
    q_out = torch.linalg.qr(torch.randn(D_OUT, rank, generator=g, dtype=torch.float64))[0]
    q_in = torch.linalg.qr(torch.randn(D_IN, rank, generator=g, dtype=torch.float64))[0]
    return LoraFactors(A=q_in.T.float(), B=(value * q_out).float())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_identity(name: str) -> None:
    """One adapter, weight 1, the method's identity parameters: the adapter comes back unchanged.

    Spectrum-flattening rules (Iso-C) have only flat-spectrum fixed points, so they get such an input.
    """
    f = flat_spectrum_factors(1) if REGISTRY[name].identity_needs_flat_spectrum else factors(1)
    assert rel(merged(name, [f], [1.0]), (f.B @ f.A).double()) < 1e-5


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_zero_weights_give_zero(name: str) -> None:
    params = {"density": 0.5} if "density" in REGISTRY[name].Params.model_fields else {}
    out = merged(name, [factors(1), factors(2)], [0.0, 0.0], **params)
    assert float(out.abs().max()) == 0.0


def default_params(name: str) -> dict:
    """Non-trivial parameters, so that trimming / dropping / clustering really happen."""
    fields = REGISTRY[name].Params.model_fields
    params = {}
    if "density" in fields:
        params["density"] = 0.5
    if "epsilon" in fields:
        params["epsilon"] = 0.1
    if "gamma" in fields:
        params["gamma"] = 0.05
        params["density"] = 0.6
    return params


@pytest.mark.parametrize("name", sorted(n for n, m in REGISTRY.items() if m.order_invariant))
def test_order_invariance(name: str) -> None:
    a, b = factors(1), factors(2)
    forward = merged(name, [a, b], [0.7, 0.4], **default_params(name))
    backward = merged(name, [b, a], [0.4, 0.7], names=NAMES[::-1], **default_params(name))
    assert rel(backward, forward) < 1e-5


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_negative_weights_negate(name: str) -> None:
    a, b = factors(1), factors(2)
    plus = merged(name, [a, b], [0.7, 0.4], **default_params(name))
    minus = merged(name, [a, b], [-0.7, -0.4], **default_params(name))
    assert float(plus.norm()) > 0
    assert rel(minus, -plus) < 1e-5


def test_every_method_is_documented() -> None:
    for name, method in REGISTRY.items():
        module = __import__(type(method).__module__, fromlist=["_"])
        assert module.__doc__ and len(module.__doc__) > 80, f"{name}: module docstring with the formula"
        assert method.paper and method.summary


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_has_a_commented_recipe_that_runs(name: str, tmp_path: Path) -> None:
    from soupkit.execute import RunOptions
    from soupkit.merge import merge_recipe
    from soupkit.recipe import load_recipe

    path = RECIPES / f"{name}.yaml"
    assert path.is_file(), f"recipes/{name}.yaml is missing"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"soupkit merge recipes/{name}.yaml" in line for line in header), "header must give the command"
    recipe = load_recipe(path)
    assert recipe.merge.method == name
    report = merge_recipe(recipe, tmp_path / "out", RunOptions(progress=False))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and report.plan.rank > 0
